"""Structured logs: JSON lines that say which worker, execution, tenant and step, and why it failed.

A worker runs in this process with a workflow whose action crashes; the
lines it logs are captured through the JSON formatter the daemon installs.
"""

import asyncio
import io
import logging
import os
import pty
import re
import subprocess
import sys

import orjson
import pytest
from harness import Harness

from actions.plugins import default_registry
from bench.generator import trigger_event
from daemon import cli, config, logs
from daemon.worker import Worker

EXPLODING = {
    "id": "exploding",
    "tenant": "acme",
    "trigger": {"event": "order.placed"},
    "steps": [
        {"id": "note", "type": "action", "action": "log", "input": {"message": "about to explode"}},
        {"id": "explode", "type": "action", "action": "boom", "input": {}, "retry": {"max_attempts": 1}},
    ],
}


class Boom:
    """An action that crashes: a bug in an action, not a typed ActionError."""

    name = "boom"
    major = 1

    def validate(self, input: dict) -> None:
        pass

    async def run(self, ctx, input: dict) -> dict:
        raise RuntimeError("the provider client blew up")


class JsonLines:
    """The root logger's lines, through daemon.logs.JsonFormatter, while in the `with` block."""

    def __enter__(self):
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(logs.JsonFormatter())
        root = logging.getLogger()
        self.level = root.level
        root.addHandler(self.handler)
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.level)

    def lines(self) -> list[dict]:
        return [orjson.loads(line) for line in self.buffer.getvalue().splitlines()]


