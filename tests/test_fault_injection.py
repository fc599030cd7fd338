"""Seeded injected faults (daemon/faults.py): the spec, the determinism, and a soak.

The soak runs two worker processes that fail ~3% of their JetStream publishes
and acks and ~10% of their ledger commits on purpose (half of those after COMMIT
went through), under a load of enrolments, ordered signals and in-process
actions. Every execution must end, fewer than 1% may fail, no worker may crash,
and the ledger's invariants must hold. ``ORDO_FAULT_SCALE=full pytest
tests/test_fault_injection.py -s`` runs it for three minutes and prints the
throughput (never asserted: wall-clock numbers are not test results).
"""

import asyncio
import random
import socket
import time
import urllib.request

import pytest
from harness import LOADED, NO_PROBLEMS, Fleet, Harness, Load, fault_scale

from bench.generator import trigger_event
from daemon import faults
from daemon.service import EXIT_FENCED

# -- the spec -------------------------------------------------------------------------


def test_a_spec_parses_into_its_seed_and_shares():
    assert faults.parse("seed=7,nats=0.02,pg=0.03") == faults.FaultSpec(seed=7, nats=0.02, pg=0.03)
    assert faults.parse(" seed = 7 , pg = 1 ") == faults.FaultSpec(seed=7, nats=0.0, pg=1.0)
    assert faults.parse("") is None
    assert faults.parse("   ") is None


@pytest.mark.parametrize(
    "spec, names",
    [
        ("seed=7,nats=0.02,disk=0.1", "unknown key 'disk'"),
        ("seed=7,nats", "'nats' is not key=value"),
        ("seed=7,,pg=0.1", "'' is not key=value"),
        ("seed=7,pg=", "'pg=' is not key=value"),
        ("seed=seven,pg=0.1", "seed='seven' is not an integer"),
        ("seed=7,pg=lots", "pg='lots' is not a number"),
        ("seed=7,nats=1.5", "nats='1.5' is not a share between 0 and 1"),
        ("seed=7,nats=-0.1", "nats='-0.1' is not a share between 0 and 1"),
        ("seed=7,pg=0.1,pg=0.2", "'pg' given twice"),
        ("nats=0.02,pg=0.02", "has no seed"),
    ],
)
def test_a_bad_spec_is_a_value_error_naming_the_bad_part(spec, names):
    with pytest.raises(ValueError, match="inject_faults") as caught:
        faults.parse(spec)
    assert names in str(caught.value)


# -- determinism ----------------------------------------------------------------------


def _decisions(injector: faults.FaultInjector, count: int = 2000) -> list:
    """A mix of every kind of decision, as a worker makes them."""
    out = []
    for _ in range(count):
        out.append(injector.publish_fault())
        out.append(injector.ack_fault())
        try:
            injector.commit_fault("before_commit")
            injector.commit_fault("after_commit")
            out.append(None)
        except Exception as exc:  # the injected fault, by kind
            out.append(type(exc).__name__)
    return out


def test_the_same_seed_gives_the_same_faults_and_another_seed_other_ones():
    spec = faults.parse("seed=7,nats=0.05,pg=0.05")
    first = _decisions(faults.FaultInjector(spec, worker=0))
    assert first == _decisions(faults.FaultInjector(spec, worker=0))
    assert first != _decisions(faults.FaultInjector(spec, worker=1))
    assert first != _decisions(faults.FaultInjector(faults.parse("seed=8,nats=0.05,pg=0.05"), worker=0))


def test_nats_and_postgres_draw_from_separate_streams():
    """How often one side is asked must not change the other side's sequence."""
    spec = faults.parse("seed=3,nats=0.1,pg=0.1")

    def commits(injector, publishes_between: int) -> list:
        out = []
        for _ in range(500):
            for _ in range(publishes_between):
                injector.publish_fault()
            try:
                injector.commit_fault("before_commit")
                injector.commit_fault("after_commit")
                out.append(None)
            except Exception as exc:
                out.append(str(exc))
        return out

    assert commits(faults.FaultInjector(spec), 0) == commits(faults.FaultInjector(spec), 7)


