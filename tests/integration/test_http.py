"""The HTTP API of a real BentoML server on 127.0.0.1, serving the reference model."""

from __future__ import annotations

import json
import math
import socket
import time

import httpx
import numpy as np
import pytest

from guarded_serving.policy import Policy
from guarded_serving.recipes import credit_risk
from guarded_serving.registry import open_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def test_split():
    policy = Policy.from_file(credit_risk.POLICY_FILE)
    _, _, test = credit_risk.split(credit_risk.load_german_credit(), policy)
    return test


@pytest.fixture(scope="module")
def rows(test_split) -> list[dict]:
    return test_split.features.to_dict("records")


def _post(server, path: str, key: str | None, body=None, content: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=content, headers=headers, timeout=30)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=30)


def test_valid_rows_are_answered_with_attributions_that_add_up(
    server, api_keys, rows, credit_model, master_key
):
    reply = _post(server, "/predict", api_keys["alice"], {"records": rows[:40]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert reply.headers["X-Request-ID"] == body["request_id"]
    assert len(body["predictions"]) == 40

    local = open_model(credit_model, master_key)
    margins = local.runtime.predict_margin(local.encoder.encode(rows[:40]))
    for prediction, margin in zip(body["predictions"], margins, strict=True):
        explanation = prediction["explanation"]
        assert explanation["method"] == "tree_shap"
        assert list(explanation["attributions"]) == local.policy.feature_names
        total = explanation["base_value"] + sum(explanation["attributions"].values())
        assert explanation["output_space"] == "log_odds"
        assert explanation["tolerance"] == 1e-5
        assert total == pytest.approx(explanation["output"], abs=explanation["tolerance"])
        assert explanation["output"] == pytest.approx(margin, abs=1e-6)
        assert prediction["probability"] == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-6)
        assert prediction["label"] == ("good" if prediction["probability"] >= 0.5 else "bad")
        assert prediction["guards"]["anomaly"]["verdict"] in ("pass", "flag")


def test_explanations_can_be_turned_off_per_request(server, api_keys, rows):
    reply = _post(server, "/predict", api_keys["alice"], {"records": rows[:2], "explain": False})
    assert reply.status_code == 200
    assert all("explanation" not in p for p in reply.json()["predictions"])


def test_anomalous_row_is_flagged_not_dropped(server, api_keys, rows):
    # Every value is individually valid, but the combination is far from any applicant.
    odd = dict(
        rows[0], duration_months=120, credit_amount=100000, existing_credits=10, num_dependents=10
    )
    reply = _post(server, "/predict", api_keys["alice"], {"records": [rows[1], odd]})
    assert reply.status_code == 200
    body = reply.json()
    assert body["flagged"] is True
    verdicts = [p["guards"]["anomaly"]["verdict"] for p in body["predictions"]]
    assert verdicts == ["pass", "flag"]


@pytest.mark.parametrize(
    ("change", "field", "code"),
    [
        ({"purpose": "A499"}, "records[1].purpose", "unknown_category"),
        ({"savings": None}, "records[1].savings", "missing_field"),
        ({"duration_months": "12"}, "records[1].duration_months", "wrong_type"),
        ({"credit_amount": True}, "records[1].credit_amount", "wrong_type"),
        ({"credit_amount": -5}, "records[1].credit_amount", "out_of_range"),
        ({"installment_rate": 2.5}, "records[1].installment_rate", "not_integer"),
        ({"age": 40}, "records[1].age", "unexpected_field"),
        ({"sex": "female"}, "records[1].sex", "protected_attribute_in_features"),
    ],
)
def test_invalid_input_gets_422_naming_the_field(server, api_keys, rows, change, field, code):
    record = {**rows[0], **change}
    record = {k: v for k, v in record.items() if v is not None}
    reply = _post(server, "/predict", api_keys["alice"], {"records": [rows[1], record]})
    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert (body["field"], body["code"]) == (field, code)
    assert body["request_id"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_get_422(server, api_keys, rows, literal):
    text = json.dumps({"records": [rows[0]]}).replace(
        f'"credit_amount": {rows[0]["credit_amount"]}', f'"credit_amount": {literal}'
    )
    assert literal in text
    reply = _post(server, "/predict", api_keys["alice"], content=text.encode())
    assert reply.status_code == 422, reply.text
    assert (reply.json()["field"], reply.json()["code"]) == (
        "records[0].credit_amount",
        "not_finite",
    )


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"records": []}, "records", "empty"),
        ({"records": {"a": 1}}, "records", "wrong_type"),
        ({}, "records", "missing_field"),
        ({"records": [1]}, "records[0]", "wrong_type"),
        ({"records": "ROWS", "explain": "yes"}, "records", "wrong_type"),
    ],
)
def test_malformed_requests_get_422(server, api_keys, body, field, code):
    reply = _post(server, "/predict", api_keys["alice"], body)
    assert reply.status_code == 422, reply.text
    assert (reply.json()["field"], reply.json()["code"]) == (field, code)


