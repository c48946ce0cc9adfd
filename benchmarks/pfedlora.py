"""pFedLoRA on clients of two base models: personalized accuracy against training alone and FedSA.

SST-2 (train.tsv / dev.tsv from ``--data-dir``), Dirichlet(0.5) over labels, 6 clients: the even
ones on all-MiniLM-L6-v2, the odd ones on a smaller model built from it by keeping its first 2 of
6 layers (the same tokenizer and width, a third of the depth). Every client is judged on a
held-out part of its own data (personalized accuracy, ``data.eval_fraction``), in one run each:

* ``pfedlora``: both bases in one federation; each round ``--local-model-steps`` on the local
  model (its LoRA and head) then ``--adapter-steps`` on the shared adapter, which alone is sent;
* ``local_only``: the same clients, models and budget, but no knowledge crosses: every step is on
  the local model and the adapter stays at its zero-product init (pfedlora with
  ``adapter_steps = 0``), which is each client training alone;
* ``fedsa_<base>``: FedSA-LoRA, which needs one base for all, run with every client on that base
  and read on the clients that have that base in the pfedlora run (the clients sharing a base),
  at the same steps per round. It federates 6 clients on one base where pfedlora's clients of a
  base are 3, so it is the favourable case for FedSA.

Same seed, partitions, learning rate and examples per round everywhere. Usage:
python benchmarks/pfedlora.py [--quick] [--data-dir DIR] [--rounds R] [--out [F]]; ``--quick`` runs
one round of 4 clients on the synthetic task with two tiny random BERTs (checks the code, not
quality). The full run takes about 10 minutes of CPU (570 s measured on 2 shared cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The in-process grid's node ids are 1_000_001 + the partition id (simulations/grid.py).
FIRST_NODE = 1_000_001
CLIENTS = 6
QUICK_CLIENTS = 4


def drop_layers(source: str, keep: int, out: Path) -> str:
    """``source``'s encoder with its first ``keep`` layers only (pretrained weights), saved to ``out``."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(source)
    model.encoder.layer = model.encoder.layer[:keep]
    model.config.num_hidden_layers = keep
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


