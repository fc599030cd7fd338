"""The Grafana dashboard and the Prometheus alerts ask for series a real worker exports.

Every `ordo_*` name in an expression must be in the /metrics output of a worker
process that has done some work; labels an expression filters, groups or
prints by must be labels of the metrics it reads; rate() only on counters and
histogram parts. PyYAML is not a dependency: alerts.yml is read with a small
reader for the YAML it uses (block maps and lists, plain and quoted scalars,
`|` blocks), which also fails loudly on anything else.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time

from harness import ROOT, WELCOME, Harness, http

from bench.generator import trigger_event
from daemon import metrics
from daemon.servers import free_port

DASHBOARD = os.path.join(ROOT, "daemon", "ops", "grafana-dashboard.json")
ALERTS = os.path.join(ROOT, "daemon", "ops", "alerts.yml")

# -- a reader for the YAML subset of alerts.yml -----------------------------------------------


class _YamlSubset:
    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.i = 0

    def _peek(self):
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            stripped = raw.strip()
            if stripped and not stripped.startswith("#"):
                assert "\t" not in raw[: len(raw) - len(raw.lstrip())], f"tab indent on line {self.i + 1}"
                return len(raw) - len(raw.lstrip()), stripped
            self.i += 1
        return None

    def block(self, indent: int):
        peeked = self._peek()
        return self._list(indent) if peeked[1].startswith("- ") else self._map(indent)

    def _map(self, indent: int) -> dict:
        out = {}
        while (peeked := self._peek()) is not None and peeked[0] >= indent:
            at, content = peeked
            assert at == indent, f"unexpected indent on line {self.i + 1}: {content!r}"
            key, colon, rest = content.partition(":")
            assert colon and re.fullmatch(r"[A-Za-z_][\w.-]*", key), f"not a `key: value` on line {self.i + 1}"
            assert rest == "" or rest.startswith(" "), f"no space after the colon on line {self.i + 1}"
            assert key not in out, f"duplicate key {key!r} on line {self.i + 1}"
            self.i += 1
            out[key] = self._value(rest.strip(), indent)
        return out

    def _list(self, indent: int) -> list:
        out = []
        while (peeked := self._peek()) is not None and peeked[0] == indent and peeked[1].startswith("- "):
            item = peeked[1][2:]
            if ":" in item and (item.endswith(":") or ": " in item) and not item.startswith(('"', "'")):
                # `- key: value` opens a map whose keys sit two columns in.
                self.lines[self.i] = " " * (indent + 2) + item
                out.append(self._map(indent + 2))
            else:
                self.i += 1
                out.append(self._scalar(item))
        return out

    def _value(self, rest: str, indent: int):
        if rest in ("|", "|-", ">", ">-"):
            return self._block_scalar(rest, indent)
        if rest == "":
            peeked = self._peek()
            if peeked is None or peeked[0] < indent or (peeked[0] == indent and not peeked[1].startswith("- ")):
                return None
            return self.block(peeked[0])
        return self._scalar(rest)

    def _block_scalar(self, style: str, indent: int) -> str:
        body = []
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            if raw.strip() and len(raw) - len(raw.lstrip()) <= indent:
                break
            body.append(raw)
            self.i += 1
        while body and not body[-1].strip():
            body.pop()
        margin = min(len(b) - len(b.lstrip()) for b in body if b.strip())
        lines = [b[margin:] for b in body]
        text = "\n".join(lines) if style.startswith("|") else " ".join(line.strip() for line in lines)
        return text if style.endswith("-") else text + "\n"

    @staticmethod
    def _scalar(text: str):
        if text.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(text)
            assert not text[end:].strip() or text[end:].strip().startswith("#"), text
            return value
        if text.startswith("'"):
            assert text.endswith("'"), text
            return text[1:-1].replace("''", "'")
        text = re.split(r"\s+#", text, maxsplit=1)[0].strip()
        assert not text.startswith(("{", "[", "&", "*", "!", "%", "@", "`")), f"unsupported YAML: {text!r}"
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if re.fullmatch(r"-?\d+\.\d*", text):
            return float(text)
        return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def load_yaml_subset(text: str):
    reader = _YamlSubset(text)
    doc = reader.block(0)
    assert reader._peek() is None, f"unparsed YAML from line {reader.i + 1}"
    return doc


def test_the_yaml_reader_reads_what_it_claims():
    doc = load_yaml_subset(
        "# c\na: 1\nb:\n  - name: x  # trailing\n    expr: |\n      up == 0\n        and on()\n    for: 5m\n"
        "  - plain\nc: \"q: {{ $labels.x }}\"\nd: 'it''s'\ne: >-\n  one\n  two\n"
    )
    assert doc == {
        "a": 1,
        "b": [{"name": "x", "expr": "up == 0\n  and on()\n", "for": "5m"}, "plain"],
        "c": "q: {{ $labels.x }}",
        "d": "it's",
        "e": "one two",
    }


# -- what the assets ask for --------------------------------------------------------------------


def alerts() -> list[dict]:
    with open(ALERTS) as fh:
        doc = load_yaml_subset(fh.read())
    assert list(doc) == ["groups"]
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert all(set(group) == {"name", "rules"} for group in doc["groups"])
    return rules


def dashboard() -> dict:
    with open(DASHBOARD) as fh:
        return json.load(fh)


def dashboard_targets() -> list[dict]:
    return [t for p in dashboard()["panels"] for t in p.get("targets", [])]


NAME = re.compile(r"\b(ordo_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b(ordo_[a-z0-9_]+)\{([^}]*)\}")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
RATE_ARG = re.compile(r"\b(?:rate|irate|increase)\(\s*(ordo_[a-z0-9_]+)")
TARGET_LABELS = {"instance", "job"}  # attached by Prometheus to every scraped series


def _base(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _declared() -> dict[str, tuple[str, set[str]]]:
    """{exported family name: (type, label names)} from daemon.metrics itself."""
    out = {}
    for obj in vars(metrics).values():
        if hasattr(obj, "_labelnames") and hasattr(obj, "_type"):
            name = obj._name + ("_total" if obj._type == "counter" else "")
            out[name] = (obj._type, set(obj._labelnames))
    return out


def _expressions() -> list[tuple[str, str, list[str]]]:
    """(where, expr, label names the output must carry) for every expression in both assets."""
    found = []
    for rule in alerts():
        printed = re.findall(r"\$labels\.(\w+)", json.dumps(rule.get("annotations", {})))
        found.append((f"alert {rule['alert']}", rule["expr"], printed))
    for target in dashboard_targets():
        found.append(
            (
                f"panel target {target['expr'][:40]}",
                target["expr"],
                re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")),
            )
        )
    return found


def test_the_assets_cover_what_the_operators_asked_for():
    names = {rule["alert"] for rule in alerts()}
    assert names == {
        "OrdoWorkerDown",
        "OrdoExecutionFailureRate",
        "OrdoCommitLatencyHigh",
        "OrdoNoProgress",
        "OrdoConsumerLagHigh",
        "OrdoDeadLettersRising",
        "OrdoRolloutRolledBack",
    }
    for rule in alerts():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["labels"]["severity"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
    by_name = {r["alert"]: r["expr"] for r in alerts()}
    assert "> 0.01" in by_name["OrdoExecutionFailureRate"] and "[15m]" in by_name["OrdoExecutionFailureRate"]
    assert "histogram_quantile(0.99" in by_name["OrdoCommitLatencyHigh"] and "> 1" in by_name["OrdoCommitLatencyHigh"]
    assert 'up{job="ordo"} == 0' in by_name["OrdoWorkerDown"]
    assert "ordo_consumer_lag" in by_name["OrdoConsumerLagHigh"]

    board = dashboard()
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert board["uid"] and board["schemaVersion"] >= 30
    exprs = " ".join(t["expr"] for t in dashboard_targets())
    for wanted in (
        "ordo_transitions_total",
        "ordo_enrolments_total",
        "ordo_dead_letters_total",
        "ordo_ledger_commit_seconds_bucket",
        "ordo_ledger_batch_rows_bucket",
        "ordo_messages_in_flight",
        "ordo_ring_occupancy",
        "ordo_redeliveries_total",
        "ordo_nats_fetch_seconds_bucket",
        'ordo_executions_finished_total{status="failed"',
    ):
        assert wanted in exprs, wanted
    # The failure rate the < 1% a day goal is judged on: failed over finished, over a day.
    assert any(
        'increase(ordo_executions_finished_total{status="failed"' in t["expr"]
        and "[1d]" in t["expr"]
        and "/" in t["expr"]
        for t in dashboard_targets()
    )
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, panel["title"]
    # No two panels overlap on the grid.
    cells = set()
    for panel in panels:
        g = panel["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, panel["title"]
        cells |= mine


def test_every_metric_the_worker_declares_has_a_panel():
    """A series nobody can see is a series nobody watches: each family in daemon/metrics.py is on the dashboard."""
    read = {_base(name) for t in dashboard_targets() for name in NAME.findall(t["expr"])}
    missing = sorted(set(_declared()) - read)
    assert not missing, f"no dashboard panel reads {missing}: add one to daemon/ops/grafana-dashboard.json"


def test_labels_and_functions_fit_the_metrics_they_read():
    declared = _declared()
    for where, expr, printed in _expressions():
        # An expression without ordo_* series (`up`) still has the target labels.
        used = {_base(n) if _base(n) in declared else n for n in NAME.findall(expr)}
        allowed = set(TARGET_LABELS)
        for name in used:
            assert name in declared, f"{where}: {name} is not defined in daemon/metrics.py"
            allowed |= declared[name][1]
        if "histogram_quantile" in expr:
            allowed.add("le")
        for name, matchers in SELECTOR.findall(expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in allowed, f"{where}: {name} has no label {label!r}"
        grouped = set()
        for clause in GROUPING.findall(expr):
            for label in filter(None, (s.strip() for s in clause.split(","))):
                assert label in allowed, f"{where}: grouping by unknown label {label!r}"
                grouped.add(label)
        for name in RATE_ARG.findall(expr):
            kind = declared.get(_base(name), declared.get(name, ("?",)))[0]
            assert kind == "counter" or (kind == "histogram" and name != _base(name)), (
                f"{where}: rate/increase over {name}, a {kind}"
            )
        # What a legend or annotation prints must survive the aggregation.
        aggregated = re.search(r"\b(sum|avg|min|max|count)\b\s*(by\s*\(|\()", expr)
        visible = grouped if aggregated else allowed
        for label in printed:
            assert label in visible, f"{where}: prints {label!r}, which the expression drops"


# -- against a worker that has done some work ---------------------------------------------------


def _exported(text: str) -> set[str]:
    """Every series name the exposition defines, with the _bucket/_sum/_count of each histogram."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind in ("histogram", "summary"):
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _sample(text: str, series: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(series + " ") or line.startswith(series + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_every_series_the_assets_read_is_exported_by_a_working_worker(nats_server_url, pg_dsn, prefix):
    port = free_port()
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(WELCOME)
        env = h.env()
        env["ORDO_METRICS_PORT"] = str(port)
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run", "--worker-index", "0", "--workers", "1"], env=env, cwd=ROOT
        )
        h.processes.append(proc)
        events = [trigger_event("ops", i, tenant="acme", event_type="contact.created") for i in range(20)]
        events.append(trigger_event("ops", 20, tenant="acme", event_type="page.viewed"))  # matches nothing
        events.append(trigger_event("ops", 21, tenant="nobody", event_type="contact.created"))  # dead letter
        await h.publish_triggers(events)

        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the worker exited with {proc.returncode}"
            try:
                status, _, body = await http(port, "/metrics")
            except (TimeoutError, OSError):
                await asyncio.sleep(0.1)
                continue
            text = body.decode()
            if (
                status == 200
                and _sample(text, 'ordo_executions_finished_total{status="completed"}') >= 20
                and _sample(text, "ordo_dead_letters_total") >= 1
                and _sample(text, "ordo_nats_ack_seconds_count") >= 1
            ):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the worker did not process the triggers:\n{text}")
        assert _sample(text, "ordo_triggers_received_total") == len(events)
        assert _sample(text, "ordo_triggers_unmatched_total") == 1
        # No execution failed, and still the failure rate has a numerator to read (zero, not "no data").
        assert 'ordo_executions_finished_total{status="failed"} 0.0' in text

        exported = _exported(text)
        assert not set(_declared()) - exported, "daemon/metrics.py declares families the worker does not export"
        for where, expr, _ in _expressions():
            for name in NAME.findall(expr):
                assert name in exported, f"{where}: {name} is not in the worker's /metrics"
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 60) == 0