def test_context_is_checked_against_the_policy_groups(server, api_keys, rows):
    body = {"records": rows[:2], "context": [{"sex": "female"}, {"sex": "other"}]}
    reply = _post(server, "/predict", api_keys["alice"], body)
    assert reply.status_code == 422
    assert (reply.json()["field"], reply.json()["code"]) == ("context[1].sex", "unknown_group")


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'{"records": [', b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_gets_400(server, api_keys, content):
    reply = _post(server, "/predict", api_keys["alice"], content=content)
    assert reply.status_code == 400
    assert reply.json()["code"] == "malformed_body"


@pytest.mark.parametrize("key", [None, "gsk_not-a-real-key"])
def test_unknown_or_missing_api_key_gets_401(server, rows, key):
    reply = _post(server, "/predict", key, {"records": rows[:1]})
    assert reply.status_code == 401
    assert reply.json()["code"] == "unauthenticated"
    assert "predictions" not in reply.json()


def test_past_the_client_budget_gets_429_with_retry_after(server, api_keys, rows):
    tiny = api_keys["tiny"]  # 3 rows per window
    assert _post(server, "/predict", tiny, {"records": rows[:2]}).status_code == 200
    assert _post(server, "/predict", tiny, {"records": rows[:1]}).status_code == 200
    reply = _post(server, "/predict", tiny, {"records": rows[:1]})
    assert reply.status_code == 429
    assert reply.json()["code"] == "rate_limited"
    assert 1 <= int(reply.headers["Retry-After"]) <= 60
    # Another client's budget is untouched.
    assert _post(server, "/predict", api_keys["bob"], {"records": rows[:1]}).status_code == 200


def test_batch_over_the_policy_limit_gets_422(server, api_keys, rows):
    reply = _post(server, "/predict", api_keys["bob"], {"records": rows[:1] * 257})
    assert reply.status_code == 422
    assert (reply.json()["field"], reply.json()["code"]) == ("records", "batch_too_large")


def test_unknown_model_gets_404(server, api_keys, rows):
    reply = _post(server, "/predict", api_keys["alice"], {"model": "nope", "records": rows[:1]})
    assert reply.status_code == 404
    assert (reply.json()["field"], reply.json()["code"]) == ("model", "unknown_model")


def test_feedback_rejects_bad_labels_and_reports_unknown_ids(server, api_keys, rows):
    predicted = _post(server, "/predict", api_keys["alice"], {"records": rows[:2]}).json()
    ids = [p["id"] for p in predicted["predictions"]]
    bad = _post(
        server,
        "/feedback",
        api_keys["alice"],
        {"labels": [{"id": ids[0], "label": "good"}, {"id": ids[1], "label": "maybe"}]},
    )
    assert bad.status_code == 422
    assert (bad.json()["field"], bad.json()["code"]) == ("labels[1].label", "unknown_label")

    for body, field, code in (
        ({}, "labels", "missing_field"),
        ({"labels": []}, "labels", "empty"),
        ({"labels": {"id": ids[0]}}, "labels", "wrong_type"),
    ):
        refused = _post(server, "/feedback", api_keys["alice"], body)
        assert (refused.status_code, refused.json()["field"]) == (422, field)
        assert refused.json()["code"] == code
        assert refused.json()["errors"][0]["code"] == code
    for entry, field, code in (
        ({"id": "missing-0", "label": "bad"}, "labels[0].id", "wrong_type"),
        ({"id": ids[0], "label": "good", "sex": "female"}, "labels[0]", "unexpected_field"),
    ):
        refused = _post(server, "/feedback", api_keys["alice"], {"labels": [entry]})
        assert refused.status_code == 422
        assert (refused.json()["field"], refused.json()["code"]) == (field, code)

    unknown = "0" * 32 + "-0"
    good = _post(
        server,
        "/feedback",
        api_keys["alice"],
        {
            "labels": [
                {"id": ids[0], "label": "good"},
                {"id": unknown, "label": "bad"},
                {"id": unknown, "label": "good"},
            ]
        },
    )
    assert good.status_code == 200
    assert good.json()["accepted"] == 1
    assert good.json()["unknown_ids"] == [unknown]
    again = _post(
        server, "/feedback", api_keys["alice"], {"labels": [{"id": ids[0], "label": "bad"}]}
    )
    assert again.json()["already_labelled_ids"] == [ids[0]]


