"""The ``fedlora`` subcommands: simulate, presets, report, truncate, evaluate, certs, partition."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlora.cli.common import load_run_config, resume_run_config
from fedlora.errors import FedLoraError


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    if args.resume:  # the run on disk says what runs; the preset at most names its folder
        cfg, args.out = resume_run_config(args.preset, args.set or [], args.out)
    else:
        cfg = load_run_config(args.preset, args.set or [])
    progress = Progress(quiet=args.quiet)
    if args.resume and args.preset:
        progress.line(f"fedlora simulate: --resume runs {args.out}/config.toml; the preset only named the folder")
    progress.line(
        f"fedlora simulate: {cfg.name}  strategy {cfg.strategy.name}  {cfg.federation.clients} clients  "
        f"{cfg.rounds} rounds  model {cfg.model.name}  data "
        f"{', '.join(f'{t.name}={t.path}' for t in cfg.data.tasks) if cfg.data.tasks else cfg.data.path}  "
        f"backend {args.backend}"
    )
    result = simulate(
        cfg, out=args.out, backend=args.backend, resume=args.resume, progress=progress, ray_address=args.ray_address
    )
    metric = "eval_perplexity" if cfg.model.task == "causal_lm" else "eval_accuracy"
    print(f"\nResults in {result.run_dir}/ (metrics.jsonl, config.toml, checkpoints/, adapter/)")
    print(f"{metric} per round:")
    if result.initial:
        print(f"  round 0 (before training): {result.initial[metric]:.4f}")
    for record in result.rounds:
        print(f"  round {record['round']}: {record[metric]:.4f}")
    print(f"Load the adapter: PeftModel.from_pretrained(base, {str(result.adapter_dir)!r})")
    clients_dir = Path(result.run_dir) / "clients"
    if clients_dir.is_dir():
        print(f"Each client's own (personalized) adapter: {clients_dir}/<partition>/adapter")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from fedlora.simulations import PRESET_DIR, list_presets

    for name in list_presets():
        print(f"{name}\t{PRESET_DIR / (name + '.toml')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedlora.run.report import load_run, write_report

    runs = [load_run(p) for p in args.runs]  # every folder is checked before anything is written
    if args.out:
        out = Path(args.out)
    elif len(runs) == 1:
        out = runs[0].path
    else:
        out = Path("reports") / "-vs-".join(r.path.name for r in runs)
    report = write_report([r.path for r in runs], out)
    print(f"Report: {report} (plots beside it)")
    return 0


def cmd_truncate(args: argparse.Namespace) -> int:
    from fedlora.strategies.dpdylora import truncate_adapter_dir

    src = Path(args.adapter)
    if not (src / "adapter_config.json").is_file():
        raise FedLoraError(f"fedlora truncate: {src} is not a peft adapter folder (no adapter_config.json)")
    out = Path(args.out) if args.out else src.parent / f"{src.name}-rank{args.rank}"
    if out.exists():
        raise FedLoraError(f"fedlora truncate: {out} exists; name another --out")
    try:
        truncate_adapter_dir(src, args.rank, out)
    except ValueError as err:
        raise FedLoraError(f"fedlora truncate: --rank {args.rank}: {err}") from None
    print(f"Rank-{args.rank} adapter: {out} (PeftModel.from_pretrained loads it)")
    return 0


def _column_arg(value: str) -> tuple[str, str]:
    """``--column KEY=NAME``: which column of the file plays which part."""
    from fedlora.eval.inputs import COLUMN_KEYS

    key, sep, name = value.partition("=")
    key = key.strip().removeprefix("data.")
    if not sep or not name.strip() or key not in COLUMN_KEYS:
        raise argparse.ArgumentTypeError(f"expected KEY=NAME with KEY one of {', '.join(COLUMN_KEYS)}, got {value!r}")
    return key, name.strip()


def cmd_export(args: argparse.Namespace) -> int:
    """``fedlora export RUN --client K``: one JSON object (adapter path, round, the client's metrics)."""
    import json

    from fedlora.simulations.export_client import export_client

    print(json.dumps(export_client(args.run, args.client, args.out)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``fedlora evaluate``: one JSON object with the adapter's metrics on a data file, on stdout."""
    import json

    from fedlora.eval.evaluate import EvalOptions, evaluate_adapter

    for flag in ("max_length", "max_examples"):
        if getattr(args, flag) < 0:
            raise FedLoraError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    for flag in ("batch_size", "max_answer_tokens"):
        if getattr(args, flag) < 1:
            raise FedLoraError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    result = evaluate_adapter(
        args.adapter,
        args.data,
        base=args.base,
        data_format=args.format,
        template=args.template,
        columns=dict(args.column or []),
        max_length=args.max_length,
        device=args.device,
        dtype=args.dtype,
        options=EvalOptions(
            batch_size=args.batch_size, max_examples=args.max_examples, max_answer_tokens=args.max_answer_tokens
        ),
    )
    print(json.dumps(result))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedlora.deploy.certs import create_certs

    names = [n.strip() for n in args.node_names.split(",") if n.strip()] if args.node_names else None
    files = create_certs(
        args.out, args.server_host, nodes=args.nodes, node_names=names, days=args.days, force=args.force
    )
    print(f"CA certificate:     {files.ca_cert}  (copy to every client: fedlora-client --ca)")
    print(f"CA key:             {files.ca_key}  (keep private; it signs certificates)")
    print(
        f"server certificate: {files.server_cert}, key {files.server_key}  (fedlora-server --certs "
        f"{args.out}), valid for {args.server_host}, localhost, 127.0.0.1"
    )
    for key, pub in zip(files.node_keys, files.node_public_keys):
        print(f"node key pair:      {key} (give to one device: fedlora-client --key), {pub}")
    if files.node_keys:
        print(f"Authorise them: fedlora-server PRESET --certs {args.out} --auth-keys {files.node_keys[0].parent}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from fedlora.data import write_partitions

    cfg = load_run_config(args.preset, args.set or [])
    clients = args.clients or cfg.federation.clients
    if clients < 1:
        raise FedLoraError(f"--clients must be >= 1, got {clients}")
    for path in write_partitions(cfg, args.out, clients):
        print(path)
    return 0
