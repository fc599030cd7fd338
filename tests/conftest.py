"""Shared fixtures: one NATS and one Postgres server per test session (per test process:
pytest-xdist runs the suite in four), and per-test isolation on them (a fresh database, a
unique subject/stream prefix).

``ORDO_NATS_URL`` / ``ORDO_PG_DSN`` select existing servers; when unset, the
embedded ones from ``daemon.servers`` are started in a session tmp dir.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats as nats_py
import pytest
import uvloop

import hotpath
from daemon.servers import EmbeddedNats, EmbeddedPostgres, check_nats_server, read_nats_info

# -- uvloop for every test ---------------------------------------------------
# pytest-asyncio >= 1.4 chooses loops through the pytest_asyncio_loop_factories
# hook and deprecates overriding `event_loop_policy`; older versions only know
# the fixture. Use whichever the installed version supports.
try:
    from pytest_asyncio.plugin import PytestAsyncioSpecs as _Specs
except ImportError:  # pragma: no cover - old pytest-asyncio
    _Specs = None

if _Specs is not None and hasattr(_Specs, "pytest_asyncio_loop_factories"):

    @pytest.hookimpl(optionalhook=True)
    def pytest_asyncio_loop_factories(config, item):
        return {"uvloop": uvloop.new_event_loop}

else:  # pragma: no cover - old pytest-asyncio

    @pytest.fixture(scope="session")
    def event_loop_policy():
        return uvloop.EventLoopPolicy()


# -- servers -------------------------------------------------------------------
@pytest.fixture(scope="session")
def nats_embedded(tmp_path_factory):
    """The session's embedded nats-server, or None when ORDO_NATS_URL names another."""
    if os.environ.get("ORDO_NATS_URL"):
        yield None
        return
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def nats_server_url(nats_embedded):
    """URL of the session's NATS server (checked: >= 2.10 with JetStream)."""
    url = os.environ.get("ORDO_NATS_URL")
    if url:
        check_nats_server(read_nats_info(url))
        return url
    return nats_embedded.url


@pytest.fixture
def map_triggers(nats_embedded):
    """Gives the session's nats-server a deployment's lanes mapping (trigger_streams > 1 needs it);
    skips the test on an external server, whose configuration a test does not write."""

    def add(topology) -> None:
        if nats_embedded is None:
            pytest.skip("needs the embedded nats-server: the test writes its subject mappings")
        src, dest = topology.trigger_lane_mapping()
        nats_embedded.add_mappings({src: dest})

    return add


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory):
    """DSN (superuser, database `postgres`) of the session's Postgres server."""
    dsn = os.environ.get("ORDO_PG_DSN")
    if dsn:
        yield dsn
        return
    with EmbeddedPostgres(tmp_path_factory.mktemp("pg")) as server:
        yield server.dsn


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.fixture
async def pg_dsn(pg_server_dsn):
    """DSN of a fresh, empty database `ordo_t_<hex>`, dropped after the test."""
    name = f"ordo_t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(pg_server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield _with_database(pg_server_dsn, name)
    conn = await asyncpg.connect(pg_server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def prefix(nats_server_url):
    """A unique subject/stream prefix, e.g. ``t3f9a0c1b2d``.

    Streams named ``<PREFIX>_...`` (upper case) are deleted after the test.
    """
    value = "t" + secrets.token_hex(5)
    yield value
    stream_prefix = value.upper() + "_"
    nc = await nats_py.connect(nats_server_url)
    try:
        js = nc.jetstream()
        doomed, offset = [], 0
        while True:  # STREAM.LIST is paged
            page = await js.streams_info_iterator(offset=offset)
            names = [info.config.name for info in page]
            doomed += [name for name in names if name.startswith(stream_prefix)]
            offset += len(names)
            if not names or offset >= page.total:
                break
        for name in doomed:
            await js.delete_stream(name)
    finally:
        await nc.close()


@pytest.fixture
async def nats(nats_server_url):
    """A connected nats-py client, closed after the test."""
    nc = await nats_py.connect(nats_server_url)
    yield nc
    await nc.close()


@pytest.fixture
async def target():
    """A local HTTP endpoint (harness.Target) that records every call: the webhook action's third party."""
    from harness import Target

    t = await Target().start()
    yield t
    await t.stop()


# -- both hot-path implementations -------------------------------------------------
@pytest.fixture(scope="module", params=hotpath.implementations(), ids=["compiled", "pure"])
def impl(request):
    """The compiled and the pure twin in turn, for one test body (uvloop's and aiohttp's way).

    The compiled one fails, not skips, when the extensions were expected but not
    built; HOTPATH_NO_EXTENSIONS=1 skips it on purpose.
    """
    name, namespace = request.param
    if namespace is None:
        if hotpath.NO_EXTENSIONS:
            pytest.skip(hotpath.COMPILED_UNAVAILABLE)
        pytest.fail(f"{name}: {hotpath.COMPILED_UNAVAILABLE}")
    return namespace