def test_readiness_and_model_status(server, credit_model, api_keys):
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.get(server.url + "/models").status_code == 401
    reply = httpx.get(
        server.url + "/models", headers={"Authorization": f"Bearer {api_keys['alice']}"}
    )
    status = reply.json()
    assert status.pop("request_id") == reply.headers["X-Request-ID"]
    assert status == {
        "ready": True,
        "models": [
            {
                "model": "credit_risk",
                "version": credit_model.split(":")[1],
                "ready": True,
                "reason": None,
            }
        ],
    }


def test_fairness_needs_a_key_and_names_its_request(server, api_keys):
    assert httpx.get(server.url + "/fairness").status_code == 401
    reply = httpx.get(
        server.url + "/fairness", headers={"Authorization": f"Bearer {api_keys['alice']}"}
    )
    assert reply.json()["request_id"] == reply.headers["X-Request-ID"]


def test_margins_are_deterministic_across_requests(server, api_keys, rows):
    first = _post(server, "/predict", api_keys["alice"], {"records": rows[:5]}).json()
    second = _post(server, "/predict", api_keys["alice"], {"records": rows[:5]}).json()
    assert np.allclose(
        [p["probability"] for p in first["predictions"]],
        [p["probability"] for p in second["predictions"]],
    )


@pytest.mark.parametrize(
    ("content_type", "status", "code"),
    [
        ("text/plain", 415, "unsupported_media_type"),
        ("multipart/form-data", 415, "unsupported_media_type"),
        ("application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        ("application/vnd.bentoml+pickle", 415, "unsupported_media_type"),
    ],
)
def test_only_json_bodies_are_parsed(server, api_keys, content_type, status, code):
    reply = httpx.post(
        server.url + "/predict",
        content=b"records=1",
        headers={"Authorization": f"Bearer {api_keys['alice']}", "Content-Type": content_type},
    )
    assert (reply.status_code, reply.json()["code"]) == (status, code)
    assert reply.json()["request_id"] == reply.headers["X-Request-ID"]


def _nested(depth: int) -> bytes:
    return b'{"records": ' + b"[" * depth + b"0.5" + b"]" * depth + b"}"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"  ",
        "\ufeff".encode() + b'{"records": []}',  # a UTF-8 byte-order mark
        '{"records": []}'.encode("utf-16"),
        _nested(40),
        _nested(500),
        b'{"model": "\\ud800", "records": []}',  # an unpaired surrogate escape
        b'{"records": [{"\\udfff": 1}]}',
        # Numbers longer than any float needs: Python reads some, BentoML's parser not.
        b'{"explain": 1' + b"0" * 4300 + b"e-4300}",
        b'{"labels": [{"id": "x", "label": ' + b"9" * 4301 + b".0}]}",
        b'{"explain": ' + b"1" * 4301 + b"}",
    ],
)
def test_bodies_the_frameworks_parser_would_choke_on_get_400_and_no_traceback(
    server, api_keys, content
):
    logged = len(server.log())

    reply = _post(server, "/predict", api_keys["alice"], content=content)

    assert reply.status_code == 400, reply.text
    assert reply.json()["code"] == "malformed_body"
    assert "Traceback" not in server.log()[logged:]


def test_nesting_a_tensor_needs_is_parsed(server, api_keys):
    # Depth 10 is well past any declared input, yet within the gate's limit.
    reply = _post(server, "/predict", api_keys["alice"], content=_nested(10))
    assert reply.status_code == 422
    assert reply.json()["code"] == "wrong_type"


def test_a_declared_length_over_the_limit_is_refused_before_the_body(server, api_keys):
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api_keys['alice']}\r\nContent-Length: 3000000\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"rec')
        answer = b""
        while b"}" not in answer:  # the whole JSON envelope, however it is split
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    answer = answer.decode("latin-1")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "body_too_large" in answer


