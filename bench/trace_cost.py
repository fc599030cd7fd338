"""What tracing costs a W1 execution's worker, in CPU, in-process: the parts an end-to-end run cannot resolve.

    python -m bench.trace_cost [--executions 3000] [--repeat 5] [--rate 0.01] [--json]

It enrols W1 executions (daemon/examples/linear5.json) with the real
dispatcher and ledger record, then hands their committed changes to
daemon/tracing.py as the settle loop does, and measures with thread and
process CPU clocks (not wall time):

- `unsampled`: `Tracing.committed` of an execution that is not sampled, what
  99% of the executions pay at 1% (less the loop's own cost);
- `sampled_main`: a sampled execution's on the event loop's thread: its spans
  built from the transitions and handed to the OpenTelemetry SDK;
- `sampled_exporter`: the same execution's in the SDK exporter's thread (OTLP
  encoding, the HTTP post) to a collector in another process (bench/otlp_sink.py);
- `trigger_check` / `trigger_check_header`: `trigger_traceparent` on a
  trigger without a traceparent and with one (every trigger pays it, tracing
  on or off).

Each figure is the median of `--repeat` rounds, in microseconds per execution;
`at_rate` is the CPU per execution at `--rate` that tracing adds. Needs the
`otel` extra.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson

from daemon.trace_context import sampled, trigger_traceparent
from daemon.tracing import OtlpExport, Tracing
from hotpath import dispatcher
from ledger.executions import ExecutionRecord

from .otlp_sink import OtlpSink

W1 = Path(__file__).resolve().parent.parent / "daemon" / "examples" / "linear5.json"
UPSTREAM = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def w1_changes(count: int, rate: float, want_sampled: bool) -> list:
    """`count` committed enrolments of W1, each sampled at `rate` or each not, as the settle loop sees them."""
    definition = orjson.loads(W1.read_bytes())
    program = dispatcher.Program(definition)
    now = datetime.now(UTC)
    changes = []
    i = 0
    while len(changes) < count:
        i += 1
        execution_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"trace-cost-{i}"))
        if sampled(execution_id, rate) != want_sampled:
            continue
        event = {"event_id": f"e-{i}", "type": "bench.linear5", "tenant": "bench", "data": {"amount": 3}}
        subject = {"id": f"c-{i}", "first_name": "Ada", "country": "FR"}
        state = dispatcher.ExecutionState(execution_id, event=event, subject=subject, tenant="bench")
        record = ExecutionRecord(
            execution_id, "bench", "linear5", 1, subject["id"], event["event_id"], 0, now, 0, state
        )
        transitions = dispatcher.advance(program, state, "start", None, int(now.timestamp() * 1000))
        effects, state.effects = state.effects, []
        changes.append(record.change(transitions, now, effects))
    return changes


def _per_execution(seconds: float, count: int) -> float:
    return seconds / count * 1e6


def measure_unsampled(count: int, rate: float) -> float:
    tracing = Tracing(rate, export=None)
    changes = w1_changes(count, rate, want_sampled=False)
    committed = tracing.committed
    start = time.thread_time()
    for change in changes:
        committed(change)
    spent = time.thread_time() - start
    start = time.thread_time()
    for _change in changes:  # the loop alone
        pass
    loop = time.thread_time() - start
    return _per_execution(max(0.0, spent - loop), count)


def measure_sampled(count: int, endpoint: str) -> tuple[float, float]:
    """(main thread, exporter thread) microseconds per sampled W1 execution."""
    export = OtlpExport(endpoint, "trace-cost")
    tracing = Tracing(1.0, export)
    changes = w1_changes(count, 1.0, want_sampled=True)
    gc.collect()
    process, main = time.process_time(), time.thread_time()
    for change in changes:
        tracing.committed(change)
    main = time.thread_time() - main
    export.close()  # the exporter's thread exports the rest and ends; this thread only waits
    process = time.process_time() - process
    return _per_execution(main, count), _per_execution(process - main, count)


def measure_trigger_check(count: int, headers: dict) -> float:
    event = {"event_id": "e-1", "type": "bench.linear5", "tenant": "bench", "data": {}}
    start = time.thread_time()
    for _ in range(count):
        trigger_traceparent(headers, event)
    return _per_execution(time.thread_time() - start, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--executions", type=int, default=3000, help="sampled executions per round (default 3000)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each figure is their median (default 5)")
    parser.add_argument("--rate", type=float, default=0.01, help="the trace_sample `at_rate` is given for")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    sink = OtlpSink().start()
    rounds: dict[str, list[float]] = {}
    try:
        for _ in range(args.repeat):
            main_us, exporter_us = measure_sampled(args.executions, sink.endpoint)
            figures = {
                "unsampled": measure_unsampled(args.executions * 10, args.rate),
                "sampled_main": main_us,
                "sampled_exporter": exporter_us,
                "trigger_check": measure_trigger_check(args.executions * 10, {"Nats-Msg-Id": "x"}),
                "trigger_check_header": measure_trigger_check(
                    args.executions * 10, {"Nats-Msg-Id": "x", "traceparent": UPSTREAM}
                ),
            }
            for name, value in figures.items():
                rounds.setdefault(name, []).append(value)
    finally:
        received = sink.summary()
        sink.stop()
    med = {name: statistics.median(values) for name, values in rounds.items()}
    sampled_us = med["sampled_main"] + med["sampled_exporter"]
    med["at_rate"] = args.rate * sampled_us + (1 - args.rate) * med["unsampled"]
    if args.json:
        print(orjson.dumps({"rate": args.rate, "median_us": med, "rounds_us": rounds}).decode())
    else:
        print(f"collector received {received}")
        print(f"unsampled execution     {med['unsampled']:8.2f} us  (Tracing.committed)")
        print(f"sampled, event loop     {med['sampled_main']:8.2f} us  (7 spans built and handed to the SDK)")
        print(f"sampled, exporter       {med['sampled_exporter']:8.2f} us  (OTLP encoding and post, its own thread)")
        print(f"trigger, no traceparent {med['trigger_check']:8.2f} us")
        print(f"trigger with one        {med['trigger_check_header']:8.2f} us")
        print(f"at {args.rate:g}: {med['at_rate']:.2f} us of CPU per execution (medians of {args.repeat} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
