"""``fedlora privacy-plan PRESET [--set key=value ...]``: a run's DP plan, without training it.

It prints what a simulation of the preset prints before its first round (the server's
:func:`~fedlora.server.privacy.announce_plan`): per client (local DP) or for the federation
(central DP) the noise multiplier, expected batch, sampling rate, steps over the run, the
epsilon at the end, one step's noise-to-signal ratio, and the "cannot learn" warning when the
rule of thumb of :mod:`fedlora.privacy.plan` says so. Each simulated client's facts (examples,
rank) come from the same capability report a node sends the server; the trained tensors are the
strategy's payload of the round-0 adapter, so the base model is loaded (nothing is trained).
"""

from __future__ import annotations

import argparse

from flwr.app import Context, RecordDict

from fedlora.cli.common import _add_debug, load_run_config
from fedlora.errors import ConfigError


def add_privacy_plan(sub) -> None:
    """Register ``fedlora privacy-plan`` on the ``fedlora`` subparsers ``sub``."""
    cmd = sub.add_parser(
        "privacy-plan",
        help="print a run's DP plan (noise, batch, sampling rate, steps, epsilon, noise-to-signal) without training",
    )
    cmd.add_argument("preset", nargs="?", help="preset TOML path or packaged name (default: quickstart)")
    cmd.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    cmd.set_defaults(func=cmd_privacy_plan)
    _add_debug(cmd, subcommand=True)


def cmd_privacy_plan(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.preset, args.set or [])
    if not cfg.privacy.enabled:
        raise ConfigError("config key 'privacy.mode' is 'off': there is no DP plan (set it to 'local' or 'central')")
    from fedlora.server.privacy import announce_plan

    announce_plan(cfg, simulated_plan(cfg), None, print)
    return 0


def simulated_plan(cfg):
    """The plan rows of ``cfg`` simulated: one capability report per client, as its node makes it."""
    from fedlora.client.node import capabilities
    from fedlora.server.privacy import plan_rows
    from fedlora.server.server_app import prepare
    from fedlora.strategies import NodeDirectory, create
    from fedlora.wire.protocol import NODE_NUM_PARTITIONS, NODE_PARTITION_ID

    prepared = prepare(cfg)
    host, data = prepared.host, prepared.data
    tasks = list(data.tasks or [])
    nodes = NodeDirectory()
    clients = cfg.federation.clients
    for pid in range(clients):
        context = Context(
            run_id=0,
            node_id=pid,
            node_config={NODE_PARTITION_ID: pid, NODE_NUM_PARTITIONS: clients},
            state=RecordDict(),
            run_config={},
        )
        nodes.record(pid, capabilities(cfg, context, data.labels, tasks))
    strategy = create(cfg, prepared.spec, tasks=tasks, nodes=nodes)
    with host.lock:
        name = host.ensure(prepared.spec, seed=cfg.seed)
        state = strategy.initialize(host.initial_state(name, cfg.seed), host)
    return plan_rows(cfg, nodes.all(), lambda node: strategy.payload(node, state), name=lambda node: f"client {node}")