@pytest.mark.parametrize(
    "path", ["/predict/", "/feedback/", "/models/", "/fairness/", "/livez/", "/readyz/?next=1"]
)
def test_routes_with_a_trailing_slash_are_not_redirected(server, api_keys, path):
    headers = {"Authorization": f"Bearer {api_keys['alice']}", "Host": "evil.example"}
    reply = httpx.request(
        "POST" if path in ("/predict/", "/feedback/") else "GET",
        server.url + path,
        headers=headers,
        json={},
    )
    assert (reply.status_code, reply.json()["code"]) == (404, "not_found")
    assert "location" not in reply.headers


def test_a_body_without_a_content_type_gets_415(server, api_keys, rows):
    reply = httpx.post(
        server.url + "/predict",
        content=json.dumps({"records": rows[:1]}).encode(),
        headers={"Authorization": f"Bearer {api_keys['alice']}"},
    )
    assert (reply.status_code, reply.json()["code"]) == (415, "unsupported_media_type")
    plain = httpx.post(
        server.url + "/predict",
        json={"records": rows[:1]},
        headers={"Authorization": f"Bearer {api_keys['alice']}", "Content-Encoding": ""},
    )
    assert plain.status_code == 200


def test_a_request_path_cannot_forge_access_log_lines(server):
    logged = len(server.log())
    forged = "2026-01-01T00:00:00+0000 [ERROR] [entry_service:guarded_serving:1] forged"

    httpx.get(server.url + "/x%0A" + forged.replace(" ", "%20") + "%1b[31m")

    # The access log line is written just after the answer is sent: wait for it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        new_lines = server.log()[logged:].splitlines()
        if any("forged" in line for line in new_lines):
            break
        time.sleep(0.1)
    assert not any(line.startswith("2026-01-01") for line in new_lines)
    assert any("\\x0a2026-01-01" in line and "\\x1b" in line for line in new_lines)


def test_oversized_body_gets_413(server, api_keys):
    body = b'{"records": [], "pad": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    reply = _post(server, "/predict", api_keys["alice"], content=body)
    assert (reply.status_code, reply.json()["code"]) == (413, "body_too_large")


def test_unknown_top_level_field_gets_422(server, api_keys, rows):
    body = {"records": rows[:1], "contxt": [{"sex": "female"}]}
    reply = _post(server, "/predict", api_keys["alice"], body)
    assert reply.status_code == 422
    assert (reply.json()["field"], reply.json()["code"]) == ("contxt", "unexpected_field")
    reply = _post(server, "/feedback", api_keys["alice"], {"lables": []})
    assert (reply.json()["field"], reply.json()["code"]) == ("lables", "unexpected_field")


def test_made_up_field_names_are_not_echoed(server, api_keys, rows):
    odd = "<script>" + "x" * 10_000
    reply = _post(server, "/predict", api_keys["alice"], {"records": [{**rows[0], odd: 1}]})
    assert reply.status_code == 422
    assert (reply.json()["field"], reply.json()["code"]) == ("records[0]", "unexpected_field")
    assert "script" not in reply.text


@pytest.mark.parametrize("value", [1, True, [], {}])
def test_model_of_the_wrong_type_gets_422(server, api_keys, rows, value):
    reply = _post(server, "/predict", api_keys["alice"], {"model": value, "records": rows[:1]})
    assert (reply.status_code, reply.json()["field"], reply.json()["code"]) == (
        422,
        "model",
        "wrong_type",
    )


def test_401_names_the_scheme_and_other_schemes_are_refused(server, api_keys, rows):
    reply = httpx.post(
        server.url + "/predict",
        json={"records": rows[:1]},
        headers={"Authorization": f"Token {api_keys['alice']}"},
    )
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    via_header = httpx.post(
        server.url + "/predict",
        json={"records": rows[:1]},
        headers={"X-API-Key": api_keys["alice"]},
    )
    assert via_header.status_code == 200


def test_framework_errors_use_the_same_envelope(server):
    missing = httpx.get(server.url + "/no-such-path")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    assert missing.json()["request_id"] == missing.headers["X-Request-ID"]
    wrong_method = httpx.get(server.url + "/predict")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["code"] == "method_not_allowed"
