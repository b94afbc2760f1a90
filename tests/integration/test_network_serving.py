"""The reference networks, trained by their recipes (fast mode), wrapped and served.

One server on 127.0.0.1 serves both versions (standard and hardened) of the pneumonia
CNN and the hardened engine-failure GRU, through ONNX Runtime, beside nothing else.
Every answer carries an integrated-gradients map whose sum plus the base value is the
model's logit within the tolerance the answer states; bad tensors get a 422 naming
the offending field.
"""

from __future__ import annotations

import base64
import io
import json
import math

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

from guarded_serving.local_server import LocalServer
from guarded_serving.policy import Policy
from guarded_serving.recipes import engine_failure, pneumonia
from guarded_serving.wrap import MANIFEST_FILE

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def network_server(networks, server_env, tmp_path_factory):
    state = tmp_path_factory.mktemp("networks")
    tags = [*networks["pneumonia"], networks["engine_failure"][-1]]
    env = server_env(state, GUARDED_SERVING_MODELS=json.dumps(tags))
    with LocalServer(env=env, cwd=state) as server:
        yield server


@pytest.fixture(scope="module")
def client(network_server, api_keys):
    with httpx.Client(
        base_url=network_server.url,
        headers={"Authorization": f"Bearer {api_keys['alice']}"},
        timeout=60,
    ) as http:
        yield http


@pytest.fixture(scope="module")
def images():
    return pneumonia.test_data()


@pytest.fixture(scope="module")
def windows():
    return engine_failure.test_data()


def _manifest(tag: str) -> dict:
    with open(bentoml.models.get(tag).path_of(MANIFEST_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def _assert_complete(explanation: dict, shape: tuple[int, ...]) -> np.ndarray:
    assert explanation["method"] == "integrated_gradients"
    assert explanation["status"] == "ok"
    assert explanation["output_space"] == "log_odds"
    grid = np.asarray(explanation["attributions"]["map"], dtype=np.float64)
    assert grid.shape == shape
    gap = explanation["output"] - explanation["base_value"] - grid.sum()
    assert abs(gap) <= explanation["tolerance"]
    assert explanation["completeness_gap"] == pytest.approx(gap, abs=1e-6)
    return grid


def test_pneumonia_answers_with_a_pixel_map_and_patches(client, networks, images):
    x, y = images
    rows = [x[i].tolist() for i in range(4)]
    reply = client.post("/predict", json={"model": "pneumonia", "records": rows})

    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["version"] == networks["pneumonia"][-1].split(":")[1]  # hardened is newest
    manifest = _manifest(networks["pneumonia"][-1])
    for prediction in body["predictions"]:
        assert prediction["label"] in ("pneumonia", "normal")
        assert prediction["guards"]["anomaly"]["verdict"] in ("pass", "flag")
        explanation = prediction["explanation"]
        grid = _assert_complete(explanation, (28, 28))
        patches = np.asarray(explanation["attributions"]["patches"])
        assert patches.shape == (7, 7)
        assert patches.sum() == pytest.approx(grid.sum(), abs=1e-9)
        p = prediction["probability"]
        assert explanation["output"] == pytest.approx(math.log(p / (1 - p)), abs=1e-4)
        background = explanation["background"]
        assert background["rows"] == pneumonia_background_rows()
        assert background["sha256"] == manifest["explainer"]["options"]["background_sha256"]


def pneumonia_background_rows() -> int:
    return Policy.from_file(pneumonia.POLICY_FILE).explanation.gradient.background_rows


def test_a_png_gets_the_same_answer_as_its_pixel_array(client, images):
    x, _ = images
    grey = np.rint(x[7] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()

    as_png = client.post("/predict", json={"model": "pneumonia", "records": [{"png": png}]})
    as_array = client.post("/predict", json={"model": "pneumonia", "records": [x[7].tolist()]})

    assert as_png.status_code == 200, as_png.text
    a, b = as_png.json()["predictions"][0], as_array.json()["predictions"][0]
    assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)
    np.testing.assert_allclose(
        a["explanation"]["attributions"]["map"], b["explanation"]["attributions"]["map"], atol=1e-6
    )


def _png_of(pixels: np.ndarray, mode: str = "L") -> str:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    (image if image.mode == mode else image.convert(mode)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_16_bit_png_is_read_on_the_same_scale(client, images):
    x, _ = images
    grey = np.rint(x[7] * 255).astype(np.uint16)

    narrow = client.post(
        "/predict",
        json={"model": "pneumonia", "records": [{"png": _png_of(grey.astype(np.uint8))}]},
    )
    wide = client.post(
        "/predict", json={"model": "pneumonia", "records": [{"png": _png_of(grey * 257, "I;16")}]}
    )

    assert wide.status_code == 200, wide.text
    assert wide.json()["predictions"][0]["probability"] == pytest.approx(
        narrow.json()["predictions"][0]["probability"], abs=1e-6
    )


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda grey: _png_of(grey, "RGB"), "unsupported_image"),
        (lambda grey: _png_of(grey, "RGBA"), "unsupported_image"),
        (lambda grey: _png_of(grey)[:200], "not_png"),  # cut inside the pixel data
    ],
)
def test_images_that_are_not_plain_grey_pngs_get_a_422(client, images, make, code):
    x, _ = images
    png = make(np.rint(x[7] * 255).astype(np.uint8))
    padded = png + "=" * (-len(png) % 4)

    reply = client.post("/predict", json={"model": "pneumonia", "records": [{"png": padded}]})

    assert reply.status_code == 422, reply.text
    assert (reply.json()["code"], reply.json()["field"]) == (code, "records[0].png")


