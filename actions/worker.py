"""`python -m actions.worker`: an external action worker process.

    python -m actions.worker --example messaging                  # sms.send@1 and email.send@1
    python -m actions.worker --module mycompany.actions --action crm.tag@2
    python -m actions.worker --action webhook@1 --webhook-allow 10.20.0.0/16

Actions come from `--module` (a dotted module name or a .py path; its
`ACTIONS` list, or else every Action object it defines), from `--example`
(the modules in actions/examples/), and from the installed plug-ins (the
`ordo.actions` entry points: the built-ins noop, log and webhook, and any
installed package's; actions/plugins.py), which are served only when named by
`--action NAME@MAJOR`. Without `--action`, every action of the given modules
is served.

NATS and naming come from the Ordo configuration (ORDO_NATS_URL, ORDO_PREFIX,
ORDO_PARTITIONS, ... or the TOML file, see actions/settings.py; the engine's
own settings in the file are ignored); the partition count must be the
engine's. SIGTERM or SIGINT stops pulling, lets the requests in flight finish
(at most --drain-timeout seconds) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys

import uvloop

from . import plugins, settings
from .contract import Action
from .logs import configure as configure_logs
from .sdk import ActionWorker

log = logging.getLogger("ordo.actions.worker")

EXAMPLES = ("messaging",)


def load_module_actions(spec: str) -> list[Action]:
    """The actions a module offers: its `ACTIONS`, or every Action instance at its top level."""
    if spec.endswith(".py") or os.sep in spec:
        name = "ordo_actions_" + os.path.splitext(os.path.basename(spec))[0]
        module_spec = importlib.util.spec_from_file_location(name, spec)
        if module_spec is None or module_spec.loader is None:
            raise SystemExit(f"cannot load actions from {spec!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    found = getattr(module, "ACTIONS", None)
    if found is None:
        found = [obj for obj in vars(module).values() if not isinstance(obj, type) and isinstance(obj, Action)]
    return list(found)


def parse_action(text: str) -> tuple[str, int]:
    name, sep, major = text.rpartition("@")
    if not sep or not name or not major.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME@MAJOR (e.g. sms.send@1)")
    return name, int(major)


def select(args, config) -> list[Action]:
    """The actions to serve: those of the modules given, or those `--action` names (of the modules or plug-ins)."""
    offered: dict[tuple[str, int], Action] = {}
    for spec in [f"actions.examples.{e}" for e in args.example] + args.module:
        for item in load_module_actions(spec):
            offered[(item.name, item.major)] = item
    if not args.action:
        if not offered:
            raise SystemExit("nothing to serve: give --module, --example or --action NAME@MAJOR")
        return list(offered.values())
    # The plug-ins' factories get the settings, with --webhook-allow added to the file's webhook_allow.
    allow = [c.strip() for c in [*args.webhook_allow, *config.webhook_allow.split(",")] if c.strip()]
    try:
        installed = {(a.name, a.major): a for a in plugins.registry(config.with_(webhook_allow=",".join(allow)))}
    except plugins.PluginError as exc:
        raise SystemExit(str(exc)) from None
    chosen = []
    for key in args.action:
        item = offered.get(key) or installed.get(key)
        if item is None:
            known = ", ".join(f"{n}@{m}" for n, m in sorted(set(offered) | set(installed)))
            raise SystemExit(f"no action {key[0]}@{key[1]} (known: {known})")
        chosen.append(item)
    return chosen


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m actions.worker", description=__doc__.split("\n")[0])
    p.add_argument(
        "--action",
        action="append",
        type=parse_action,
        default=[],
        metavar="NAME@MAJOR",
        help="serve this action (repeatable); default: every action of the modules given",
    )
    p.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="MODULE",
        help="import actions from a module (dotted name or .py path; repeatable)",
    )
    p.add_argument(
        "--example",
        action="append",
        default=[],
        choices=EXAMPLES,
        help="serve an example module from actions/examples/",
    )
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight at most (default 64)")
    p.add_argument(
        "--ack-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a request held by a dead worker waits before it is redelivered (default 60)",
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS")
    p.add_argument(
        "--webhook-allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="a network the webhook action may reach although internal (repeatable)",
    )
    return p


async def serve(worker: ActionWorker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await worker.run(stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = settings.load(strict=False)
    configure_logs(config.log_level, config.log_format)
    if not config.nats_url:
        raise SystemExit("ORDO_NATS_URL is not set (or nats_url in the configuration file)")
    actions = select(args, config)
    worker = ActionWorker.from_config(
        config, actions, concurrency=args.concurrency, ack_wait_s=args.ack_wait, drain_timeout_s=args.drain_timeout
    )
    uvloop.run(serve(worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
