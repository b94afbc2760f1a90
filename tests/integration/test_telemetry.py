"""Spans and fairness metrics reach a real OTLP receiver from a real server."""

from __future__ import annotations

import httpx
import pytest

from guarded_serving.local_server import LocalServer
from guarded_serving.policy import Policy
from guarded_serving.recipes import credit_risk
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.integration

STAGES = ["identify", "admit", "validate", "anomaly", "predict", "explain", "record"]


def test_spans_and_fairness_metrics_arrive(server_env, api_keys, tmp_path):
    policy = Policy.from_file(credit_risk.POLICY_FILE)
    _, _, test = credit_risk.split(credit_risk.load_german_credit(), policy)
    with OtlpReceiver() as receiver:
        env = server_env(
            tmp_path,
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_EXPORTER_OTLP_INSECURE="true",
            OTEL_SERVICE_NAME="credit-scoring",
            OTEL_BSP_SCHEDULE_DELAY="100",
            OTEL_METRIC_EXPORT_INTERVAL="300",
        )
        with LocalServer(env=env, cwd=tmp_path) as server:
            reply = httpx.post(
                server.url + "/predict",
                json={
                    "records": test.features.to_dict("records")[:4],
                    "context": test.context.to_dict("records")[:4],
                },
                headers={"Authorization": f"Bearer {api_keys['alice']}"},
            )
            assert reply.status_code == 200
            request_id = reply.json()["request_id"]

            def request_spans(r: OtlpReceiver) -> list:
                roots = [
                    s
                    for s in r.spans()
                    if s.name == "guarded_serving.request"
                    and s.attributes.get("guarded_serving.request_id") == request_id
                ]
                if not roots:
                    return []
                root = roots[0]
                children = [s for s in r.spans() if s.parent_span_id == root.span_id]
                return [root, *children] if len(children) == len(STAGES) else []

            assert receiver.wait_for(lambda r: bool(request_spans(r)), timeout_s=15)
            root, *children = request_spans(receiver)
            assert root.parent_span_id == ""
            assert root.resource_attributes["service.name"] == "credit-scoring"
            assert root.attributes["guarded_serving.outcome"] in ("served", "flagged")
            assert {c.trace_id for c in children} == {root.trace_id}
            ordered = sorted(children, key=lambda s: s.start_time_unix_nano)
            assert [c.attributes["guarded_serving.stage"] for c in ordered] == STAGES
            assert [c.name for c in ordered] == [f"guarded_serving.stage.{s}" for s in STAGES]
            assert all(
                c.attributes["guarded_serving.verdict"] in ("pass", "flag") for c in ordered
            )

            def fairness_points(r: OtlpReceiver) -> dict:
                return {
                    (p.attributes.get("attribute"), p.attributes.get("group")): p.value
                    for p in r.latest_points("guarded_serving.fairness.predictions")
                }

            expected = {}
            for row in test.context.to_dict("records")[:4]:
                for attribute, group in row.items():
                    expected[(attribute, group)] = expected.get((attribute, group), 0) + 1
            assert receiver.wait_for(
                lambda r: all(fairness_points(r).get(k) == v for k, v in expected.items()),
                timeout_s=15,
            ), fairness_points(receiver)
            rates = receiver.latest_points("guarded_serving.fairness.selection_rate")
            assert {p.attributes["model"] for p in rates} == {"credit_risk"}
            assert receiver.latest_points("guarded_serving.requests")
