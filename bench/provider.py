"""A local HTTP provider for action scenarios: answers like a flaky SMS or e-mail API.

The bench process runs it on 127.0.0.1 (an ephemeral port) while a run goes;
the workers' `webhook` action calls it (the run sets ORDO_WEBHOOK_ALLOW to
127.0.0.0/8, since the SSRF guard refuses loopback otherwise).

Failures are deterministic, so that the ledger can be checked against them:

- permanent: a 400 to every call of an execution whose event id hashes into
  the `permanent` share (`fails_permanently(event_id, share)`, also used by the
  verification to know how many dead letters to expect);
- transient: a 503 to a call whose (idempotency key, call number) hashes into
  the `transient` share, at most `max_transient` times per key, so that a
  transient failure never exhausts the step's retries (the step allows more
  attempts than that): the only dead letters are the permanent ones.

It counts what it answered (calls, 200s, 503s, 400s, keys seen) for the report.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import orjson

_SCALE = 1_000_000


def _share(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") % _SCALE


def fails_permanently(event_id: str, share: float) -> bool:
    """Whether every call for this trigger event is answered 400."""
    return _share("permanent:" + event_id) < share * _SCALE


def fails_transiently(key: str, call: int, share: float) -> bool:
    """Whether call number `call` (0-based) for this idempotency key is answered 503."""
    return _share(f"transient:{key}:{call}") < share * _SCALE


class Provider:
    """An aiohttp server in the caller's event loop: `await start()`, `url`, `await stop()`."""

    def __init__(
        self, *, transient: float = 0.05, permanent: float = 0.005, max_transient: int = 2, delay_ms: float = 0.0
    ):
        self.transient = transient
        #: Every answer waits this long first: what a real API's round trip costs the caller.
        self.delay_ms = delay_ms
        self.permanent = permanent
        self.max_transient = max_transient
        self.calls = 0
        self.ok = 0
        self.transient_failures = 0
        self.permanent_failures = 0
        self.bad_requests = 0
        self._per_key: dict[str, int] = {}
        self._transient_per_key: dict[str, int] = {}
        self._succeeded: set[str] = set()
        #: Successful calls for a key that had succeeded before (at-least-once side effects, deduped downstream).
        self.duplicate_successes = 0
        self._runner = None
        self.port = None
        self._cpu_started = 0.0
        self._wall_started = 0.0
        #: When each call arrived (time.monotonic()): the calls in any 1 s window (`most_in_any_second`).
        self.arrivals: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/call"

    async def start(self) -> Provider:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/call", self._handle)
        # No access log: at thousands of calls per second it would cost more than the answers.
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._cpu_started, self._wall_started = time.process_time(), time.monotonic()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request):
        from aiohttp import web

        self.calls += 1
        self.arrivals.append(time.monotonic())
        key = request.headers.get("Idempotency-Key", "")
        try:
            body = orjson.loads(await request.read())
            event_id = body["event_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.bad_requests += 1
            return web.Response(status=422, text="a JSON body with event_id is required")
        call = self._per_key.get(key, 0)
        self._per_key[key] = call + 1
        if self.delay_ms:
            await asyncio.sleep(self.delay_ms / 1000.0)
        if fails_permanently(event_id, self.permanent):
            self.permanent_failures += 1
            return web.Response(status=400, body=b'{"error":"invalid recipient"}', content_type="application/json")
        failed = self._transient_per_key.get(key, 0)
        if failed < self.max_transient and fails_transiently(key, call, self.transient):
            self._transient_per_key[key] = failed + 1
            self.transient_failures += 1
            return web.Response(status=503, body=b'{"error":"try again"}', content_type="application/json")
        self.ok += 1
        if key in self._succeeded:
            self.duplicate_successes += 1
        self._succeeded.add(key)
        return web.Response(status=200, body=b'{"id":"m-%d"}' % self.calls, content_type="application/json")

    def stats(self) -> dict:
        return {
            "calls": self.calls,
            "ok": self.ok,
            "transient_503": self.transient_failures,
            "permanent_400": self.permanent_failures,
            "bad_requests": self.bad_requests,
            "keys": len(self._per_key),
            "duplicate_successes": self.duplicate_successes,
            "process_cpu_percent": self.cpu_percent(),
        }

    def most_in_any_second(self) -> int:
        """The most calls that arrived within any 1 s window (each window starting at a call)."""
        return most_in_any_second(self.arrivals)

    def cpu_percent(self) -> float:
        """CPU of the process it runs in (the bench's: the provider and the bench's polling) since start."""
        wall = time.monotonic() - self._wall_started
        return 100.0 * (time.process_time() - self._cpu_started) / wall if self._wall_started and wall > 0 else 0.0


def most_in_any_second(arrivals: list[float]) -> int:
    """The most of these arrival times (seconds) within any 1 s window (a window starting at each arrival)."""
    times = sorted(arrivals)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most
