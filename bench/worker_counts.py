"""Live progress from the workers' own counters, so that watching a run costs the ledger nothing.

Counting a run's finished executions in the ledger is a scan that grows with
the run: 150 ms at 200,000 executions, seconds at millions, each time on a
core the workers and Postgres need. Every bench worker serves /metrics on a
port of its own, and `ordo_executions_finished_total` counts what it has
committed as finished. The bench asks for that counter alone
(`/metrics?name[]=…`): a few hundred bytes per worker. The whole text, four
times a second, took 3.5% of the workers' profile samples under w7-noisy's
quiet load.

The counters only steer the polling: a run ends, and is verified, on what the
ledger says. A worker that restarts starts its counters at zero, so they may
fall short; the bench reads the ledger now and then anyway.
"""

from __future__ import annotations

import asyncio
import socket

from prometheus_client.parser import text_string_to_metric_families

from daemon.servers import free_port

FINISHED = "ordo_executions_finished"
COMMIT_SECONDS = "ordo_ledger_commit_seconds"
COMMIT_ROWS = "ordo_ledger_batch_rows"


def free_port_range(count: int, host: str = "127.0.0.1", *, attempts: int = 50) -> int:
    """A base port such that base .. base + count - 1 are all free now (the workers' metrics ports)."""
    for _ in range(attempts):
        base = free_port(host)
        if base + count > 65535:
            continue
        if all(_is_free(host, port) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


async def scrape(host: str, port: int, timeout: float = 2.0, *, only: str | None = None) -> str:
    """The /metrics text of the worker on `port`; `only`: just the families of that sample.

    One deadline covers connecting, sending and reading (TimeoutError past it), so that
    a worker that accepts and never answers costs `timeout`, not one per step; the
    connection is closed on every way out.
    """
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            path = "/metrics" if only is None else f"/metrics?name[]={only}"
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
    finally:
        if writer is not None:
            writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or head.split(b" ", 2)[1] != b"200":
        raise ConnectionError(f"GET /metrics on port {port}: {head[:60]!r}")
    return body.decode()


def finished_in(text: str) -> int:
    """Executions finished (any status) in one worker's /metrics text."""
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == FINISHED
            for sample in family.samples
            if sample.name == FINISHED + "_total"
        )
    )


async def scrape_all(host: str, ports: list[int], *, only: str | None = None) -> list[str] | None:
    """Every worker's /metrics text (`only`: as `scrape`'s); None if any worker cannot be read."""
    try:
        return await asyncio.gather(*(scrape(host, port, only=only) for port in ports))
    except (TimeoutError, OSError, ConnectionError):
        return None


async def finished_by_workers(host: str, ports: list[int]) -> int | None:
    """Executions the workers have committed as finished; None if any worker cannot be read."""
    texts = await scrape_all(host, ports, only=FINISHED + "_total")
    return None if texts is None else sum(finished_in(text) for text in texts)


def buckets_in(texts: list[str], name: str) -> tuple[list[tuple[float, float]], float, float]:
    """A histogram summed over the workers' /metrics texts: ([(le, cumulative count)...], sum, count)."""
    cumulative: dict = {}
    total = count = 0.0
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name == name + "_bucket":
                    le = float(sample.labels["le"])
                    cumulative[le] = cumulative.get(le, 0.0) + sample.value
                elif sample.name == name + "_sum":
                    total += sample.value
                elif sample.name == name + "_count":
                    count += sample.value
    return sorted(cumulative.items()), total, count


def bound_of(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket that holds quantile q (inf: past the last bound; None: no samples)."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    return next(le for le, cumulative in buckets if cumulative >= rank)


def commits_in(texts: list[str]) -> dict | None:
    """The workers' ledger commits: how many, rows per batch, and p50/p99 commit time as bucket bounds."""
    seconds, spent, batches = buckets_in(texts, COMMIT_SECONDS)
    _, rows, _ = buckets_in(texts, COMMIT_ROWS)
    if not batches:
        return None
    p50, p99 = bound_of(seconds, 0.5), bound_of(seconds, 0.99)
    return {
        "batches": int(batches),
        "rows_per_batch": rows / batches,
        "mean_ms": spent / batches * 1000.0,
        "p50_le_ms": p50 * 1000.0,
        "p99_le_ms": p99 * 1000.0,
    }


async def commits_by_workers(host: str, ports: list[int]) -> dict | None:
    """commits_in() of every worker's /metrics now; None if any worker cannot be read."""
    texts = await scrape_all(host, ports)
    return None if texts is None else commits_in(texts)