def test_the_shares_are_what_the_spec_says_and_both_commit_faults_occur():
    injector = faults.FaultInjector(faults.parse("seed=11,nats=0.03,pg=0.03"))
    draws = 20000
    decisions = _decisions(injector, draws)
    publishes, acks, commits = decisions[0::3], decisions[1::3], decisions[2::3]
    for name, made in (("publish", publishes), ("ack", acks), ("commit", commits)):
        share = sum(d is not None for d in made) / draws
        assert 0.02 < share < 0.04, f"{name} faults: {share:.3%}"
    assert {faults.PUBLISH_FAILED, faults.PUBLISH_TIMEOUT} <= set(publishes)
    assert {"ConnectionDoesNotExistError", "TimeoutError"} <= set(commits)


def test_no_spec_installs_nothing():
    class Untouched:
        fault_hook = None

    nc, js, batcher = Untouched(), Untouched(), Untouched()
    assert faults.install("", nc, js, batcher) is None
    assert vars(nc) == {} and vars(js) == {} and batcher.fault_hook is None


# -- the soak -------------------------------------------------------------------------

#: ~3% of each worker's JetStream publishes and acks and ~10% of its commits fail. Commits are
#: few (a batch holds hundreds of executions): at 3%, a quick run made ~70 a worker, and one
#: of the two commit faults (half each) then never happened in about one run in ten.
SOAK_FAULTS = "seed=4711,nats=0.03,pg=0.1"

#: Every JetStream publish a worker makes: an in-process action's result (a lost
#: one is retried when the step's deadline passes), an emitted event, and that
#: event routed back to the execution waiting for it (a lost emit or route
#: would leave the execution waiting for an hour). The call's deadline is 10 s:
#: at full scale the backlog alone holds a result for over a second, and a
#: deadline that load can miss would measure load here, not faults.
ORDER = {
    "id": "order",
    "tenant": "acme",
    "trigger": {"event": "order.placed"},
    "steps": [
        {
            "id": "confirm",
            "type": "action",
            "action": "noop",
            "timeout": "10s",
            "retry": {"max_attempts": 5, "initial_interval": "100ms", "backoff_coefficient": 2, "jitter": 0},
        },
        {"id": "announce", "type": "emit", "event": "order.confirmed"},
        {"id": "confirmed", "type": "wait_for_event", "event": "order.confirmed", "timeout": "1h"},
        {"id": "done", "type": "set", "values": {"confirmed": True}},
    ],
}

_ENDED = "status IN ('completed', 'failed', 'cancelled')"


async def test_a_commit_in_doubt_still_carries_out_what_it_committed(nats_server_url, pg_dsn, prefix):
    """Every commit fails once: before COMMIT (retried) or after it (committed, but the
    worker saw an error). The retry of a commit that in fact went through must not
    turn its executions into duplicates whose emits and action calls never happen."""
    count = 40
    # A deadline far away: a call or an emit lost here would leave its execution waiting.
    order = {**ORDER, "steps": [{**ORDER["steps"][0], "timeout": "1h"}, *ORDER["steps"][1:]]}
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(order)
        async with h.worker(inject_faults="seed=5,pg=1.0"):
            await h.publish_triggers(
                [trigger_event("doubt", i, tenant="acme", event_type="order.placed") for i in range(count)]
            )
            await h.wait_until(
                "SELECT count(*) FROM ordo.executions WHERE status = 'completed'", expect=count, timeout=60
            )
        assert faults.metrics.injected_faults.labels(faults.COMMIT_TIMEOUT)._value.get() > 0
        # No call was lost, so none had to be retried.
        assert await h.db.fetchval("SELECT count(*) FROM ordo.transitions WHERE kind = 'action_failed'") == 0
        assert await h.ledger_problems() == NO_PROBLEMS


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (worker i serves metrics on metrics_port + i), chosen
    below the kernel's ephemeral range: the harness's own connections take ephemeral ports,
    and one that took p + 1 before the worker started would leave that worker no port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10000, max(10002, ephemeral_low - 2))
        with socket.socket() as first, socket.socket() as second:
            try:
                first.bind(("127.0.0.1", base))
                second.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports")


