"""Traces and metrics, configured by the standard ``OTEL_*`` environment variables.

The server keeps its own tracer and meter providers (not the global ones, which
BentoML manages), and exports over OTLP/gRPC when an OTLP endpoint is configured:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._TRACES_ENDPOINT`` and
``..._METRICS_ENDPOINT``), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_METRIC_EXPORT_INTERVAL``, ``OTEL_BSP_SCHEDULE_DELAY``; ``OTEL_SDK_DISABLED=true``
or ``OTEL_TRACES_EXPORTER=none`` / ``OTEL_METRICS_EXPORTER=none`` switch a signal off.
Without an endpoint both are no-ops and cost next to nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping

from opentelemetry import metrics, trace

logger = logging.getLogger(__name__)

METER_NAME = "guarded_serving"
TRACER_NAME = "guarded_serving"


def _enabled(signal: str) -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


class Telemetry:
    """The server's tracer and meter, and their shutdown."""

    def __init__(self, service_name: str = "guarded-serving") -> None:
        self._tracer_provider = None
        self._meter_provider = None
        resource = None
        if _enabled("TRACES") or _enabled("METRICS"):
            from opentelemetry.sdk.resources import Resource

            # Reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours only fills a gap.
            resource = Resource.create()
            if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
                resource = resource.merge(Resource({"service.name": service_name}))

        if _enabled("TRACES"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            self._tracer_provider = TracerProvider(resource=resource)
            self._tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            self.tracer: trace.Tracer = self._tracer_provider.get_tracer(TRACER_NAME)
            logger.info("exporting traces over OTLP", extra={"event": "telemetry.traces"})
        else:
            self.tracer = trace.NoOpTracer()

        if _enabled("METRICS"):
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            reader = PeriodicExportingMetricReader(OTLPMetricExporter())
            self._meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
            self.meter: metrics.Meter = self._meter_provider.get_meter(METER_NAME)
            logger.info("exporting metrics over OTLP", extra={"event": "telemetry.metrics"})
        else:
            self.meter = metrics.NoOpMeter(METER_NAME)

        self.requests = self.meter.create_counter(
            "guarded_serving.requests", unit="{request}", description="Scoring requests by outcome"
        )
        self.rows = self.meter.create_counter(
            "guarded_serving.rows", unit="{row}", description="Rows scored"
        )
        self.verdicts = self.meter.create_counter(
            "guarded_serving.guard.verdicts",
            unit="{verdict}",
            description="Stage verdicts by stage and outcome",
        )
        self.explanations = self.meter.create_counter(
            "guarded_serving.explanations",
            unit="{row}",
            description="Explained rows by model and status (ok, skipped_time_budget, failed)",
        )
        self.duration = self.meter.create_histogram(
            "guarded_serving.request.duration", unit="s", description="Time in the pipeline"
        )

    def count_request(self, attributes: Mapping[str, str], rows: int, duration_s: float) -> None:
        self.requests.add(1, attributes)
        if rows:
            self.rows.add(rows, {"model": attributes.get("model", "")})
        self.duration.record(duration_s, attributes)

    def shutdown(self) -> None:
        for provider in (self._tracer_provider, self._meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:
                    logger.warning("telemetry shutdown failed", exc_info=True)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``extra`` fields."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ControlCharacterFilter(logging.Filter):
    """Escape control characters (line breaks, terminal escapes, NUL) in a record's
    arguments, so that text a client chose, such as a request path in BentoML's
    access log, cannot forge or hide log lines."""

    _CONTROL = re.compile(r"[\x00-\x1f\x7f]")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._CONTROL.sub(_escape, a) if isinstance(a, str) else a for a in record.args
            )
        return True


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match[0]):02x}"


def install_json_logging(level: int = logging.INFO) -> None:
    """Send this package's logs to stderr as JSON lines, and escape control characters
    in BentoML's access log; for server entry points only."""
    access = logging.getLogger("bentoml.access")
    if not any(isinstance(f, ControlCharacterFilter) for f in access.filters):
        access.addFilter(ControlCharacterFilter())
    package = logging.getLogger(METER_NAME)
    if any(isinstance(h.formatter, JsonLogFormatter) for h in package.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False
