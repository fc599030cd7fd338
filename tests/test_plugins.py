"""In-process actions as plug-ins (actions/plugins.py): entry points, the action_plugins setting, bad plug-ins.

The last tests follow README's "Add an action" word for word: they take its
three files out of the README, `pip install` the package and run a real
worker (NATS, Postgres) whose workflow calls the new action. pip installs with
`--target` into a directory of the test's put first on sys.path, not into the
virtualenv, which other checkouts share (and `--no-build-isolation` cannot
build here: the environment has no `wheel`).

The other tests install made-up distributions by writing what pip leaves (the
modules and a .dist-info with METADATA and entry_points.txt, which is all
importlib.metadata reads): fast, and able to fake an older install of Ordo.
"""

import ast
import asyncio
import configparser
import importlib
import ipaddress
import re
import sys
import tomllib
from pathlib import Path

import orjson
import pytest
from harness import NO_PROBLEMS, Harness, importable, pip_install_how_to, readme_how_to, worker_command

from actions import plugins
from actions.contract import ActionContext, invoke
from actions.settings import Settings
from bench.generator import trigger_event
from daemon.config import Config

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = {("noop", 1), ("log", 1), ("webhook", 1)}

#: A module of plug-ins, good and bad.
KIT = '''
class Echo:
    """A plain Action class: the loader calls it with no argument."""

    name = "echo"
    major = 1

    def validate(self, input):
        pass

    async def run(self, ctx, input):
        return {"echo": input}


class Echo2(Echo):
    major = 2


ECHO_2 = Echo2()


class Allowing(Echo):
    name = "allowing"

    def __init__(self, settings):
        self.settings = settings


def allowing(settings):
    """A factory that asks for the settings by name."""
    return Allowing(settings)


class Noop(Echo):
    name = "noop"


class SyncRun(Echo):
    name = "sync"

    def run(self, ctx, input):
        return {}


class BadMajor(Echo):
    major = "1"


NOT_AN_ACTION = 42


def broken_factory():
    raise RuntimeError("no credentials")


def returns_none():
    return None
'''


# -- installing a package the way pip leaves it -----------------------------------


def install(
    site: Path,
    *,
    name: str,
    version: str = "0.1.0",
    modules: dict[str, str] | None = None,
    entry_points: dict[str, dict[str, str]] | None = None,
) -> None:
    """Write `modules` (name -> source) and `name`'s .dist-info, with `entry_points` (group -> name -> target)."""
    for module, source in (modules or {}).items():
        (site / f"{module}.py").write_text(source)
    dist_info = site / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist_info / "INSTALLER").write_text("test_plugins\n")
    if entry_points:
        parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        parser.optionxform = str  # entry point names keep their case
        parser.read_dict(entry_points)
        with (dist_info / "entry_points.txt").open("w") as fh:
            parser.write(fh)
    importlib.invalidate_caches()


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory first on sys.path, as site-packages is; what was imported from it is forgotten afterwards."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    yield path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]
    importlib.invalidate_caches()


def kit(site: Path, **entry_points: str) -> None:
    """The KIT module, installed as the package ordo-kit declaring `entry_points` (name -> target)."""
    install(
        site,
        name="ordo-kit",
        modules={"ordo_kit": KIT},
        entry_points={plugins.GROUP: entry_points} if entry_points else None,
    )


def keys(registry) -> set[tuple[str, int]]:
    return {(a.name, a.major) for a in registry}


# -- Ordo's own ---------------------------------------------------------------------


def test_the_built_ins_are_ordo_s_entry_points_and_the_webhook_s_factory_gets_the_settings():
    with (ROOT / "pyproject.toml").open("rb") as fh:
        declared = tomllib.load(fh)["project"]["entry-points"][plugins.GROUP]
    assert set(declared) == {"noop", "log", "webhook"}
    registry = plugins.default_registry(Settings(webhook_allow="10.1.0.0/16, 127.0.0.1"))
    assert keys(registry) == BUILTINS
    assert registry.get("webhook", 1).policy.allow == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    assert plugins.default_registry().get("webhook", 1).policy.allow == ()


