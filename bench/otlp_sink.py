"""A local OTLP/HTTP collector for `python -m bench ... --trace-sample R`: counts what the workers export.

It stands where a real collector would, on 127.0.0.1, so a run measures what
tracing costs the workers (building the spans, the exporter's thread and its
HTTP posts) without sending anything off the machine. It decodes each export
(opentelemetry-proto, from the `otel` extra) to count spans and traces.

It runs as a process of its own (`python -m bench.otlp_sink`), not in the
bench's: its CPU is then neither the bench's nor hidden, the bench samples it
as the `collector` group beside the workers; a real collector would run on
another host. It keeps the workers' connections open (HTTP/1.1), as a
collector does. It prints its port, serves until its stdin closes, then
prints what it received as one JSON line.
"""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OtlpSink:
    """The collector process, seen from the bench."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self.port = 0
        self._received: dict | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OtlpSink":
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.otlp_sink"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self._process.kill()
            raise RuntimeError(f"the OTLP collector did not start (it printed {line!r}): is the otel extra installed?")
        self.port = int(line)
        return self

    def received(self) -> dict:
        """{exports, spans, traces}: closes the collector's stdin, which ends it once it has answered."""
        if self._received is None:
            assert self._process is not None
            out, _ = self._process.communicate("", timeout=30)
            self._received = json.loads(out.strip().splitlines()[-1])
        return self._received

    def summary(self) -> str:
        got = self.received()
        return f"{got['spans']:,} spans of {got['traces']:,} traces in {got['exports']:,} exports"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self.received()


def serve() -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

    counts = {"exports": 0, "spans": 0}
    traces: set[bytes] = set()
    lock = threading.Lock()
    reply = pb.ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # the exporter's connection stays open between exports

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            export = pb.ExportTraceServiceRequest()
            export.ParseFromString(body)
            with lock:
                counts["exports"] += 1
                for resource_spans in export.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            counts["spans"] += 1
                            traces.add(span.trace_id)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):  # one line per export would drown the bench's output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)

    def until_stdin_closes():
        sys.stdin.read()
        server.shutdown()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    server.serve_forever()
    with lock:
        print(json.dumps({**counts, "traces": len(traces)}), flush=True)


if __name__ == "__main__":
    serve()
