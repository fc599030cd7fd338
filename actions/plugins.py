"""In-process actions as plug-ins: the `ordo.actions` entry points and the `action_plugins` setting.

A plug-in is declared as MODULE:OBJECT, by an entry point of an installed
package (`[project.entry-points."ordo.actions"]` in its pyproject.toml, e.g.
`greet = "ordo_greet:Greet"`) or by an item of the engine's `action_plugins`
setting (`action_plugins = "ordo_greet:Greet, other.module:make"`, for a
module on the Python path that no package declares). OBJECT is either

- an Action object (name, major, `validate(input)`, `async run(ctx, input)`),
  used as it is; or
- a factory: a class or a function that returns an Action, called once per
  process at start-up. A factory with a parameter named `settings` is given
  the process's settings (actions.settings.Settings; the engine's Config
  extends it): that is how the webhook gets its `webhook_allow` list. Any
  other factory is called with no argument (a plain Action class).

Ordo's own actions (noop, log, webhook) are entry points of the `ordo`
distribution, declared the same way in its pyproject.toml. Run from a source
tree, Ordo reads those from the tree's pyproject.toml rather than from the
installed metadata, which can be older than the tree (an editable install made
before an entry point was added, a second worktree on the same environment).

A plug-in that cannot be imported, that is not an Action, or whose name@major
another plug-in already declared stops the start-up with a PluginError that
names it and where it was declared.

Context types (`hotpath.context_types`) are plug-ins declared the same way, in
the `ordo.context_types` group and the `context_type_plugins` setting: the
functions that find and import plug-ins take the group and the setting, and
`daemon/context_types.py` loads those with them.
"""

from __future__ import annotations

import inspect
import logging
import re
import tomllib
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .contract import Action, ActionRegistry
from .settings import Settings

#: The entry-point group in which packages declare in-process actions.
GROUP = "ordo.actions"
#: The setting (daemon/config.py) that lists more plug-ins, comma-separated.
SETTING = "action_plugins"
#: Ordo's own distribution, whose entry points are the built-ins.
DISTRIBUTION = "ordo"
#: What a plug-in of each group is, for messages.
KINDS = {GROUP: "action", "ordo.context_types": "context type"}

_TARGET = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

log = logging.getLogger("ordo.actions.plugins")


class PluginError(Exception):
    """A plug-in that cannot be loaded; the message names it, where it was declared and why."""


@dataclass(frozen=True)
class Plugin:
    """One declared plug-in: the MODULE:OBJECT it names, its entry-point name (if any), where it was declared."""

    target: str
    name: str | None
    origin: str
    group: str = GROUP

    def __str__(self) -> str:
        declared = f"{self.name} = {self.target}" if self.name else self.target
        return f"{KINDS.get(self.group, self.group)} plug-in {declared!r} ({self.origin})"


# -- where plug-ins are declared ----------------------------------------------


def declared(specs: str = "", group: str = GROUP, setting: str = SETTING) -> list[Plugin]:
    """Every plug-in to load: Ordo's own entry points, every other package's, then the items of `specs`."""
    return own_entry_points(group) + other_entry_points(group) + configured(specs, group, setting)


def own_entry_points(group: str = GROUP) -> list[Plugin]:
    """Ordo's entry points in the group: from its source tree's pyproject.toml if it runs from one, else installed."""
    from_tree = _source_tree_entry_points(group)
    if from_tree is not None:
        return from_tree
    own = [_from_entry_point(ep, group) for ep in metadata.entry_points(group=group) if _is_ordo(ep)]
    if not own:
        log.warning(
            "Ordo's installed metadata declares no %s entry points, so its built-in %ss are not "
            "loaded: it predates them; reinstall Ordo (pip install .)",
            group,
            KINDS.get(group, group),
        )
    return own


def other_entry_points(group: str = GROUP) -> list[Plugin]:
    """The entry points in the group of every installed package but Ordo."""
    return [_from_entry_point(ep, group) for ep in metadata.entry_points(group=group) if not _is_ordo(ep)]


def configured(specs: str, group: str = GROUP, setting: str = SETTING) -> list[Plugin]:
    """The items of a setting such as `action_plugins`: comma-separated MODULE:OBJECT."""
    plugins = []
    for item in (s.strip() for s in specs.split(",")):
        if not item:
            continue
        plugin = Plugin(item, None, f"setting {setting}", group)
        if not _TARGET.match(item):
            raise PluginError(f"{plugin}: not MODULE:OBJECT (e.g. 'ordo_greet:Greet')")
        plugins.append(plugin)
    return plugins


def _from_entry_point(ep: metadata.EntryPoint, group: str) -> Plugin:
    dist = ep.dist
    source = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return Plugin(ep.value, ep.name, f"entry point in {group} of {source}", group)