def test_a_full_batch_is_answered_in_time_with_the_explanation_budget(client, images):
    x, _ = images
    policy = Policy.from_file(pneumonia.POLICY_FILE)
    rows = [x[i % len(x)].tolist() for i in range(policy.limits.max_batch_rows)]

    reply = client.post("/predict", json={"model": "pneumonia", "records": rows})

    assert reply.status_code == 200, reply.text
    statuses = [p["explanation"]["status"] for p in reply.json()["predictions"]]
    assert statuses[0] == "ok"
    assert set(statuses) <= {"ok", "skipped_time_budget"}
    budget_s = policy.explanation.gradient.time_budget_ms / 1000
    assert reply.elapsed.total_seconds() < budget_s + 10


def test_both_versions_are_served_and_routed(client, networks, images):
    x, _ = images
    standard, hardened = (tag.split(":")[1] for tag in networks["pneumonia"])
    answers = {}
    for version in (standard, hardened):
        reply = client.post(
            "/predict",
            json={"model": "pneumonia", "version": version, "records": [x[0].tolist()]},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["version"] == version
        answers[version] = reply.json()["predictions"][0]["probability"]
    assert answers[standard] != answers[hardened]


def test_the_engine_answers_with_a_cycle_by_sensor_map_and_sensor_totals(client, windows):
    x, _ = windows
    reply = client.post(
        "/predict", json={"model": "engine_failure", "records": [x[i].tolist() for i in range(3)]}
    )

    assert reply.status_code == 200, reply.text
    for prediction in reply.json()["predictions"]:
        assert prediction["label"] in ("fails_within_30", "healthy_30")
        assert prediction["guards"]["anomaly"]["verdict"] in ("pass", "flag")
        explanation = prediction["explanation"]
        grid = _assert_complete(explanation, (engine_failure.WINDOW, len(engine_failure.FEATURES)))
        assert explanation["attributions"]["axes"] == ["cycle", "sensor"]
        totals = explanation["attributions"]["totals"]
        assert list(totals) == engine_failure.FEATURES
        np.testing.assert_allclose(list(totals.values()), grid.sum(axis=0), atol=1e-9)


def test_the_anomaly_guard_flags_an_image_unlike_any_x_ray(client):
    noise = np.random.default_rng(0).random((28, 28)).round(3).tolist()
    reply = client.post("/predict", json={"model": "pneumonia", "records": [noise]})

    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"][0]["guards"]["anomaly"]["verdict"] == "flag"


def _bad_image(images, change):
    x, _ = images
    record = x[0].tolist()
    change(record)
    return record


@pytest.mark.parametrize(
    ("name", "change", "code"),
    [
        ("too few rows", lambda r: r.pop(), "wrong_shape"),
        ("a short row", lambda r: r[3].pop(), "wrong_shape"),
        ("a pixel above 1", lambda r: r[5].__setitem__(6, 1.5), "out_of_range"),
        ("a negative pixel", lambda r: r[0].__setitem__(0, -0.01), "out_of_range"),
        ("a string pixel", lambda r: r[2].__setitem__(2, "0.4"), "wrong_type"),
    ],
)
def test_bad_images_get_a_422_naming_the_field(client, images, name, change, code):
    good = images[0][1].tolist()
    reply = client.post(
        "/predict", json={"model": "pneumonia", "records": [good, _bad_image(images, change)]}
    )

    assert reply.status_code == 422, (name, reply.text)
    body = reply.json()
    assert body["code"] == code, body
    assert body["field"].startswith("records[1]"), body


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sensor_values_get_a_422(client, windows, literal):
    x, _ = windows
    rows = json.dumps([x[0].tolist()])
    # Replace one reading (cycle 4, sensor_7) by the literal, as a careless client sends it.
    record = json.loads(rows)
    record[0][4][3] = "__X__"
    payload = json.dumps({"model": "engine_failure", "records": record}).replace(
        '"__X__"', literal
    )

    reply = client.post("/predict", content=payload, headers={"Content-Type": "application/json"})

    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert (body["code"], body["field"]) == ("not_finite", "records[0][4][3]"), body


def test_a_sensor_outside_its_physical_range_gets_a_422_naming_the_sensor(client, windows):
    x, _ = windows
    record = x[0].tolist()
    record[29][0] = 700.0  # sensor_2 (T24) ends near 645 degrees Rankine at most
    reply = client.post("/predict", json={"model": "engine_failure", "records": [record]})

    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert (body["code"], body["field"]) == ("out_of_range", "records[0][29][0]"), body
    assert "sensor_2" in body["error"], body
    assert "700" not in body["error"], body


def test_a_window_of_the_wrong_length_gets_a_422(client, windows):
    x, _ = windows
    reply = client.post(
        "/predict", json={"model": "engine_failure", "records": [x[0][:20].tolist()]}
    )

    assert reply.status_code == 422, reply.text
    assert reply.json()["code"] == "wrong_shape"
    assert reply.json()["field"].startswith("records[0]")


def test_the_robustness_command_attacks_every_version_and_writes_the_table(
    networks, master_key, tmp_path, monkeypatch, capsys
):
    from guarded_serving import cli

    doc = tmp_path / "robustness.md"
    doc.write_text("# Robustness\n\n<!-- pneumonia:begin -->\nstale\n<!-- pneumonia:end -->\n")
    monkeypatch.setenv("GUARDED_SERVING_MASTER_KEY_FILE", str(master_key.path))

    status = cli.main(
        ["robustness", "pneumonia", "--limit", "40", "--write-doc", "--doc", str(doc)]
    )

    assert status == 0
    printed = capsys.readouterr().out
    standard, hardened = (tag.split(":")[1] for tag in networks["pneumonia"])
    rows = [
        line
        for line in printed.splitlines()
        if line.startswith("| standard") or line.startswith("| hardened")
    ]
    assert [r.split("|")[2].strip() for r in rows] == [standard, hardened]
    for row in rows:
        clean, correct, fgsm, pgd, under_pgd = (float(c) for c in row.split("|")[3:8])
        assert 0 < clean <= 1 and correct == round(clean * 40)
        assert 0 <= fgsm <= 1 and 0 <= pgd <= 1
        assert under_pgd == pytest.approx(clean * (1 - pgd), abs=1e-3)
    assert "L-inf epsilon 0.05 on the input scale; PGD 10 steps of 0.0125" in printed
    text = doc.read_text()
    assert "stale" not in text and rows[0] in text and text.startswith("# Robustness")


def test_the_robustness_command_refuses_a_model_without_a_budget(
    credit_model, master_key, monkeypatch, capsys
):
    from guarded_serving import cli

    monkeypatch.setenv("GUARDED_SERVING_MASTER_KEY_FILE", str(master_key.path))

    status = cli.main(["robustness", "credit_risk"])

    assert status == 1
    assert "--data" in capsys.readouterr().err
