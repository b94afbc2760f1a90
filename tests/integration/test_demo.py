"""The main job, ``guarded-serving demo``, end to end on the reference models.

The models are the test run's own (the credit-risk recipe and the networks in fast
mode), sealed with the test master key, so the demo reuses them instead of training;
everything after that runs as a user sees it: one server on 127.0.0.1 serving all
three, real requests, feedback, the fairness table, and the server stopped.
"""

from __future__ import annotations

import re

import httpx
import pytest

from guarded_serving.demo import run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_output(credit_model, networks, master_key, tmp_path_factory) -> str:
    state = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GUARDED_SERVING_MASTER_KEY_FILE", str(master_key.path))
        patch.chdir(state)
        lines: list[str] = []
        assert run_demo(echo=lines.append) == 0
    return "\n".join(lines)


def test_the_demo_reuses_the_sealed_reference_models(demo_output):
    for name in ("credit_risk", "pneumonia", "engine_failure"):
        assert re.search(rf"^reusing {name}:\S+ ", demo_output, re.M), name
    assert "training" not in demo_output


def test_the_demo_scores_the_held_out_applicants_and_shows_attributions(demo_output):
    scored = re.search(
        r"scored (\d+) held-out applicants in \d+ requests: accuracy ([\d.]+)", demo_output
    )
    assert scored, demo_output
    assert int(scored[1]) == 200 and 0.6 < float(scored[2]) <= 1.0
    assert re.search(
        r"base [-+][\d.]+ \+ attributions [-+][\d.]+ = [-+][\d.]+, model output", demo_output
    )
    assert "unknown category   -> 422 unknown_category (records[0].purpose)" in demo_output
    assert "out-of-range value -> 422 out_of_range (records[0].credit_amount)" in demo_output
    assert "unknown API key    -> 401 unauthenticated" in demo_output
    assert "accepted 200 labels" in demo_output


def test_the_demo_prints_the_fairness_table_per_protected_group(demo_output):
    for attribute in ("sex", "age_band"):
        assert f"credit_risk / {attribute}" in demo_output
    assert re.search(r"disparate impact +[\d.]+, demographic parity diff", demo_output)


def test_the_demo_shows_answers_from_each_network(demo_output, networks):
    for name, figure in (("pneumonia", "accuracy"), ("engine_failure", "f1")):
        hardened = re.escape(networks[name][-1])
        assert re.search(
            rf"served by {hardened} \(the hardened version; test {figure} [\d.]+ on \d+",
            demo_output,
        )
    for count, unit in ((50, "images"), (100, "engines")):
        scored = rf"scored the first {count} test {unit} without attributions: (\d+) right"
        right = re.search(scored, demo_output)
        assert right and 0 < int(right[1]) <= count, unit
    for truth in ("normal", "pneumonia"):
        assert re.search(
            rf"test image \d+ \(truth {truth}\): (pneumonia|normal) \(p=", demo_output
        )
    assert "a 20x28 array instead -> 422 wrong_shape" in demo_output
    for truth in ("fails_within_30", "healthy_30"):
        assert re.search(
            rf"test engine \d+, \d+ cycles from failure \(truth {truth}\)", demo_output
        )
    assert re.search(r"[-+][\d.]+  sensor_\d+ \(all 30 cycles of engine \d+\)", demo_output)
    assert "a NaN reading instead -> 422 not_finite (records[0][29][0])" in demo_output
    assert demo_output.count("integrated_gradients: base") == 4
    assert len(re.findall(r"\+ map total [-+][\d.]+ = [-+][\d.]+, model output", demo_output)) == 4


def test_the_demo_stops_its_server(demo_output):
    url = re.search(r"^ready at (http://127\.0\.0\.1:\d+)$", demo_output, re.M)
    assert url and demo_output.rstrip().endswith("server stopped")
    with pytest.raises(httpx.TransportError):
        httpx.get(url[1] + "/livez", timeout=2.0)