def _is_ordo(ep: metadata.EntryPoint) -> bool:
    return ep.dist is not None and _normalise(ep.dist.name) == DISTRIBUTION


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _source_tree_entry_points(group: str) -> list[Plugin] | None:
    """Ordo's entry points in its source tree's pyproject.toml; None when it does not run from a source tree."""
    path = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with path.open("rb") as fh:
            project = tomllib.load(fh).get("project", {})
    except OSError:
        return None
    except tomllib.TOMLDecodeError as exc:
        raise PluginError(f"cannot read Ordo's own {group} entry points from {path}: {exc}") from exc
    if _normalise(str(project.get("name", ""))) != DISTRIBUTION:
        return None
    table = project.get("entry-points", {}).get(group, {})
    return [
        Plugin(target, name, f"entry point in {group} of ordo, source tree {path}", group)
        for name, target in table.items()
    ]


# -- loading -------------------------------------------------------------------


def registry(settings: Settings, specs: str = "") -> ActionRegistry:
    """The in-process actions: every `ordo.actions` entry point, then the items of `specs` (`action_plugins`).

    What the engine and the action worker run; logs which actions came from where.
    """
    loaded = load_all(declared(specs), settings)
    by_origin: dict[str, list[str]] = {}
    for plugin, action in loaded:
        by_origin.setdefault(plugin.origin, []).append(f"{action.name}@{action.major}")
    log.info(
        "in-process actions: %s",
        "; ".join(f"{', '.join(keys)} ({origin})" for origin, keys in by_origin.items()) or "none",
    )
    return ActionRegistry(action for _, action in loaded)


def default_registry(settings: Settings | None = None) -> ActionRegistry:
    """Ordo's own actions alone (noop, log, webhook), whatever else is installed: for tests and tools."""
    loaded = load_all(own_entry_points(), settings if settings is not None else Settings())
    return ActionRegistry(action for _, action in loaded)


def load_all(plugins: typing.Iterable[Plugin], settings: Settings) -> list[tuple[Plugin, Action]]:
    """Load every plug-in; PluginError on the first that fails or repeats another's name@major."""
    loaded: list[tuple[Plugin, Action]] = []
    declared_by: dict[tuple[str, int], Plugin] = {}
    for plugin in plugins:
        action = load(plugin, settings)
        key = (action.name, action.major)
        if key in declared_by:
            raise PluginError(f"{plugin}: action {key[0]}@{key[1]} is already declared by {declared_by[key]}")
        declared_by[key] = plugin
        loaded.append((plugin, action))
    return loaded


def load(plugin: Plugin, settings: Settings) -> Action:
    """Import what the plug-in names and make its Action (calling it if it is a factory)."""
    return _checked(plugin, *made(plugin, settings, Action))


def made(plugin: Plugin, settings: Settings, product: type) -> tuple[object, str]:
    """What the plug-in names, called if it is a factory (a class, or a callable that is not a `product`).

    Returns the object and how it was had ("it names", "its factory returned"), for the caller's errors.
    """
    try:
        target = metadata.EntryPoint(plugin.name or plugin.target, plugin.target, plugin.group).load()
    except Exception as exc:
        raise PluginError(f"{plugin}: cannot import it: {type(exc).__name__}: {exc}") from exc
    if isinstance(target, type) or (callable(target) and not isinstance(target, product)):
        try:
            return _call(target, settings), "its factory returned"
        except Exception as exc:
            raise PluginError(f"{plugin}: its factory raised {type(exc).__name__}: {exc}") from exc
    return target, "it names"


def _call(factory: typing.Callable, settings: Settings) -> object:
    """A factory gets the settings when it has a parameter named `settings`, else no argument."""
    try:
        wants_settings = "settings" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature (some builtins)
        wants_settings = False
    return factory(settings=settings) if wants_settings else factory()


def _checked(plugin: Plugin, obj: object, how: str) -> Action:
    """`obj` if it is an Action the engine can call; PluginError saying what is missing otherwise."""
    if isinstance(obj, type) or not isinstance(obj, Action):
        raise PluginError(
            f"{plugin}: {how} {describe(obj)}, not an Action (an object with name, major, "
            f"validate(input) and async run(ctx, input)) nor a factory of one"
        )
    if type(obj.name) is not str or not obj.name:
        raise PluginError(f"{plugin}: {how} an action whose name is {obj.name!r}, not a non-empty string")
    if type(obj.major) is not int or obj.major < 1:
        raise PluginError(f"{plugin}: {how} {obj.name}, whose major is {obj.major!r}, not an integer >= 1")
    if not inspect.iscoroutinefunction(obj.run):
        raise PluginError(
            f"{plugin}: {how} {obj.name}@{obj.major}, whose run is not async (async def run(self, ctx, input))"
        )
    return obj


def describe(obj: object) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    return f"{type(obj).__name__} {obj!r:.80}"
