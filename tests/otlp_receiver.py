"""A real OTLP/gRPC receiver on loopback, for tests of the telemetry stage.

It implements the collector's trace and metrics services from ``opentelemetry-proto``
on ``127.0.0.1`` at a port the OS picks, keeps every export request it receives, and
offers them flattened into spans and metric points, so tests can check what an
unmodified OTLP exporter really sent over the wire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

logger = logging.getLogger(__name__)

__all__ = ["OtlpReceiver", "ReceivedPoint", "ReceivedSpan", "span_by_name"]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver got it; ids are lowercase hex."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    """Empty for a root span."""
    attributes: dict[str, Any]
    resource_attributes: dict[str, Any]
    status_code: str
    """``"UNSET"``, ``"OK"`` or ``"ERROR"``."""
    status_message: str = ""
    kind: str = "INTERNAL"
    """``"INTERNAL"``, ``"SERVER"``, ``"CLIENT"``, ``"PRODUCER"`` or ``"CONSUMER"``."""
    scope_name: str = ""
    event_names: tuple[str, ...] = ()
    duration_ns: int = 0
    start_time_unix_nano: int = 0


@dataclass(frozen=True)
class ReceivedPoint:
    """One data point of one metric as the receiver got it."""

    name: str
    kind: str
    """``"gauge"``, ``"sum"``, ``"histogram"``, ``"exponential_histogram"`` or ``"summary"``."""
    attributes: dict[str, Any]
    value: float | int | None = None
    """The point's value for gauges and sums; None for the other kinds."""
    count: int | None = None
    """The number of observations, for histograms and summaries."""
    sum: float | None = None
    """The sum of observations, for histograms and summaries."""
    bucket_counts: tuple[int, ...] = ()
    explicit_bounds: tuple[float, ...] = ()
    is_monotonic: bool | None = None
    """For sums: whether the sum only grows."""
    unit: str = ""
    resource_attributes: dict[str, Any] = field(default_factory=dict)
    scope_name: str = ""


def _any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _any_value(pair.value) for pair in pairs}


def _number(point: Any) -> float | int | None:
    which = point.WhichOneof("value")
    return None if which is None else getattr(point, which)


def _status_name(code: int) -> str:
    return trace_pb2.Status.StatusCode.Name(code).removeprefix("STATUS_CODE_")


def _kind_name(kind: int) -> str:
    return trace_pb2.Span.SpanKind.Name(kind).removeprefix("SPAN_KIND_")


def _flatten_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes),
                        resource_attributes=dict(resource),
                        status_code=_status_name(span.status.code),
                        status_message=span.status.message,
                        kind=_kind_name(span.kind),
                        scope_name=scope_spans.scope.name,
                        event_names=tuple(event.name for event in span.events),
                        duration_ns=span.end_time_unix_nano - span.start_time_unix_nano,
                        start_time_unix_nano=span.start_time_unix_nano,
                    )
                )
    return spans


def _metric_points(metric: metrics_pb2.Metric) -> list[dict[str, Any]]:
    which = metric.WhichOneof("data")
    if which == "gauge":
        return [
            {"kind": "gauge", "point": p, "value": _number(p)} for p in metric.gauge.data_points
        ]
    if which == "sum":
        return [
            {
                "kind": "sum",
                "point": p,
                "value": _number(p),
                "is_monotonic": metric.sum.is_monotonic,
            }
            for p in metric.sum.data_points
        ]
    if which == "histogram":
        return [
            {
                "kind": "histogram",
                "point": p,
                "count": p.count,
                "sum": p.sum if p.HasField("sum") else None,
                "bucket_counts": tuple(p.bucket_counts),
                "explicit_bounds": tuple(p.explicit_bounds),
            }
            for p in metric.histogram.data_points
        ]
    if which == "exponential_histogram":
        return [
            {
                "kind": "exponential_histogram",
                "point": p,
                "count": p.count,
                "sum": p.sum if p.HasField("sum") else None,
            }
            for p in metric.exponential_histogram.data_points
        ]
    if which == "summary":
        return [
            {"kind": "summary", "point": p, "count": p.count, "sum": p.sum}
            for p in metric.summary.data_points
        ]
    return []


