"""The worker's HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for probes.

A few lines over asyncio.start_server instead of a web framework: three GET
routes, one request per connection. It is served by the worker's own event
loop, so /healthz answering proves that the loop is not blocked.
"""

import asyncio
import logging
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("ordo.health")

#: A client gets this long to send its request line and headers.
REQUEST_TIMEOUT_S = 5.0
MAX_HEADER_LINES = 100

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def metrics_text(names: list[str] | None) -> bytes:
    """The registry's text, or (`?name[]=…`, as prometheus_client's own server takes it) only the
    families of those samples, e.g. `ordo_executions_finished_total`.

    The whole text is hundreds of series: polled four times a second by the bench, it took 3.5% of
    the workers' profile samples under w7-noisy's quiet load, so a client that polls one counter
    (the bench's progress) asks for that one.
    """
    registry = REGISTRY.restricted_registry(names) if names else REGISTRY
    return generate_latest(registry)


class HealthServer:
    """Serves /metrics, /healthz and /readyz for one worker.

    `ready` is a callable: /readyz is 200 while it returns True (the worker
    consumes and is not draining), 503 otherwise.
    """

    def __init__(self, host: str, port: int, ready):
        self.host = host
        self.port = port
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]  # the one the kernel chose, for port 0
        log.info("metrics and health on http://%s:%d/", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        path, _, query = path.partition("?")
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, metrics_text(parse_qs(query).get("name[]"))
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/readyz":
            if self._ready():
                return 200, "text/plain; charset=utf-8", b"ready\n"
            return 503, "text/plain; charset=utf-8", b"not ready\n"
        return 404, "text/plain; charset=utf-8", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, (status, content_type, body) = await asyncio.wait_for(self._read_request(reader), REQUEST_TIMEOUT_S)
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            # A client that went away, never spoke, or sent a line over the
            # reader's limit (ValueError): nothing worth answering.
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, tuple[int, str, bytes]]:
        parts = (await reader.readline()).decode("latin-1").split()
        # Headers are read and dropped: no route depends on them.
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "GET", (400, "text/plain; charset=utf-8", b"bad request\n")
        return parts[0], self.respond(parts[0], parts[1])
