"""The registered context types: the `ordo.context_types` entry points and the `context_type_plugins` setting.

Declared like in-process actions (`actions/plugins.py` finds and imports
them): an entry point or a setting item names MODULE:OBJECT, a
`hotpath.context_types.ContextType` or a factory of one. Ordo's own `contact`
is an entry point of the `ordo` distribution. A plug-in that cannot be
imported, is not a ContextType, or repeats another's name stops the start-up
with a PluginError naming it.
"""

import logging

from actions import plugins
from actions.settings import Settings
from hotpath.context_types import ContextType

#: The entry-point group in which packages declare context types.
GROUP = "ordo.context_types"
#: The setting (daemon/config.py) that lists more of them, comma-separated.
SETTING = "context_type_plugins"

log = logging.getLogger("ordo.context_types")


def registry(settings: Settings, specs: str = "") -> dict[str, ContextType]:
    """Every registered context type by name: the entry points, then the items of `specs`; logs them."""
    found = _load(plugins.declared(specs, GROUP, SETTING), settings)
    log.info("context types: %s", ", ".join(sorted(found)) or "none")
    return found


def default_registry() -> dict[str, ContextType]:
    """Ordo's own context types alone (contact), whatever else is installed: for tests and tools."""
    return _load(plugins.own_entry_points(GROUP), Settings())


def _load(declared: list[plugins.Plugin], settings: Settings) -> dict[str, ContextType]:
    found: dict[str, ContextType] = {}
    declared_by: dict[str, plugins.Plugin] = {}
    for plugin in declared:
        obj, how = plugins.made(plugin, settings, ContextType)
        if not isinstance(obj, ContextType):
            raise plugins.PluginError(
                f"{plugin}: {how} {plugins.describe(obj)}, not a ContextType(name, schema) nor a factory of one"
            )
        if obj.name in declared_by:
            raise plugins.PluginError(
                f"{plugin}: context type {obj.name!r} is already declared by {declared_by[obj.name]}"
            )
        declared_by[obj.name] = plugin
        found[obj.name] = obj
    return found
