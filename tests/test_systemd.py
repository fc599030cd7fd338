"""The systemd units and the example config: systemd's own checker, and what our
code relies on (Type=notify, the watchdog, a stop timeout above the drain)."""

import configparser
import os
import shutil
import subprocess
import tomllib
from dataclasses import fields

import pytest
from harness import ROOT

from daemon.config import Config, load

UNITS = os.path.join(ROOT, "systemd")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (apt-get install -y systemd)"
)


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}} (keys may repeat in systemd units)."""
    parsed: dict[str, dict[str, list[str]]] = {}
    section = None
    with open(os.path.join(UNITS, name)) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = parsed.setdefault(line.strip("[]"), {})
                continue
            key, _, value = line.partition("=")
            section.setdefault(key, []).append(value)
    return parsed


@pytest.fixture
def verifiable_units(tmp_path):
    """The units copied to tmp with ExecStart pointing at stub executables.

    `systemd-analyze verify` fails a unit whose ExecStart binary does not
    exist, and /opt/ordo/.venv is not installed on a test machine; the stubs
    stand in for `ordo` and `python`, everything else is verified as shipped.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for stub in ("ordo", "python"):
        path = bin_dir / stub
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    for name in ("ordo@.service", "ordo.target", "ordo-action-worker@.service"):
        text = open(os.path.join(UNITS, name)).read()
        assert text.count("/opt/ordo/.venv/bin/") == (1 if name.endswith(".service") else 0)
        (tmp_path / name).write_text(text.replace("/opt/ordo/.venv/bin/", f"{bin_dir}/"))
    return tmp_path


@needs_systemd_analyze
@pytest.mark.parametrize(
    "instance", ["ordo@0.service", "ordo@3.service", "ordo-action-worker@0.service", "ordo.target"]
)
def test_systemd_analyze_verify_is_clean(verifiable_units, instance):
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(verifiable_units / instance)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on mere warnings (an unknown key, an unparsable value is
    # "ignoring"), so its output must be empty too.
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


@needs_systemd_analyze
def test_verify_would_catch_a_broken_unit(verifiable_units):
    # The check above is only worth something if verify complains about what we could get wrong.
    broken = (verifiable_units / "ordo@.service").read_text().replace("CPUAffinity=%i", "CPUAffinity=%i\nTyp=notify")
    (verifiable_units / "broken@.service").write_text(broken)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(verifiable_units / "broken@0.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Unknown key 'Typ'" in result.stderr
    # An instance name that is not a CPU number: CPUAffinity=%i does expand.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(verifiable_units / "ordo@x.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Failed to parse CPU affinity 'x'" in result.stderr


@needs_systemd_analyze
def test_hardening_rates_ok(verifiable_units):
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(verifiable_units / "ordo@0.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    verdict = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert verdict, result.stdout + result.stderr
    exposure = float(verdict[0].split(":")[1].split()[0])
    assert exposure <= 2.0, verdict[0]


def test_the_worker_unit_says_what_the_code_expects():
    service = unit("ordo@.service")["Service"]
    one = {key: values[-1] for key, values in service.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == "/opt/ordo/.venv/bin/ordo run --worker-index %i"
    assert one["Restart"] == "on-failure" and one["KillSignal"] == "SIGTERM"
    assert one["CPUAffinity"] == "%i" and one["LimitNOFILE"] == "65536"
    assert one["EnvironmentFile"] == "-/etc/ordo/ordo.env"
    assert one["Environment"] == "ORDO_CONFIG=/etc/ordo/ordo.toml"
    assert one["User"] == one["Group"] == "ordo"
    # The drain is bounded by ack_wait_s: systemd must not SIGKILL a worker that is still draining.
    assert int(one["TimeoutStopSec"]) > Config().ack_wait_s + 5
    # The worker pings every WatchdogSec/2; a period of seconds leaves room for a slow scrape or GC.
    assert int(one["WatchdogSec"]) >= 5
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "ReadWritePaths": "/var/lib/ordo",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert one[key] == value, key
    assert unit("ordo@.service")["Unit"]["PartOf"] == ["ordo.target"]
    target = unit("ordo.target")["Unit"]
    assert target["Wants"] == ["ordo@0.service ordo@1.service"]
    action = unit("ordo-action-worker@.service")["Service"]
    assert action["ExecStart"] == ["/opt/ordo/.venv/bin/python -m actions.worker %i"]


def test_the_example_config_lists_every_setting_with_its_default(monkeypatch):
    for name in [n for n in os.environ if n.startswith("ORDO_")]:
        monkeypatch.delenv(name)  # CI sets ORDO_PG_DSN; the file alone is under test
    path = os.path.join(UNITS, "ordo.toml.example")
    with open(path, "rb") as fh:
        example = tomllib.load(fh)
    defaults = {f.name: f.default for f in fields(Config)}
    assert set(example) == set(defaults)
    assert example == defaults
    # And the loader takes the file as it is.
    assert load(path) == Config()
    # Every setting has a comment right above it.
    lines = open(path).read().splitlines()
    for name in defaults:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = "))
        assert lines[at - 1].startswith("#"), name


def test_the_unit_files_parse_as_ini():
    # A second, independent reader: a stray line or section typo shows up here even without systemd.
    for name in ("ordo@.service", "ordo.target", "ordo-action-worker@.service"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(os.path.join(UNITS, name))
        assert "Unit" in parser and "Install" in parser
