"""OpenTelemetry traces of executions, built after commit and exported over OTLP/HTTP.

Off unless `trace_sample` > 0. Then the settle loop hands every committed
change to `Tracing.committed`, which for an unsampled execution returns at
once (daemon/trace_context.py `sampled`: a slice of its id and a comparison).
For a sampled one it

- puts the call's traceparent on each action request the change carries out
  (daemon/effects.py sends it as a JetStream header, or hands it to an
  in-process action: the webhook sends it as an HTTP header), so a
  provider's spans join the trace;
- builds the spans this commit closed (daemon/trace_spans.py) from the
  committed transitions: an enrolment's are in memory; a later commit's
  history is read back from the ledger, off the commit path, since its
  open step may have started on another worker or before a restart;
- hands them to the OpenTelemetry SDK's batch processor and OTLP/HTTP exporter,
  which export from a thread of their own.

The OpenTelemetry packages (the `ordo[otel]` extra) are imported only here and
only when tracing is on: the engine runs without them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import orjson
from prometheus_client import Counter

from ledger import history

from . import logs
from .trace_context import format_traceparent, place_of, span_id, threshold_of, trace_of
from .trace_spans import Execution, Span, Transition, closed_spans

log = logging.getLogger("ordo.tracing")

spans_exported = Counter("ordo_trace_spans_total", "Spans of sampled executions handed to the OTLP exporter.")
spans_dropped = Counter(
    "ordo_trace_spans_dropped_total",
    "Commits of sampled executions whose spans were not built (history reads backed up or failed), "
    "and spans not delivered: dropped with the exporter's queue full, or refused or not answered by "
    "the collector.",
)

#: History reads of sampled executions in flight past which a commit's spans are dropped, not queued.
MOST_PENDING_READS = 256
#: Spans the exporter queues before it drops (its default, 2,048, overflows at 10% of a 10,000/s burst).
MOST_QUEUED_SPANS = 32_768
#: Where the OTLP/HTTP exporter posts, under `otlp_endpoint`.
TRACES_PATH = "/v1/traces"


class _QueueFullOncePerMinute(logging.Filter):
    """The SDK logs a warning for every span it drops with its queue full: with the collector away that
    is hundreds a second. Let one through a minute; count them all (spans_dropped)."""

    def __init__(self):
        super().__init__()
        self._next_at = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Queue full"):
            return True
        spans_dropped.inc()
        now = time.monotonic()
        if now < self._next_at:
            return False
        self._next_at = now + 60.0
        return True


class _CountingExporter:
    """An exporter that counts the spans it could not deliver (the SDK only logs them)."""

    def __init__(self, exporter, success):
        self._exporter = exporter
        self._success = success

    def export(self, spans):
        result = self._exporter.export(spans)
        if result != self._success:
            spans_dropped.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def _hashed_once(resource_class):
    """A Resource whose hash is worked out once: the exporter groups every span by its resource, and
    the SDK's Resource hashes by JSON-encoding its attributes each time (most of the export's CPU)."""

    class HashedOnce(resource_class):
        def __init__(self, attributes, schema_url=None):
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

        def __eq__(self, other: object) -> bool:
            return self is other or super().__eq__(other)

    return HashedOnce


@dataclass(slots=True)
class _Commit:
    """The commit whose spans are built: its transitions' seqs, how it left the execution, when."""

    first_seq: int
    last_seq: int
    finished: bool
    status: str
    commit_ns: int


class TracingUnavailable(RuntimeError):
    """Tracing is on but the OpenTelemetry packages are not installed."""