def _injected(port: int) -> dict:
    """ordo_injected_faults_total by kind, from one worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith('ordo_injected_faults_total{kind="'):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('"')[1]] = float(value)
    return counts


class _Supervised:
    """The soak's fleet under a supervisor's eye: every half second a worker that exited is
    restarted (as systemd's Restart= would) and each live worker's injected-fault counts are
    read. A process takes its counters with it when it exits, so each process's last reading
    is kept, by pid."""

    def __init__(self, fleet: Fleet, metrics_port: int):
        self.fleet = fleet
        self.metrics_port = metrics_port
        self.last_counts: dict[int, dict] = {}

    async def watch(self) -> None:
        while True:
            await self.look()
            await asyncio.sleep(0.5)

    async def look(self) -> None:
        self.fleet.respawn_exited()
        for i, proc in list(self.fleet.procs.items()):
            try:
                self.last_counts[proc.pid] = await asyncio.to_thread(_injected, self.metrics_port + i)
            except OSError:
                pass  # not serving yet, or gone since: its last reading stands

    def injected(self, kind: str) -> float:
        return sum(counts.get(kind, 0) for counts in self.last_counts.values())


async def test_a_soak_under_seeded_injected_faults_ends_every_execution(nats_server_url, pg_dsn, prefix):
    seconds = fault_scale(ci=15, full=180)
    welcome = fault_scale(ci=3000, full=60000)
    orders = fault_scale(ci=600, full=12000)
    metrics_port = _free_port_pair()
    async with Harness(nats_server_url, pg_dsn, prefix, **LOADED) as h:
        load = Load(h, "inj", welcome, waiters=30)
        await load.prepare()
        await h.deploy(ORDER)
        order_events = [trigger_event("inj-o", i, tenant="acme", event_type="order.placed") for i in range(orders)]
        total = load.total + orders
        fleet = Fleet(h, 2, inject_faults=SOAK_FAULTS, metrics_port=metrics_port)
        supervised = _Supervised(fleet, metrics_port)
        fleet.start()
        started = time.monotonic()
        watching = asyncio.create_task(supervised.watch())
        try:
            await asyncio.gather(load.publish(over_s=seconds), load.publish_triggers(order_events))
            ended = await h.wait_until(
                f"SELECT count(*) FROM ordo.executions WHERE {_ENDED}", expect=total, timeout=180
            )
            finished = time.monotonic()
            watching.cancel()
            await supervised.look()
        finally:
            watching.cancel()
            fleet.stop()
        failed = await h.db.fetchval("SELECT count(*) FROM ordo.executions WHERE status = 'failed'")
        attempts = await h.db.fetchval("SELECT count(*) FROM ordo.transitions WHERE kind = 'action_failed'")
        numbers = await load.verify()  # welcome exactly once, signals in order, ledger invariants
        by_kind = {
            kind: supervised.injected(kind)
            for kind in (
                faults.PUBLISH_FAILED,
                faults.PUBLISH_TIMEOUT,
                faults.ACK_DROPPED,
                faults.COMMIT_FAILED,
                faults.COMMIT_TIMEOUT,
            )
        }
        print(
            f"injected-fault soak ({SOAK_FAULTS}, {seconds}s of load): injected {by_kind}; "
            f"{ended} of {total} executions ended, {failed} failed, {attempts} action attempts failed; "
            f"{numbers}; worker exits {fleet.exits}; {total / (finished - started):.0f} executions/s"
        )
        assert ended == total
        assert failed < 0.01 * total, f"{failed} of {total} executions failed"
        # Faults are injected into publishes, acks and commits, never into the lease renewals:
        # a worker fenced (exit 3) lost its lease because the machine stalled it past lease_ttl_s
        # (2 s here), and exiting is then what it must do. Any other exit is a crash.
        crashes = [(i, code) for i, code in fleet.exits if code != EXIT_FENCED]
        assert crashes == [], f"workers exited under injected faults: {fleet.exits}"
        assert await h.ledger_problems() == NO_PROBLEMS
        # A soak that injected nothing tested nothing.
        assert all(count > 0 for count in by_kind.values()), f"some kinds of fault never happened: {by_kind}"
