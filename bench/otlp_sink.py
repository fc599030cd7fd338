"""A local OTLP/HTTP collector for `python -m bench ... --trace-sample R`: counts what the workers export.

It stands where a real collector would, on 127.0.0.1, so a run measures what
tracing costs the workers (building the spans, the exporter's thread and its
HTTP posts) without sending anything off the machine. It decodes each export
(opentelemetry-proto, from the `otel` extra) to count spans and traces.
"""

from aiohttp import web


class OtlpSink:
    def __init__(self):
        self.exports = 0
        self.spans = 0
        self.traces: set[bytes] = set()
        self.port = 0
        self._runner = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "OtlpSink":
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self._pb = trace_service_pb2
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def _export(self, request: web.Request) -> web.Response:
        export = self._pb.ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.exports += 1
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans += 1
                    self.traces.add(span.trace_id)
        body = self._pb.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def summary(self) -> str:
        return f"{self.spans:,} spans of {len(self.traces):,} traces in {self.exports:,} exports"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