class Tracing:
    """Turns the committed changes of sampled executions into exported spans."""

    def __init__(self, rate: float, export, on_pool=None):
        self.rate = rate
        #: trace_context.sampled, with the rate's threshold worked out once.
        self._threshold = threshold_of(rate)
        #: Called with a trace id and the trace_spans.Span of it to export (OtlpExport).
        self._export = export
        self._on_pool = on_pool
        self._reads: set[asyncio.Task] = set()

    def committed(self, change) -> None:
        """A committed, accepted change: an unsampled execution's costs one comparison."""
        execution_id = change.execution_id
        if place_of(execution_id) >= self._threshold:
            return
        record = change.record
        trace_id, trigger_span = trace_of(execution_id, record.state.event if record is not None else None)
        if not change.history:
            return
        _, first_seq, at, _, steps_json, _ = change.history[0]
        steps = orjson.loads(steps_json)
        for kind, data in change.after_commit:
            if kind == "action":
                data["traceparent"] = format_traceparent(trace_id, span_id(execution_id, "call", data["request_seq"]))
            elif kind == "emit":  # the executions the event enrols continue this trace, under the emitting step
                seq = _emitted_at(steps, first_seq, data["event"]["event_id"])
                if seq is not None:
                    data["traceparent"] = format_traceparent(trace_id, span_id(execution_id, "step", seq))
        if record is None:
            return
        execution = Execution(
            execution_id,
            record.tenant,
            record.workflow_id,
            record.workflow_version,
            trigger_span,
            int(record.created_at.timestamp() * 1e9),
        )
        closing = _Commit(first_seq, first_seq + len(steps) - 1, change.finished, change.status, time.time_ns())
        if change.is_new:
            at_ns = int(at.timestamp() * 1e9)
            transitions = [
                Transition(first_seq + i, step[0], step[1], at_ns, step[2] if len(step) > 2 else None)
                for i, step in enumerate(steps)
            ]
            self._emit(trace_id, execution, transitions, closing)
            return
        if self._on_pool is None or len(self._reads) >= MOST_PENDING_READS:
            spans_dropped.inc()
            return
        task = asyncio.get_running_loop().create_task(self._from_ledger(trace_id, execution, closing))
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _from_ledger(self, trace_id: int, execution: Execution, closing: _Commit) -> None:
        """A later commit's spans: its open step (and the execution) may have started elsewhere."""
        try:
            rows = await self._on_pool(lambda conn: history.transitions(conn, execution.execution_id), "trace history")
        except Exception as exc:  # a trace is not worth more than a metric and a line
            spans_dropped.inc()
            log.warning(
                "spans of %s not built: %s",
                execution.execution_id,
                exc,
                extra=logs.execution(execution.execution_id, **logs.failure("trace_history", exc)),
            )
            return
        last_seq = closing.last_seq
        transitions = [
            Transition(
                row["seq"],
                row["step_id"],
                row["kind"],
                int(row["at"].timestamp() * 1e9),
                orjson.loads(row["detail"]) if row["detail"] is not None else None,
            )
            for row in rows
            if row["seq"] <= last_seq  # a later commit may be in already: its spans are its own
        ]
        self._emit(trace_id, execution, transitions, closing)

    def _emit(self, trace_id: int, execution: Execution, transitions: list[Transition], closing: _Commit) -> None:
        if not transitions:
            return
        spans = closed_spans(
            execution,
            transitions,
            closing.first_seq,
            finished=closing.finished,
            status=closing.status,
            commit_ns=closing.commit_ns,
        )
        if spans:
            self._export(trace_id, spans)
            spans_exported.inc(len(spans))

    async def close(self) -> None:
        """Wait for the history reads in flight (bounded), then flush the exporter."""
        if self._reads:
            await asyncio.wait(list(self._reads), timeout=5)
        close = getattr(self._export, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


def _emitted_at(steps: list, first_seq: int, event_id: str) -> int | None:
    """The seq of the `emitted` transition of this event: its step's visit (an emit step's is one transition)."""
    for index, step in enumerate(steps):
        if step[1] == "emitted" and len(step) > 2 and step[2].get("event_id") == event_id:
            return first_seq + index
    return None


class OtlpExport:
    """The OpenTelemetry SDK's batch span processor and OTLP/HTTP (protobuf) exporter, given our spans.

    The spans are made as the SDK's ReadableSpan with the ids trace_context
    derived, since they are built after the fact rather than opened and ended.
    """

    def __init__(self, endpoint: str, service_instance: str, *, schedule_delay_ms: int = 1000):
        try:
            from opentelemetry import trace as api
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace.status import Status, StatusCode
        except ImportError as exc:
            raise TracingUnavailable(
                f"trace_sample is above 0 but OpenTelemetry is not installed ({exc}); "
                "install the extra: pip install 'ordo[otel]'"
            ) from exc
        self._api = api
        self._readable = ReadableSpan
        self._status = (Status, StatusCode)
        self._unset = Status(StatusCode.UNSET)
        self._sampled = api.TraceFlags(api.TraceFlags.SAMPLED)
        self._kinds = {
            "internal": api.SpanKind.INTERNAL,
            "client": api.SpanKind.CLIENT,
            "consumer": api.SpanKind.CONSUMER,
        }
        resource = Resource.create({"service.name": "ordo", "service.instance.id": service_instance})
        self._resource = _hashed_once(Resource)(resource.attributes, resource.schema_url)
        self._scope = InstrumentationScope("ordo")
        url = endpoint.rstrip("/") + TRACES_PATH
        logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(_QueueFullOncePerMinute())
        self._processor = BatchSpanProcessor(
            # Bounded: a drain waits for the last export, and a collector that is away must not hold it long.
            _CountingExporter(OTLPSpanExporter(endpoint=url, timeout=5), SpanExportResult.SUCCESS),
            max_queue_size=MOST_QUEUED_SPANS,
            schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=2048,
        )

    def __call__(self, trace_id: int, spans: list[Span]) -> None:
        api = self._api
        flags = self._sampled
        Status, StatusCode = self._status
        contexts = {
            span.span_id: api.SpanContext(trace_id, span.span_id, is_remote=False, trace_flags=flags) for span in spans
        }
        for span in spans:
            parent = None
            if span.parent_id is not None:
                parent = contexts.get(span.parent_id) or api.SpanContext(
                    trace_id, span.parent_id, is_remote=False, trace_flags=flags
                )
            status = Status(StatusCode.ERROR, span.error) if span.error is not None else self._unset
            self._processor.on_end(
                self._readable(
                    span.name,
                    context=contexts[span.span_id],
                    parent=parent,
                    resource=self._resource,
                    attributes=span.attributes,
                    kind=self._kinds[span.kind],
                    status=status,
                    start_time=span.start_ns,
                    end_time=span.end_ns,
                    instrumentation_scope=self._scope,
                )
            )

    def close(self) -> None:
        """Export what is queued, then stop the exporter's thread (blocking: call it off the loop)."""
        self._processor.shutdown()