async def test_a_failing_action_logs_json_lines_with_worker_execution_tenant_step_and_reason(
    nats_server_url, pg_dsn, prefix
):
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(EXPLODING)
        event = trigger_event("logs", 1, tenant="acme", event_type="order.placed")
        execution_id = h.execution_id("acme", "exploding", event["event_id"])
        with JsonLines() as captured:
            actions = default_registry()
            actions.register(Boom())
            worker = Worker(h.config, actions=actions)
            await worker.start()
            run = asyncio.create_task(worker.run())
            try:
                await asyncio.wait_for(worker.ready.wait(), 10)
                await h.publish_triggers([event])
                await h.wait_until(
                    "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid",
                    execution_id,
                    expect="failed",
                    timeout=30,
                )
            finally:
                worker.stopping.set()
                await asyncio.wait_for(run, 60)
            lines = captured.lines()  # every line parses as JSON, or this raises

    ours = [line for line in lines if line["logger"].startswith("ordo")]
    assert ours, "the worker logged nothing: the test would prove nothing"
    for line in ours:
        assert line["worker"] == worker.name, line
        assert {"ts", "level", "msg", "pid"} <= set(line), line

    about = [line for line in ours if line.get("execution_id") == execution_id]
    for line in about:
        assert line["tenant"] == "acme" and line["step"] in ("note", "explode"), line

    # The workflow's own log step.
    note = [line for line in about if line["msg"] == "about to explode"]
    assert len(note) == 1 and note[0]["step"] == "note" and note[0]["level"] == "info"
    # The crash, with its traceback.
    crashed = [line for line in about if line["msg"] == "action boom@1 crashed"]
    assert len(crashed) == 1 and crashed[0]["step"] == "explode" and crashed[0]["attempt"] == 1
    assert "RuntimeError: the provider client blew up" in crashed[0]["exc"]
    # The step failing for good: a dead letter with its reason and error.
    failed = [line for line in about if line.get("reason") == "step_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "warning" and failed[0]["step"] == "explode"
    assert failed[0]["workflow_id"] == "exploding" and "action_crashed" in failed[0]["error"]


async def test_each_worker_in_a_process_labels_its_own_lines():
    """The worker name is a context variable: tasks started by one worker keep its name."""
    log = logging.getLogger("ordo.test")

    async def worker(name: str) -> None:
        logs.bind_worker(name)
        await asyncio.sleep(0)
        await asyncio.create_task(asyncio.sleep(0))
        log.info("hello from %s", name)
        await asyncio.get_running_loop().create_task(_child(log, name))

    with JsonLines() as captured:
        await asyncio.gather(worker("host/1/w0"), worker("host/1/w1"))
        log.info("from the test itself")
    lines = captured.lines()
    by_msg = {line["msg"]: line.get("worker") for line in lines}
    assert by_msg["hello from host/1/w0"] == by_msg["child of host/1/w0"] == "host/1/w0"
    assert by_msg["hello from host/1/w1"] == by_msg["child of host/1/w1"] == "host/1/w1"
    assert by_msg["from the test itself"] is None


async def _child(log, name: str) -> None:
    log.info("child of %s", name)


def test_credentials_in_urls_are_masked_in_every_field():
    log = logging.getLogger("ordo.test")
    with JsonLines() as captured:
        try:
            raise ConnectionError("cannot reach postgresql://ordo:hunter2@db.internal:5432/ordo")
        except ConnectionError as exc:
            log.error(
                "ledger down: %s",
                exc,
                exc_info=True,
                extra=logs.failure("ledger_connection", exc, url="nats://app:s3cr3t@nats:4222"),
            )
    (line,) = captured.lines()
    text = orjson.dumps(line).decode()
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "postgresql://ordo:***@db.internal:5432/ordo" in line["msg"]
    assert line["url"] == "nats://app:***@nats:4222" and line["reason"] == "ledger_connection"
    assert "***" in line["error"] and "***" in line["exc"]


_LOG_ONE_LINE = """
import logging, sys
from daemon import logs
logs.configure("info", sys.argv[1])
logs.bind_worker("host/4711/w0")
logging.getLogger("ordo.test").warning(
    "partition %d handed over", 3, extra=logs.execution("e-1", "acme", note="two words", url="nats://a:pw@h:1")
)
"""


def _stderr_of_one_line(log_format: str, *, terminal: bool) -> str:
    """What a process that configures the logs and logs one line writes on its stderr: a pipe, or a terminal."""
    if not terminal:
        done = subprocess.run([sys.executable, "-c", _LOG_ONE_LINE, log_format], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stderr
    leader, follower = pty.openpty()
    child = subprocess.Popen([sys.executable, "-c", _LOG_ONE_LINE, log_format], stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert child.wait() == 0
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_on_a_terminal_a_line_is_readable_and_carries_the_same_fields():
    (line,) = _stderr_of_one_line("auto", terminal=True).splitlines()
    assert not line.startswith("{")
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} WARNING w0/4711  partition 3 handed over  ", line), line
    fields = line.split("  ", 2)[2]
    assert "execution_id=e-1" in fields and "tenant=acme" in fields
    assert 'note="two words"' in fields  # a value with a space stays one field
    assert "url=nats://a:***@h:1" in fields and "pw" not in line


def test_off_a_terminal_lines_stay_json_unless_text_is_asked_for():
    (piped,) = _stderr_of_one_line("auto", terminal=False).splitlines()
    doc = orjson.loads(piped)
    assert doc["msg"] == "partition 3 handed over" and doc["worker"] == "host/4711/w0" and doc["tenant"] == "acme"
    (text,) = _stderr_of_one_line("text", terminal=False).splitlines()
    assert "WARNING w0/4711  partition 3 handed over" in text
    (json_on_tty,) = _stderr_of_one_line("json", terminal=True).splitlines()
    assert orjson.loads(json_on_tty)["level"] == "warning"


def test_a_log_format_that_does_not_exist_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("ORDO_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format must be one of auto, json, text, not 'xml'"):
        config.load()
    done = subprocess.run([sys.executable, "-m", "daemon", "check"], capture_output=True, text=True)
    assert done.returncode == 1 and "ordo: bad configuration: log_format must be one of" in done.stderr


def test_ordo_dev_shows_warnings_and_up_unless_told_and_its_workers_inherit_the_level(monkeypatch):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        for argv, env_level, expected in (
            (["dev"], None, "warning"),
            (["--log-level", "info", "dev"], None, "info"),
            (["dev"], "debug", "debug"),
            (["run"], None, "info"),
        ):
            monkeypatch.delenv("ORDO_LOG_LEVEL", raising=False)
            if env_level:
                monkeypatch.setenv("ORDO_LOG_LEVEL", env_level)
            cli._setup_logging(cli.build_parser().parse_args(argv), config.load())
            assert root.level == getattr(logging, expected.upper()), argv
            if argv[-1] == "dev":
                assert os.environ["ORDO_LOG_LEVEL"] == expected  # what the workers it starts read
    finally:
        root.handlers[:], root.level = handlers, level