def test_the_contract_imports_neither_the_built_ins_nor_the_loader():
    """The cycle is gone: contract.py builds no registry, not even through an import inside a function."""
    tree = ast.parse((ROOT / "actions" / "contract.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if "builtin" in name or "plugins" in name], imported


def test_from_a_source_tree_ordo_s_entry_points_come_from_its_pyproject_not_older_metadata(site, monkeypatch):
    # An install of Ordo older than the tree: its metadata declares another set.
    install(
        site,
        name="ordo",
        entry_points={plugins.GROUP: {"noop": "actions.builtin.noop:NoopAction", "gone": "ordo_gone:Gone"}},
    )
    own = plugins.own_entry_points()
    assert [p.name for p in own] == ["noop", "log", "webhook"]
    assert all("source tree" in p.origin for p in own)
    assert not [p for p in plugins.other_entry_points() if p.name in ("noop", "gone")]
    assert BUILTINS <= keys(plugins.registry(Settings()))  # and no duplicate noop from the old metadata

    # Installed, not run from a tree: the metadata is what there is.
    monkeypatch.setattr(plugins, "_source_tree_entry_points", lambda group: None)
    assert [(p.name, p.target) for p in plugins.own_entry_points()] == [
        ("noop", "actions.builtin.noop:NoopAction"),
        ("gone", "ordo_gone:Gone"),
    ]


def test_installed_metadata_without_ordo_s_entry_points_is_reported(site, monkeypatch, caplog):
    install(site, name="ordo")
    monkeypatch.setattr(plugins, "_source_tree_entry_points", lambda group: None)
    with caplog.at_level("WARNING", logger="ordo.actions.plugins"):
        assert plugins.own_entry_points() == []
    assert "reinstall Ordo" in caplog.text


# -- entry points and the setting ----------------------------------------------------


async def test_an_installed_package_s_entry_points_load_classes_objects_and_factories(site):
    kit(site, echo="ordo_kit:Echo", **{"echo-2": "ordo_kit:ECHO_2", "allowing": "ordo_kit:allowing"})
    settings = Settings(webhook_allow="10.9.0.0/16")
    registry = plugins.registry(settings)
    assert BUILTINS | {("echo", 1), ("echo", 2), ("allowing", 1)} <= keys(registry)
    assert registry.get("allowing", 1).settings is settings
    ctx = ActionContext("e", "s", 1, "e:s:0", 0)
    assert (await invoke(registry.get("echo", 2), ctx, {"a": 1}))["output"] == {"echo": {"a": 1}}
    # What the registry was built from is named by entry point and distribution.
    origins = {p.name: p.origin for p in plugins.other_entry_points()}
    assert origins["echo"] == f"entry point in {plugins.GROUP} of ordo-kit 0.1.0"


def test_the_setting_adds_plug_ins_that_no_package_declares(site):
    (site / "ordo_kit.py").write_text(KIT)
    registry = plugins.registry(Settings(), " ordo_kit:Echo , ordo_kit:ECHO_2,, ")
    assert BUILTINS | {("echo", 1), ("echo", 2)} <= keys(registry)
    # The engine's registry takes the setting from its Config.
    from daemon.worker import _in_process_actions

    config = Config(action_plugins="ordo_kit:allowing")
    actions = _in_process_actions(config)
    assert BUILTINS | {("allowing", 1)} <= keys(actions) and actions.get("allowing", 1).settings is config


def test_a_setting_item_that_is_not_module_colon_object_is_refused():
    with pytest.raises(plugins.PluginError) as caught:
        plugins.configured("ordo_kit:Echo, ordo_kit.Echo")
    assert str(caught.value) == (
        "action plug-in 'ordo_kit.Echo' (setting action_plugins): not MODULE:OBJECT (e.g. 'ordo_greet:Greet')"
    )


@pytest.mark.parametrize(
    "target, why",
    [
        ("ordo_missing:Greet", "cannot import it: ModuleNotFoundError: No module named 'ordo_missing'"),
        ("ordo_kit:Nothing", "cannot import it: AttributeError: module 'ordo_kit' has no attribute 'Nothing'"),
        ("ordo_crash:Greet", "cannot import it: ImportError: needs libgreet"),
        ("ordo_kit:NOT_AN_ACTION", "it names int 42, not an Action"),
        ("ordo_kit:broken_factory", "its factory raised RuntimeError: no credentials"),
        ("ordo_kit:returns_none", "its factory returned NoneType None, not an Action"),
        ("ordo_kit:SyncRun", "its factory returned sync@1, whose run is not async"),
        ("ordo_kit:BadMajor", "its factory returned echo, whose major is '1', not an integer >= 1"),
    ],
)
def test_a_broken_entry_point_stops_the_start_naming_itself(site, target, why):
    (site / "ordo_crash.py").write_text('raise ImportError("needs libgreet")\n')
    kit(site, bad=target)
    with pytest.raises(plugins.PluginError) as caught:
        plugins.registry(Settings())
    message = str(caught.value)
    assert message.startswith(f"action plug-in 'bad = {target}' (entry point in {plugins.GROUP} of ordo-kit 0.1.0): ")
    assert why in message


def test_a_broken_setting_item_stops_the_engine_s_registry_naming_itself():
    from daemon.worker import _in_process_actions

    with pytest.raises(
        plugins.PluginError,
        match=r"^action plug-in 'ordo_missing:Greet' \(setting action_plugins\)"
        r": cannot import it: ModuleNotFoundError",
    ):
        _in_process_actions(Config(action_plugins="ordo_missing:Greet"))


def test_a_second_plug_in_with_the_same_name_and_major_is_refused_naming_both(site):
    kit(site, **{"my-noop": "ordo_kit:Noop"})
    with pytest.raises(plugins.PluginError) as caught:
        plugins.registry(Settings())
    message = str(caught.value)
    assert message.startswith(
        f"action plug-in 'my-noop = ordo_kit:Noop' (entry point in {plugins.GROUP} of "
        f"ordo-kit 0.1.0): action noop@1 is already declared by action plug-in "
        f"'noop = actions.builtin.noop:NoopAction' (entry point in {plugins.GROUP} of ordo"
    )


def test_the_setting_may_not_repeat_an_entry_point_s_action(site):
    kit(site, echo="ordo_kit:Echo")
    with pytest.raises(plugins.PluginError) as caught:
        plugins.registry(Settings(), "ordo_kit:Echo")
    assert str(caught.value) == (
        "action plug-in 'ordo_kit:Echo' (setting action_plugins): action echo@1 is already declared by "
        f"action plug-in 'echo = ordo_kit:Echo' (entry point in {plugins.GROUP} of ordo-kit 0.1.0)"
    )


def test_an_external_action_worker_serves_an_installed_plug_in_by_name(site):
    from actions import worker

    kit(site, echo="ordo_kit:Echo")
    args = worker.build_parser().parse_args(
        ["--action", "echo@1", "--action", "webhook@1", "--webhook-allow", "10.2.0.0/16"]
    )
    echo, webhook = worker.select(args, Settings(webhook_allow="10.3.0.0/16"))
    assert (echo.name, echo.major) == ("echo", 1)
    assert webhook.policy.allow == (ipaddress.ip_network("10.2.0.0/16"), ipaddress.ip_network("10.3.0.0/16"))


# -- README's how-to, literally -------------------------------------------------------


@pytest.fixture(scope="module")
def greet_pip_installed(tmp_path_factory) -> tuple[Path, Path]:
    """The how-to's package, written as the README has it, and the directory `pip install` put it in."""
    files = readme_how_to("Add an action", {"ordo_greet.py", "test_greet.py", "pyproject.toml"})
    return pip_install_how_to(tmp_path_factory.mktemp("how-to"), "ordo-greet", files)


@pytest.fixture
def greet(greet_pip_installed, monkeypatch) -> Path:
    """The installed package on sys.path for one test, forgotten afterwards; the project's directory."""
    project, target = greet_pip_installed
    with importable(project, target, monkeypatch):
        yield project


def test_the_how_to_s_own_test_passes(greet, monkeypatch):
    monkeypatch.syspath_prepend(str(greet))  # the author runs their test from the project
    importlib.import_module("test_greet").test_greet()


async def test_the_how_to_s_action_runs_in_a_real_worker_with_no_change_to_ordo(
    greet, nats_server_url, pg_dsn, prefix, caplog
):
    workflow = {
        "id": "greeter",
        "tenant": "acme",
        "trigger": {"event": "contact.created"},
        "steps": [
            {"id": "hello", "type": "action", "action": "greet", "input": {"name": "{{contact.first_name}}"}},
            {"id": "done", "type": "end"},
        ],
    }
    event = trigger_event("greet", 1, tenant="acme", event_type="contact.created")
    async with Harness(nats_server_url, pg_dsn, prefix) as h:
        await h.deploy(workflow)
        execution_id = h.execution_id("acme", "greeter", event["event_id"])
        with caplog.at_level("INFO", logger="ordo.actions.plugins"):
            async with h.worker():  # a restart: the worker loads the plug-ins as it starts
                await h.publish_triggers([event])
                await h.wait_until(
                    "SELECT status FROM ordo.executions WHERE execution_id = $1::uuid",
                    execution_id,
                    expect="completed",
                    timeout=30,
                )
        assert f"greet@1 (entry point in {plugins.GROUP} of ordo-greet 0.1.0)" in caplog.text
        context = orjson.loads(
            await h.db.fetchval("SELECT context FROM ordo.executions WHERE execution_id = $1::uuid", execution_id)
        )
        greeting = {"greeting": f"Hello, {event['contact']['first_name']}!"}
        assert context["hello"] == greeting
        completed = await h.db.fetchval(
            "SELECT detail FROM ordo.transitions WHERE execution_id = $1::uuid AND kind = 'action_completed'",
            execution_id,
        )
        assert orjson.loads(completed)["output"] == greeting
        assert await h.ledger_problems() == NO_PROBLEMS


async def test_a_worker_process_with_a_bad_plug_in_exits_at_start_up_naming_it(nats_server_url, pg_dsn, prefix):
    """`ordo run` with a bad ORDO_ACTION_PLUGINS: one line naming the plug-in and why, exit 1, no traceback."""
    env = Harness(nats_server_url, pg_dsn, prefix).env(action_plugins="ordo_missing:Greet")
    proc = await asyncio.create_subprocess_exec(
        *worker_command(),
        env=env,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err.decode()[-2000:]
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert err.decode().splitlines()[-1] == (
        "ordo: action plug-in 'ordo_missing:Greet' (setting action_plugins): cannot import it: "
        "ModuleNotFoundError: No module named 'ordo_missing'"
    )
