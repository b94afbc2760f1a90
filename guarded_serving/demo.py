"""The end-to-end demo: train, encrypt, serve with guards, query with real rows, report.

Everything runs on this machine on the embedded defaults: a master key file created
with mode 0600 if there is none, the reference models trained (first run only) and
wrapped into the BentoML model store, an API key for a ``demo`` client, one BentoML
server on 127.0.0.1 serving them all, the held-out German credit rows sent as real
requests with their true labels sent back as feedback, the fairness table, and one
real answer each from the pneumonia and engine-failure networks.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import bentoml
import httpx
import numpy as np

from guarded_serving import vault
from guarded_serving.guards.identify import add_client
from guarded_serving.local_server import LocalServer
from guarded_serving.policy import Policy
from guarded_serving.recipes import RECIPES, credit_risk, load_recipe
from guarded_serving.server import resolve_key_provider
from guarded_serving.settings import GuardedServingSettings
from guarded_serving.wrap import MANIFEST_FILE

BATCH_ROWS = 50


def run_demo(port: int = 0, echo: Any = print) -> int:
    settings = GuardedServingSettings()
    state = settings.master_key_file.parent
    state.mkdir(parents=True, exist_ok=True)

    echo("== 1. master key")
    provider = resolve_key_provider(settings)
    if provider is None:
        provider = vault.generate_key_file(settings.master_key_file)
        echo(f"created {settings.master_key_file} (mode 0600), key id {provider.key_id}")
    else:
        echo(f"using master key {provider.key_id}")

    echo("\n== 2. reference models")
    tags = {name: _ensure_model(name, provider, echo) for name in RECIPES}

    keys_file = state / "demo-api-keys.yaml"
    api_key = add_client(keys_file, "demo")
    fairness_db = state / "demo-fairness.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{fairness_db}{suffix}").unlink(missing_ok=True)
    env = {
        "GUARDED_SERVING_MODELS": json.dumps(list(tags.values())),
        "GUARDED_SERVING_API_KEYS_FILE": str(keys_file.resolve()),
        "GUARDED_SERVING_FAIRNESS__DB_PATH": str(fairness_db.resolve()),
        "GUARDED_SERVING_MASTER_KEY_FILE": str(settings.master_key_file.resolve()),
    }

    echo("\n== 3. serving with guards (bentoml serve on 127.0.0.1)")
    with LocalServer(env=env, port=port) as server:
        echo(f"ready at {server.url}")
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30.0
        ) as client:
            _query(client, echo)
            _query_networks(client, tags, echo)
    echo("\nserver stopped")
    return 0


def _ensure_model(name: str, provider: vault.KeyProvider, echo: Any) -> str:
    """The newest stored model of a recipe sealed with this key; trained if there is none."""
    tag = _model_for_key(name, provider.key_id)
    if tag is not None:
        echo(f"reusing {tag} ('guarded-serving train {name}' retrains it)")
        return tag
    echo(f"training {name} (first run only)")
    result = load_recipe(name).run(provider, echo=echo)
    return result[-1] if isinstance(result, list) else result


def _model_for_key(name: str, key_id: str) -> str | None:
    """The newest stored model of that name sealed with this key, if any."""
    try:
        models = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        return None
    for model in sorted(models, key=lambda m: m.info.creation_time, reverse=True):
        try:
            manifest = json.loads(Path(model.path_of(MANIFEST_FILE)).read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("key_id") == key_id:
            return str(model.tag)
    return None


def _query(client: httpx.Client, echo: Any) -> None:
    policy = Policy.from_file(credit_risk.POLICY_FILE)
    _, _, test = credit_risk.split(credit_risk.load_german_credit(), policy)
    records = test.features.to_dict("records")
    context = test.context.to_dict("records")
    labels = [policy.output.positive_label if t else policy.output.negative_label
              for t in test.target]  # fmt: skip

    predictions: list[dict[str, Any]] = []
    for start in range(0, len(records), BATCH_ROWS):
        reply = client.post(
            "/predict",
            json={
                "model": "credit_risk",
                "records": records[start : start + BATCH_ROWS],
                "context": context[start : start + BATCH_ROWS],
            },
        )
        reply.raise_for_status()
        predictions.extend(reply.json()["predictions"])
    correct = sum(p["label"] == y for p, y in zip(predictions, labels, strict=True))
    flagged = [i for i, p in enumerate(predictions) if p["guards"]["anomaly"]["verdict"] == "flag"]
    echo(
        f"scored {len(predictions)} held-out applicants in {len(records) // BATCH_ROWS} "
        f"requests: accuracy {correct / len(predictions):.3f}, "
        f"{len(flagged)} flagged by the anomaly guard"
    )

    echo("\n== 4. a few answers, with their top SHAP attributions (log-odds)")
    for i in list(range(3)) + flagged[:1]:
        _show_prediction(i, records[i], predictions[i], labels[i], policy, echo)

    echo("\n== 5. the guards refusing bad input")
    bad = dict(records[0], purpose="A499")
    reply = client.post("/predict", json={"model": "credit_risk", "records": [bad]})
    echo(f"unknown category   -> {reply.status_code} {_error(reply)}")
    bad = dict(records[0], credit_amount=-5)
    reply = client.post("/predict", json={"model": "credit_risk", "records": [bad]})
    echo(f"out-of-range value -> {reply.status_code} {_error(reply)}")
    reply = httpx.post(
        str(client.base_url.join("/predict")),
        json={"model": "credit_risk", "records": records[:1]},
        headers={"Authorization": "Bearer not-a-key"},
    )
    echo(f"unknown API key    -> {reply.status_code} {_error(reply)}")

    echo("\n== 6. true outcomes arrive later: POST /feedback")
    reply = client.post(
        "/feedback",
        json={"model": "credit_risk",
              "labels": [{"id": p["id"], "label": y}
                         for p, y in zip(predictions, labels, strict=True)]},
    )  # fmt: skip
    reply.raise_for_status()
    echo(f"accepted {reply.json()['accepted']} labels")

    echo("\n== 7. fairness per protected group: GET /fairness")
    report = client.get("/fairness").raise_for_status().json()
    _show_fairness(report, echo)


def _query_networks(client: httpx.Client, tags: dict[str, str], echo: Any) -> None:
    if "pneumonia" in RECIPES:
        _query_pneumonia(client, tags["pneumonia"], echo)
    if "engine_failure" in RECIPES:
        _query_engine(client, tags["engine_failure"], echo)


def _query_pneumonia(client: httpx.Client, tag: str, echo: Any) -> None:
    echo("\n== 8. pneumonia: chest X-rays as PNGs, explained as maps")
    echo(_served_version(tag, "accuracy", "images"))
    x, y = load_recipe("pneumonia").test_data()
    _score_without_explaining(client, "pneumonia", x[:BATCH_ROWS], y[:BATCH_ROWS], "images", echo)
    # The first test image of each class, as they come.
    shown = [int(np.flatnonzero(y == label)[0]) for label in (0, 1)]
    records = [{"png": _png(x[i])} for i in shown]
    reply = client.post("/predict", json={"model": "pneumonia", "records": records})
    reply.raise_for_status()
    for i, prediction in zip(shown, reply.json()["predictions"], strict=True):
        _show_network(prediction, f"test image {i} (truth {_label('pneumonia', y[i])})", echo)
    patches = np.asarray(prediction["explanation"]["attributions"]["patches"])
    for flat in np.argsort(-np.abs(patches), axis=None)[:3]:
        row, col = np.unravel_index(flat, patches.shape)
        echo(f"    {patches[row, col]:+.3f}  patch row {row}, column {col} (4x4 pixels)")
    bad = client.post("/predict", json={"model": "pneumonia", "records": [x[0][:20].tolist()]})
    echo(f"a 20x28 array instead -> {bad.status_code} {_error(bad)}")


def _query_engine(client: httpx.Client, tag: str, echo: Any) -> None:
    recipe = load_recipe("engine_failure")
    echo("\n== 9. engine_failure: the last 30 cycles of two test engines")
    echo(_served_version(tag, "f1", "engines"))
    x, y = recipe.test_data()
    _score_without_explaining(client, "engine_failure", x, y, "engines", echo)
    rul = recipe.load_test_rul()
    # The engines closest to and furthest from failure (test engines are numbered from 1).
    shown = [int(np.argmin(rul)), int(np.argmax(rul))]
    reply = client.post(
        "/predict", json={"model": "engine_failure", "records": [x[i].tolist() for i in shown]}
    )
    reply.raise_for_status()
    predictions = reply.json()["predictions"]
    for i, prediction in zip(shown, predictions, strict=True):
        truth = _label("engine_failure", y[i])
        what = f"test engine {i + 1}, {rul[i]} cycles from failure (truth {truth})"
        _show_network(prediction, what, echo)
    totals = predictions[0]["explanation"]["attributions"]["totals"]
    for sensor, value in sorted(totals.items(), key=lambda kv: -abs(kv[1]))[:3]:
        echo(f"    {value:+.3f}  {sensor} (all 30 cycles of engine {shown[0] + 1})")
    broken = x[shown[0]].tolist()
    broken[29][0] = float("nan")
    bad = client.post(
        "/predict",
        content=json.dumps({"model": "engine_failure", "records": [broken]}),
        headers={"Content-Type": "application/json"},
    )
    echo(f"a NaN reading instead -> {bad.status_code} {_error(bad)}")


def _score_without_explaining(
    client: httpx.Client, model: str, x: np.ndarray, y: np.ndarray, unit: str, echo: Any
) -> None:
    """Score held-out inputs in batches, attributions off, and say how many were right."""
    labels = []
    for start in range(0, len(x), BATCH_ROWS):
        rows = [row.tolist() for row in x[start : start + BATCH_ROWS]]
        reply = client.post("/predict", json={"model": model, "records": rows, "explain": False})
        reply.raise_for_status()
        labels.extend(p["label"] for p in reply.json()["predictions"])
    names = {truth: _label(model, truth) for truth in (0, 1)}
    right = sum(label == names[int(truth)] for label, truth in zip(labels, y, strict=True))
    echo(f"scored the first {len(x)} test {unit} without attributions: {right} right")


def _served_version(tag: str, figure: str, unit: str) -> str:
    """Which version answers, and its held-out figure from the manifest."""
    stored = bentoml.models.get(tag)
    manifest = json.loads(Path(stored.path_of(MANIFEST_FILE)).read_text())
    test = manifest.get("figures", {}).get("test", {})
    variant = stored.info.labels.get("variant", "")
    figure_text = f"; test {figure} {test[figure]:.3f} on {test['rows']} {unit}" if test else ""
    return f"served by {stored.tag} (the {variant} version{figure_text})"


def _label(model: str, truth: int) -> str:
    output = Policy.from_file(load_recipe(model).POLICY_FILE).output
    return output.positive_label if truth else output.negative_label


def _show_network(prediction: dict, what: str, echo: Any) -> None:
    anomaly = prediction["guards"]["anomaly"]
    explanation = prediction["explanation"]
    echo(
        f"{what}: {prediction['label']} (p={prediction['probability']:.3f}); "
        f"anomaly {anomaly['verdict']}"
    )
    if explanation["status"] != "ok":
        echo(f"    {explanation['method']}: {explanation['status']}")
        return
    total = float(np.sum(explanation["attributions"]["map"]))
    echo(
        f"    {explanation['method']}: base {explanation['base_value']:+.3f} + map total "
        f"{total:+.3f} = {explanation['base_value'] + total:+.3f}, model output "
        f"{explanation['output']:+.3f} (gap {explanation['completeness_gap']:+.1e}, "
        f"tolerance {explanation['tolerance']})"
    )


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _show_prediction(
    index: int, record: dict, prediction: dict, truth: str, policy: Policy, echo: Any
) -> None:
    anomaly = prediction["guards"]["anomaly"]
    score = (
        f", score {anomaly['score']:.2f} / {anomaly['threshold']:.2f}"
        if "score" in anomaly
        else ""
    )
    echo(
        f"applicant {index}: {prediction['label']} (p={prediction['probability']:.3f}, "
        f"truth {truth}); anomaly {anomaly['verdict']}{score}"
    )
    explanation = prediction["explanation"]
    top = sorted(explanation["attributions"].items(), key=lambda kv: -abs(kv[1]))[:3]
    labels = {f.name: getattr(f, "labels", {}) for f in policy.features}
    for name, value in top:
        shown = labels[name].get(record[name], record[name]) if labels[name] else record[name]
        echo(f"    {value:+.3f}  {name} = {shown}")
    base, summed = explanation["base_value"], sum(explanation["attributions"].values())
    echo(
        f"    base {base:+.3f} + attributions {summed:+.3f} = {base + summed:+.4f}, "
        f"model output {explanation['output']:+.4f}"
    )


def _error(reply: httpx.Response) -> str:
    body = reply.json()
    field = body.get("field")
    return f"{body.get('code')} ({field})" if field else str(body.get("code"))


def _show_fairness(report: dict, echo: Any) -> None:
    def fmt(value: float | None) -> str:
        return "   n/a" if value is None else f"{value:6.3f}"

    for model, model_report in report["models"].items():
        for attribute, figures in model_report["attributes"].items():
            echo(f"{model} / {attribute}")
            echo("  group           n  selected  selection rate (95% CI)   TPR")
            for group, g in figures["groups"].items():
                ci = g["selection_rate_ci95"] or [None, None]
                echo(
                    f"  {group:<12} {g['n']:4d}  {g['selected']:8d}  {fmt(g['selection_rate'])}"
                    f" ({fmt(ci[0]).strip()}-{fmt(ci[1]).strip()})"
                    f"   {fmt(g['true_positive_rate'])}"
                )
            echo(
                f"  disparate impact {fmt(figures['disparate_impact_ratio'])}, "
                f"demographic parity diff {fmt(figures['demographic_parity_difference'])}, "
                f"equal opportunity diff {fmt(figures['equal_opportunity_difference'])}"
            )
            for alert in figures["alerts"]:
                value, threshold = alert["value"], alert["threshold"]
                echo(f"  ALERT {alert['metric']} = {value:.3f} (threshold {threshold})")
            if figures["excluded_groups"]:
                echo(f"  too few rows to compare: {', '.join(figures['excluded_groups'])}")
