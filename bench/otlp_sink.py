"""A local OTLP/HTTP collector for `python -m bench ... --trace-sample R`: counts what the workers export.

It stands where a real collector would, on 127.0.0.1, so a run measures what
tracing costs the workers (building the spans, the exporter's thread and its
HTTP posts) without sending anything off the machine. It decodes each export
(opentelemetry-proto, from the `otel` extra) to count spans and traces. It
serves from a thread of its own: the bench's event loop blocks while the
workers drain, which is when they export their last spans.
"""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class OtlpSink:
    def __init__(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.exports = 0
        self.spans = 0
        self.traces: set[bytes] = set()
        self._lock = threading.Lock()
        sink, pb = self, trace_service_pb2

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                export = pb.ExportTraceServiceRequest()
                export.ParseFromString(body)
                sink.took(export)
                reply = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # one line per export would drown the bench's output
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OtlpSink":
        self._thread.start()
        return self

    def took(self, export) -> None:
        with self._lock:
            self.exports += 1
            for resource_spans in export.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans += 1
                        self.traces.add(span.trace_id)

    def summary(self) -> str:
        return f"{self.spans:,} spans of {len(self.traces):,} traces in {self.exports:,} exports"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
