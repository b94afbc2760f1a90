"""Tests for the loopback OTLP receiver, fed by the real OpenTelemetry SDK exporters."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.otlp_receiver import OtlpReceiver, ReceivedPoint, span_by_name

RESOURCE = Resource.create(
    {"service.name": "guarded-serving-test", "deployment.environment": "ci"}
)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def _wait_for_threads_to_end(before: set[threading.Thread], timeout_s: float = 3.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        extra = {t for t in threading.enumerate() if t not in before and t.is_alive()}
        if not extra or time.monotonic() >= deadline:
            return {t.name for t in extra}
        time.sleep(0.02)


def test_endpoint_is_loopback_with_a_chosen_port(receiver: OtlpReceiver) -> None:
    assert receiver.endpoint.startswith("http://127.0.0.1:")
    assert receiver.port > 0
    assert receiver.spans() == []
    assert receiver.metric_points() == []


def test_spans_arrive_with_parent_link_attributes_and_status(receiver: OtlpReceiver) -> None:
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
    )
    tracer = provider.get_tracer("guarded_serving")
    try:
        with tracer.start_as_current_span(
            "pipeline", kind=SpanKind.SERVER, attributes={"model": "credit", "batch": 3}
        ) as parent:
            with tracer.start_as_current_span(
                "guard.anomaly", attributes={"verdict": "flag", "score": 0.75, "ok": False}
            ) as child:
                child.add_event("threshold.crossed")
                child.set_status(Status(StatusCode.ERROR, "flagged"))
            parent.set_attribute("stages", ["anomaly", "predict"])
        parent_ctx, child_ctx = parent.get_span_context(), child.get_span_context()

        assert receiver.wait_for(lambda r: len(r.spans()) >= 2, timeout_s=5.0)
    finally:
        provider.shutdown()

    spans = receiver.spans()
    root = span_by_name(spans, "pipeline")
    guard = span_by_name(spans, "guard.anomaly")
    assert root.parent_span_id == ""
    assert root.span_id == f"{parent_ctx.span_id:016x}"
    assert root.trace_id == f"{parent_ctx.trace_id:032x}"
    assert guard.span_id == f"{child_ctx.span_id:016x}"
    assert guard.parent_span_id == root.span_id
    assert guard.trace_id == root.trace_id
    assert root.attributes == {"model": "credit", "batch": 3, "stages": ["anomaly", "predict"]}
    assert guard.attributes == {"verdict": "flag", "score": 0.75, "ok": False}
    assert root.kind == "SERVER"
    assert guard.kind == "INTERNAL"
    assert (root.status_code, guard.status_code) == ("UNSET", "ERROR")
    assert guard.status_message == "flagged"
    assert guard.event_names == ("threshold.crossed",)
    assert guard.scope_name == "guarded_serving"
    assert root.resource_attributes["service.name"] == "guarded-serving-test"
    assert root.resource_attributes["deployment.environment"] == "ci"
    assert guard.duration_ns >= 0


def _latest(receiver: OtlpReceiver, name: str, **attributes: object) -> ReceivedPoint | None:
    for point in receiver.latest_points(name):
        if point.attributes == attributes:
            return point
    return None


def test_metric_points_arrive_for_counter_gauge_and_histogram(receiver: OtlpReceiver) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=receiver.endpoint, insecure=True),
        export_interval_millis=100,
    )
    provider = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    meter = provider.get_meter("guarded_serving")
    queue_depth = {"value": 7}

    def observe_queue(options: CallbackOptions) -> list[Observation]:
        return [Observation(queue_depth["value"], {"queue": "fairness"})]

    try:
        counter = meter.create_counter("gs.requests", unit="{request}")
        meter.create_observable_gauge("gs.queue.depth", callbacks=[observe_queue])
        latency = meter.create_histogram("gs.latency", unit="ms")
        counter.add(2, {"model": "credit", "verdict": "pass"})
        counter.add(1, {"model": "credit", "verdict": "reject"})
        counter.add(3, {"model": "credit", "verdict": "pass"})
        for value_ms in (4.0, 12.0, 30.0):
            latency.record(value_ms, {"model": "credit"})

        def arrived(r: OtlpReceiver) -> bool:
            passed = _latest(r, "gs.requests", model="credit", verdict="pass")
            return passed is not None and passed.value == 5 and bool(r.latest_points("gs.latency"))

        assert receiver.wait_for(arrived, timeout_s=5.0)
        queue_depth["value"] = 11
        assert receiver.wait_for(
            lambda r: (
                (p := _latest(r, "gs.queue.depth", queue="fairness")) is not None and p.value == 11
            ),
            timeout_s=5.0,
        )
    finally:
        provider.shutdown()

    passed = _latest(receiver, "gs.requests", model="credit", verdict="pass")
    rejected = _latest(receiver, "gs.requests", model="credit", verdict="reject")
    assert passed is not None and rejected is not None
    assert (passed.kind, passed.value, rejected.value) == ("sum", 5, 1)
    assert passed.is_monotonic is True
    assert passed.unit == "{request}"
    assert passed.scope_name == "guarded_serving"
    assert passed.resource_attributes["service.name"] == "guarded-serving-test"

    gauge = _latest(receiver, "gs.queue.depth", queue="fairness")
    assert gauge is not None
    assert (gauge.kind, gauge.value) == ("gauge", 11)

    histogram = _latest(receiver, "gs.latency", model="credit")
    assert histogram is not None
    assert histogram.kind == "histogram"
    assert (histogram.count, histogram.sum, histogram.value) == (3, 46.0, None)
    assert sum(histogram.bucket_counts) == 3
    assert len(histogram.bucket_counts) == len(histogram.explicit_bounds) + 1


def test_wait_for_times_out(receiver: OtlpReceiver) -> None:
    started = time.monotonic()

    assert not receiver.wait_for(lambda r: bool(r.spans()), timeout_s=0.1)
    assert time.monotonic() - started < 2.0


def test_clear_forgets_what_was_received(receiver: OtlpReceiver) -> None:
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
    )
    try:
        with provider.get_tracer("t").start_as_current_span("one"):
            pass
        assert receiver.wait_for(lambda r: len(r.spans()) == 1, timeout_s=5.0)
    finally:
        provider.shutdown()

    receiver.clear()

    assert receiver.spans() == []
    assert receiver.trace_requests == []


def test_start_and_stop_leave_no_threads_behind() -> None:
    before = set(threading.enumerate())
    receiver = OtlpReceiver().start()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
    )
    with provider.get_tracer("t").start_as_current_span("one"):
        pass
    assert receiver.wait_for(lambda r: len(r.spans()) == 1, timeout_s=5.0)

    provider.shutdown()
    receiver.stop()

    assert _wait_for_threads_to_end(before) == set()
    with pytest.raises(RuntimeError):
        receiver.start().start()
    receiver.stop()