def _flatten_points(
    request: metrics_service_pb2.ExportMetricsServiceRequest,
) -> list[ReceivedPoint]:
    points = []
    for resource_metrics in request.resource_metrics:
        resource = _attributes(resource_metrics.resource.attributes)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for entry in _metric_points(metric):
                    point = entry.pop("point")
                    points.append(
                        ReceivedPoint(
                            name=metric.name,
                            attributes=_attributes(point.attributes),
                            unit=metric.unit,
                            resource_attributes=dict(resource),
                            scope_name=scope_metrics.scope.name,
                            **entry,
                        )
                    )
    return points


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(  # noqa: N802 - the gRPC method name is fixed by the service definition
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver._store_traces(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(  # noqa: N802 - the gRPC method name is fixed by the service definition
        self,
        request: metrics_service_pb2.ExportMetricsServiceRequest,
        context: grpc.ServicerContext,
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._receiver._store_metrics(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC trace and metrics receiver on ``127.0.0.1``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`::

        with OtlpReceiver() as receiver:
            exporter = OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)
            ...
            assert receiver.wait_for(lambda r: len(r.spans()) == 2)

    Args:
        max_workers: Threads serving export calls.
    """

    def __init__(self, *, max_workers: int = 4) -> None:
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._executor: futures.ThreadPoolExecutor | None = None
        self._server: grpc.Server | None = None
        self._port: int | None = None

    def start(self) -> OtlpReceiver:
        """Bind a free loopback port and start serving.

        Returns:
            The receiver itself.

        Raises:
            RuntimeError: The receiver is already running, or no port could be bound.
        """
        if self._server is not None:
            raise RuntimeError("the OTLP receiver is already running")
        executor = futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="otlp-receiver"
        )
        server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            executor.shutdown(wait=False)
            raise RuntimeError("the OTLP receiver could not bind a port on 127.0.0.1")
        server.start()
        self._executor, self._server, self._port = executor, server, port
        logger.debug("OTLP receiver listening on 127.0.0.1:%d", port)
        return self

    def stop(self, grace_s: float | None = 0.5) -> None:
        """Stop serving and release the port and the worker threads.

        Args:
            grace_s: How long calls in progress may take to finish.
        """
        server, executor = self._server, self._executor
        self._server = self._executor = None
        if server is not None:
            server.stop(grace_s).wait()
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the receiver is bound to."""
        if self._port is None:
            raise RuntimeError("the OTLP receiver has not been started")
        return self._port

    @property
    def endpoint(self) -> str:
        """The URL to give an OTLP/gRPC exporter, such as ``http://127.0.0.1:4317``."""
        return f"http://127.0.0.1:{self.port}"

    def _store_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self._trace_requests.append(request)

    def _store_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self._lock:
            self._metric_requests.append(request)

    @property
    def trace_requests(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        """Every trace export request received so far, in arrival order."""
        with self._lock:
            return list(self._trace_requests)

    @property
    def metric_requests(self) -> list[metrics_service_pb2.ExportMetricsServiceRequest]:
        """Every metrics export request received so far, in arrival order."""
        with self._lock:
            return list(self._metric_requests)

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, flattened, in arrival order."""
        return [span for request in self.trace_requests for span in _flatten_spans(request)]

    def metric_points(self) -> list[ReceivedPoint]:
        """Every metric data point received so far, flattened, in arrival order.

        A periodic reader exports cumulative points again at every interval, so the same
        series usually appears several times; :meth:`latest_points` keeps the last one.
        """
        return [point for request in self.metric_requests for point in _flatten_points(request)]

    def latest_points(self, name: str) -> list[ReceivedPoint]:
        """Return the most recent point of each attribute set of the metric ``name``."""
        latest: dict[tuple[tuple[str, str], ...], ReceivedPoint] = {}
        for point in self.metric_points():
            if point.name == name:
                key = tuple(sorted((k, repr(v)) for k, v in point.attributes.items()))
                latest[key] = point
        return list(latest.values())

    def clear(self) -> None:
        """Forget everything received so far."""
        with self._lock:
            self._trace_requests.clear()
            self._metric_requests.clear()

    def wait_for(
        self,
        predicate: Callable[[OtlpReceiver], bool],
        timeout_s: float = 10.0,
        *,
        interval_s: float = 0.02,
    ) -> bool:
        """Poll until ``predicate(self)`` is true.

        Args:
            predicate: Inspects the receiver, usually its spans or metric points.
            timeout_s: How long to wait before giving up.
            interval_s: The pause between polls.

        Returns:
            Whether the predicate became true before the timeout.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval_s)


def span_by_name(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    """Return the one span called ``name``; fail if there is none or several."""
    matches = [span for span in spans if span.name == name]
    if len(matches) != 1:
        raise AssertionError(f"expected one span named {name!r}, found {len(matches)}")
    return matches[0]