def tiny_bases(root: Path) -> tuple[str, str]:
    """Two random BERTs of widths 32 and 16 on the tiny tokenizer (the quick mode's bases)."""
    import torch
    from transformers import BertConfig, BertModel

    from fedlora.data.synthetic import tiny_tokenizer

    tok = tiny_tokenizer()
    out = []
    for name, hidden, layers in (("wide", 32, 2), ("narrow", 16, 1)):
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            max_position_embeddings=64,
        )
        BertModel(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out.append(str(root / name))
    return out[0], out[1]


def run(name: str, sets: list[str], root: Path) -> dict:
    """One simulation: per round the personalized accuracy, overall and per client (by partition)."""
    from fedlora.cli.common import load_run_config
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    cfg = load_run_config("quickstart", sets + [f"name={name}"])
    start = time.perf_counter()
    result = simulate(cfg, out=root / name, progress=Progress(quiet=True), report=False)
    rounds = []
    for record in result.rounds:
        clients = {
            int(c["node_id"]) - FIRST_NODE: round(float(c["eval_accuracy"]), 4)
            for c in record.get("clients", [])
            if "eval_accuracy" in c
        }
        rounds.append(
            {
                "round": record["round"],
                "eval_accuracy": round(float(record.get("eval_accuracy", float("nan"))), 4),
                "clients": dict(sorted(clients.items())),
                "bytes_up": int(record.get("bytes_up", 0)),
                "bytes_down": int(record.get("bytes_down", 0)),
            }
        )
    return {"rounds": rounds, "seconds": round(time.perf_counter() - start, 1)}


def group_mean(entry: dict, parity: int) -> float:
    """Mean final personalized accuracy of the clients with partition id of ``parity`` (0: even)."""
    values = [v for c, v in entry["rounds"][-1]["clients"].items() if int(c) % 2 == parity]
    return round(sum(values) / len(values), 4) if values else float("nan")


def configs(args: argparse.Namespace, big: str, small: str, data: list[str]) -> dict[str, list[str]]:
    """The ``--set`` overrides of every run."""
    steps = args.local_model_steps + args.adapter_steps
    common = data + [
        f"rounds={args.rounds}",
        f"federation.clients={args.clients}",
        f"federation.local_steps={steps}",
        f"federation.batch_size={args.batch_size}",
        f"federation.lr={args.lr}",
        "federation.lr_schedule=cosine",
        f"federation.lr_min={args.lr / 10}",
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.5",
        "lora.dropout=0.0",
        f"model.max_length={args.max_length}",
        f"model.name={big}",
    ]
    profiles = f"federation.profiles=[{{name='large',rank=8}},{{name='small',rank=8,model='{small}'}}]"
    width = [f"strategy.adapter_width={args.adapter_width}", f"strategy.adapter_rank={args.adapter_rank}"]
    return {
        "pfedlora": common
        + [profiles, "strategy.name=pfedlora", *width]
        + [f"strategy.local_model_steps={args.local_model_steps}", f"strategy.adapter_steps={args.adapter_steps}"],
        "local_only": common
        + [profiles, "strategy.name=pfedlora", *width]
        + [f"strategy.local_model_steps={steps}", "strategy.adapter_steps=0"],
        "fedsa_large": common + ["strategy.name=fedsa"],
        "fedsa_small": [*common, f"model.name={small}", "strategy.name=fedsa"],
    }


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round on synthetic data, tiny models")
    parser.add_argument(
        "--data-dir", default=os.environ.get("FEDLORA_BENCH_DATA", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-model-steps", type=int, default=4)
    parser.add_argument("--adapter-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--adapter-width", type=int, default=64)
    parser.add_argument("--adapter-rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--train-examples", type=int, default=3000, help="seeded sample of SST-2 train rows")
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(Path(__file__).resolve().parent / "results" / "pfedlora.json"),
        help="also write the JSON here (no path: benchmarks/results/pfedlora.json)",
    )
    args = parser.parse_args()
    args.clients = QUICK_CLIENTS if args.quick else CLIENTS
    if args.quick:
        args.rounds, args.local_model_steps, args.adapter_steps, args.batch_size = 1, 1, 1, 8
        args.adapter_width, args.adapter_rank, args.max_length = 16, 4, 16
    return args


def main() -> int:
    args = parse()
    from _common import emit, stdout_to_stderr

    from fedlora.cli.common import _quiet_libraries

    _quiet_libraries()
    report: dict = {"clients": args.clients, "rounds": args.rounds, "split": "dirichlet(0.5) over labels"}
    with tempfile.TemporaryDirectory() as tmp, stdout_to_stderr():
        root = Path(tmp)
        if args.quick:
            big, small = tiny_bases(root)
            data = ["data.path=synthetic:sentiment", "data.max_train_examples=240", "data.max_eval_examples=40"]
            report["bases"] = {"large": "random BERT, 2 layers, width 32", "small": "random BERT, 1 layer, width 16"}
        else:
            from fedlora.model.loading import resolve_model_source

            sst2 = Path(args.data_dir) / "sst2"
            if not sst2.is_dir():
                print(f"pfedlora.py: error: {sst2} not found (pass --data-dir or use --quick)", file=sys.stderr)
                return 2
            big = resolve_model_source("sentence-transformers/all-MiniLM-L6-v2")
            small = drop_layers(big, 2, root / "minilm-l2")
            data = [f"data.path={sst2}", "data.text_column=sentence", "data.label_column=label"]
            data += [f"data.max_train_examples={args.train_examples}", "data.max_eval_examples=200"]
            report["bases"] = {"large": "all-MiniLM-L6-v2 (6 layers)", "small": "all-MiniLM-L6-v2, first 2 layers"}
        report["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")}
        for name, sets in configs(args, big, small, data).items():
            report[name] = run(name, sets, root)
            print(f"{name}: {report[name]['rounds'][-1]['eval_accuracy']}", file=sys.stderr, flush=True)
    report.update(summary(report))
    emit(report, args.out)
    return 0


def summary(report: dict) -> dict:
    """The headline figures as top-level numbers (the docs' table shows those) and the checks of
    the paper's claim that sharing the adapter beats training alone and the model-homogeneous
    baseline, as measured (not assumed)."""
    final = {name: report[name]["rounds"][-1]["eval_accuracy"] for name in ("pfedlora", "local_only")}
    groups = {
        name: {"large": group_mean(report[name], 0), "small": group_mean(report[name], 1)}
        for name in ("pfedlora", "local_only")
    }
    fedsa = {"large": group_mean(report["fedsa_large"], 0), "small": group_mean(report["fedsa_small"], 1)}
    out: dict = {
        "pfedlora_accuracy": final["pfedlora"],
        "local_only_accuracy": final["local_only"],
        "pfedlora_minus_local_only": round(final["pfedlora"] - final["local_only"], 4),
    }
    for base in ("large", "small"):
        out[f"pfedlora_{base}_clients"] = groups["pfedlora"][base]
        out[f"local_only_{base}_clients"] = groups["local_only"][base]
        out[f"fedsa_{base}_clients"] = fedsa[base]
    up = {name: report[name]["rounds"][0]["bytes_up"] // report["clients"] for name in ("pfedlora", "fedsa_large")}
    out["bytes_up_per_client_round_pfedlora"] = up["pfedlora"]
    out["bytes_up_per_client_round_fedsa_large"] = up["fedsa_large"]
    out["checks"] = {
        "pfedlora_above_local_only": final["pfedlora"] > final["local_only"],
        **{f"pfedlora_at_least_fedsa_{b}_clients": groups["pfedlora"][b] >= fedsa[b] for b in fedsa},
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
