"""GPU throughput and peak memory: a plain peft loop, fedlora's simulation, the Flower-LLM-example way.

The model: a Llama-style causal LM built from a ``LlamaConfig`` with random weights (no
download; hidden 1024, 24 layers, MLP 4352, 16 heads, vocabulary 32,000: about 0.49B
parameters, counted in the report), saved in bfloat16 with a word-level tokenizer over its
whole vocabulary to a temporary folder, and a local jsonl file of random-token rows, each
longer than the sequence, so every batch is exactly ``batch x seq`` tokens (no padding). LoRA
r=16 (alpha 32, no dropout) on q_proj, k_proj, v_proj and o_proj; AdamW at lr 1e-4; sequence
512, batch 4; 8 clients x 4 local steps = 32 optimizer steps per way.

Each way runs in bfloat16, 8-bit and 4-bit (bitsandbytes LLM.int8 and QLoRA's NF4 with double
quantization, through ``fedlora.model.loading.quantization_config``: the output head stays unquantized
and ``prepare_model_for_kbit_training`` runs, as in fedlora). All three share one recipe, so
the ratios compare runtimes, not recipes: the frozen base in bfloat16 (4-bit: NF4 computing in
bfloat16; 8-bit: LLM.int8, which casts its inputs to float16), float32 LoRA factors and AdamW
state, the forward pass under ``torch.autocast(bfloat16)``, no gradient checkpointing, the loss
read back every step.

(a) ``plain_peft``: ``from_pretrained`` + ``get_peft_model`` once, then the 32 steps back to back
    (after 2 untimed warm-up steps). No Flower, no messages, no evaluation.
(b) ``fedlora``: ``fedlora.simulations.runtime.simulate`` in-process, 1 round of FedAvg, 8
    clients x 4 local steps on IID partitions of the same rows. The base model is loaded once
    before (``fedlora.model.loading.load_model``, timed apart as ``model_load_s``: every virtual client
    then shares it), and one identical untimed run warms the process (tokenized partitions, CUDA
    kernels), as the plain loop's warm-up steps do. ``tokens_per_s`` is over the round's wall time
    as metrics.jsonl records it: delivering the 8 train messages, the clients' adapter swaps and
    steps, ArrayRecord serialization and validation of the replies, aggregation, and the
    server's evaluation of the new global adapter on ``batch`` held-out rows. That rate is the
    one the targets use; ``training_tokens_per_s`` (over the clients' own clocks) and
    ``run_tokens_per_s`` (over the whole ``simulate`` call: preparation, the initial evaluation,
    the round, the checkpoint) are reported beside it.
(c) ``flower_example``: as Flower's LLM examples (flowertune) write their ClientApp, every one of
    the 8 client calls builds the model from disk again (``from_pretrained`` with its
    quantization, ``prepare_model_for_kbit_training``, ``get_peft_model``), loads the global
    adapter (``set_peft_model_state_dict``), trains its 4 steps, extracts
    ``get_peft_model_state_dict`` and drops the model (``torch.cuda.empty_cache``); the 8 states
    are averaged at the end. Timed over all 8 calls, model builds included: that is the point
    (a ``gc.collect`` after each call, which the examples do not make, is left off the clock and
    reported). An untimed first build gives the initial global adapter and warms the disk cache.

tokens/s = batch x seq x steps / seconds. Peak memory on CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, minus what was allocated when the cell started (each cell
frees everything before the next). On the CPU there is no per-cell measure worth reporting
(``ru_maxrss`` is process-wide and only grows), so memory is null there.

Targets (full CUDA run, every precision): (b) >= 0.9 x (a) tokens/s; (b) >= 3 x (c) tokens/s;
4-bit peak memory <= 0.45 x bfloat16's, in fedlora's simulation (b) (the other ways' ratios are
reported too).

``--quick`` runs the same code on the CPU with a tiny config (hidden 64, 2 layers, vocabulary
512, sequence 64, batch 2, 1 local step, one torch thread, float32 instead of bfloat16): it
checks that every way and precision runs; its targets are marked not applicable
(``--quick --device cuda`` runs the tiny config on a GPU, in bfloat16, as a fast check there).
Without ``--quick`` the script needs a CUDA GPU and refuses otherwise.

Usage: python benchmarks/gpu.py [--quick] [--device auto|cuda|cuda:N|cpu] [--local-steps N]
[--batch N] [--out [results.json]]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, quiet_libraries, stdout_to_stderr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0}
TARGETS = {
    "fedlora_over_plain_tokens_per_s": {"at_least": 0.9},
    "fedlora_over_flower_example_tokens_per_s": {"at_least": 3.0},
    "fedlora_4bit_over_bfloat16_peak_memory": {"at_most": 0.45},
}
FULL = {
    "model": {"hidden_size": 1024, "num_hidden_layers": 24, "intermediate_size": 4352, "num_attention_heads": 16},
    "vocab_size": 32000,
    "seq": 512,
    "batch": 4,
    "clients": 8,
    "local_steps": 4,
    "warmup_steps": 2,
    "lr": 1e-4,
}
QUICK = {
    "model": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4},
    "vocab_size": 512,
    "seq": 64,
    "batch": 2,
    "clients": 8,
    "local_steps": 1,
    "warmup_steps": 1,
    "lr": 1e-4,
}
PAD, UNK, BOS, EOS = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# model, tokenizer and data on disk


def write_model(directory: Path, settings: dict[str, Any], save_dtype) -> int:
    """A random Llama-style causal LM and a word-level tokenizer over its vocabulary, saved to
    ``directory``; returns the parameter count.

    The tokenizer maps the words ``w4 ... w<vocab-1>`` one to one onto token ids, so random text
    draws on the whole embedding table and the real tokenizer of a real model is not needed.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = settings["vocab_size"]
    vocab = {"<pad>": PAD, "<unk>": UNK, "<s>": BOS, "</s>": EOS}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(settings["seq"], 64),
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        **settings["model"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.to(save_dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    gc.collect()
    return int(params)


def write_data(directory: Path, settings: dict[str, Any]) -> tuple[Path, Path, int]:
    """Random-token training rows (``clients x local_steps x batch``: every client's partition is
    exactly its steps' batches) and ``batch`` held-out rows, as jsonl; each row is longer than
    ``seq`` tokens, so truncation makes every batch ``batch x seq``. Returns (train, eval, rows)."""
    rng = random.Random(0)
    words = settings["seq"] + 8

    def rows(n: int) -> str:
        return "".join(
            json.dumps({"text": " ".join(f"w{rng.randrange(4, settings['vocab_size'])}" for _ in range(words))}) + "\n"
            for _ in range(n)
        )

    count = settings["clients"] * settings["local_steps"] * settings["batch"]
    train, held_out = directory / "train.jsonl", directory / "eval.jsonl"
    train.write_text(rows(count))
    held_out.write_text(rows(settings["batch"]))
    return train, held_out, count


# ---------------------------------------------------------------------------------------------
# measuring


class Meter:
    """Wall time and peak device memory of one cell (one way at one precision)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch
        self.device = device

    def sync(self) -> None:
        """Wait for queued CUDA work, so a clock read after it covers that work."""
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def start_memory(self) -> None:
        """Free what earlier cells left, then measure the peak from here on."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = self.torch.cuda.memory_allocated(self.device)

    def peak_mb(self) -> float | None:
        """Peak allocated since :meth:`start_memory`, above what was allocated then (CUDA only)."""
        if not self.cuda:
            return None
        return round((self.torch.cuda.max_memory_allocated(self.device) - self.baseline) / 2**20, 1)


def release(meter: Meter) -> None:
    """Drop every model this process caches and hand freed blocks back to the device."""
    from fedlora.model.loading import clear_cache

    clear_cache()
    gc.collect()
    if meter.cuda:
        meter.torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# shared pieces of (a) and (c)


def build_peft(model_dir: str, quantization: str, where) -> Any:
    """``from_pretrained`` at the precision (fedlora's quantization config and head list), the
    k-bit preparation for a quantized base, and ``get_peft_model`` with the benchmark's LoRA."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from fedlora.config import ModelConfig
    from fedlora.model.loading import output_heads, quantization_config

    kwargs: dict[str, Any] = {}
    if quantization == "none":
        kwargs["dtype"] = where.torch_dtype
    else:
        cfg = ModelConfig(name=model_dir, task="causal_lm", quantization=quantization)
        kwargs["quantization_config"] = quantization_config(
            cfg, output_heads(model_dir, "causal_lm", 0), where.torch_dtype
        )
        kwargs["device_map"] = {"": where.device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quantization == "none":
        model.to(where.device)
    for param in model.parameters():
        param.requires_grad_(False)
    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(0)
    config = LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(TARGET_MODULES),
        task_type=TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


def encoded_rows(model_dir: str, train: Path, seq: int):
    """Every training row tokenized and truncated to ``seq``, as fedlora's clients do it."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from fedlora.data import encode

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("json", data_files=str(train), split="train")
    enc = encode(ds, tokenizer, seq)
    short = [len(r) for r in enc.input_ids if len(r) != seq]
    if short:
        raise RuntimeError(f"rows must fill the sequence ({seq} tokens); some have {sorted(set(short))}")
    return enc, tokenizer.pad_token_id


def train_steps(model, optimizer, enc, rows: list[int], batch_size: int, pad_id: int, meter: Meter, where):
    """The plain training loop over ``rows`` in order, ``batch_size`` at a time; returns (seconds,
    last loss). Batches are padded inside the clock, as fedlora's loop pads them."""
    import torch

    from fedlora.data import collate
    from fedlora.model.devices import autocast

    model.train()
    start = meter.now()
    loss_value = float("nan")
    for first in range(0, len(rows), batch_size):
        batch = collate(enc, rows[first : first + batch_size], pad_id, True)
        batch = {k: v.to(where.device, non_blocking=True) for k, v in batch.items()}
        with autocast(torch.device(where.device), where.torch_dtype):  # fedlora's own: none at float32
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())  # read every step, as fedlora's loop and any logger do
    return meter.now() - start, loss_value


def optimizer_for(model, lr: float):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), sum(p.numel() for p in params)


# ---------------------------------------------------------------------------------------------
# (a) the plain peft loop


def plain_peft(model_dir: str, quantization: str, where, enc, pad_id: int, s: dict, meter: Meter) -> dict:
    """(a): one model, every client's steps back to back."""
    meter.start_memory()
    start = meter.now()
    model = build_peft(model_dir, quantization, where)
    optimizer, trainable = optimizer_for(model, s["lr"])
    load_s = meter.now() - start
    order = list(range(len(enc)))
    train_steps(model, optimizer, enc, order[: s["warmup_steps"] * s["batch"]], s["batch"], pad_id, meter, where)
    seconds, loss = train_steps(model, optimizer, enc, order, s["batch"], pad_id, meter, where)
    steps = -(-len(order) // s["batch"])
    peak = meter.peak_mb()
    del model, optimizer
    release(meter)
    tokens = steps * s["batch"] * s["seq"]
    return {
        "tokens": tokens,
        "steps": steps,
        "train_s": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "model_load_s": round(load_s, 3),
        "peak_memory_mb": peak,
        "trainable_params": int(trainable),
        "final_loss": round(loss, 4),
    }


# ---------------------------------------------------------------------------------------------
# (b) fedlora's in-process simulation


def fedlora_config(model_dir: str, quantization: str, where, train: Path, held_out: Path, s: dict):
    from fedlora.config import RunConfig

    return RunConfig.from_dict(
        {
            "name": f"gpu-{quantization}",
            "rounds": 1,
            "seed": 0,
            "model": {
                "name": model_dir,
                "task": "causal_lm",
                "quantization": quantization,
                "max_length": s["seq"],
                "device": where.device,
                "dtype": where.dtype,
            },
            "lora": {**LORA, "target_modules": list(TARGET_MODULES)},
            "data": {
                "path": str(train),
                "eval_path": str(held_out),
                "text_column": "text",
                "partitioner": "iid",
                "max_eval_examples": s["batch"],
            },
            "federation": {
                "clients": s["clients"],
                "local_steps": s["local_steps"],
                "batch_size": s["batch"],
                "lr": s["lr"],
            },
            "strategy": {"name": "fedavg"},
        }
    )


def fedlora_sim(model_dir: str, quantization: str, where, train: Path, held_out: Path, s: dict, meter: Meter) -> dict:
    """(b): the base loaded once (timed apart), one warm-up run, one timed run."""
    from fedlora.model.loading import load_model
    from fedlora.run.progress import Progress
    from fedlora.simulations.runtime import simulate

    cfg = fedlora_config(model_dir, quantization, where, train, held_out, s)
    meter.start_memory()
    start = meter.now()
    load_model(cfg.model, seed=cfg.seed)  # the cache every virtual client and the server share
    load_s = meter.now() - start
    with tempfile.TemporaryDirectory() as tmp:
        simulate(cfg, out=Path(tmp) / "warmup", progress=Progress(quiet=True), report=False)
        start = meter.now()
        result = simulate(cfg, out=Path(tmp) / "timed", progress=Progress(quiet=True), report=False)
        run_s = meter.now() - start
    peak = meter.peak_mb()
    release(meter)
    (record,) = result.rounds
    clients = record["clients"]
    if record["clients_ok"] != s["clients"]:
        raise RuntimeError(f"fedlora {quantization}: {record['clients_ok']}/{s['clients']} clients ok: {record}")
    examples = sum(int(c["num_examples"]) for c in clients)
    if examples != s["clients"] * s["local_steps"] * s["batch"]:
        raise RuntimeError(f"fedlora {quantization}: partitions hold {examples} rows, not one batch per step")
    tokens = s["clients"] * s["local_steps"] * s["batch"] * s["seq"]
    round_s = float(record["seconds"])
    client_s = sum(float(c["seconds"]) for c in clients)
    return {
        "tokens": tokens,
        "steps": s["clients"] * s["local_steps"],
        "round_s": round(round_s, 4),
        "tokens_per_s": round(tokens / round_s, 1),
        "client_train_s": round(client_s, 4),
        "training_tokens_per_s": round(tokens / client_s, 1),
        "run_s": round(run_s, 4),
        "run_tokens_per_s": round(tokens / run_s, 1),
        "model_load_s": round(load_s, 3),
        "peak_memory_mb": peak,
        "train_loss": round(float(record["train_loss"]), 4),
    }


# ---------------------------------------------------------------------------------------------
# (c) the Flower-LLM-example way: the model rebuilt in every client call


def flower_example(model_dir: str, quantization: str, where, enc, pad_id: int, s: dict, meter: Meter) -> dict:
    """(c): an untimed first build for the initial global adapter, then 8 timed client calls."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    def cpu_state(model) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}

    meter.start_memory()
    model = build_peft(model_dir, quantization, where)
    global_state = cpu_state(model)
    del model
    release(meter)

    per_client = s["local_steps"] * s["batch"]
    calls, builds, trains, states = [], [], [], []
    collect_s = 0.0
    for client in range(s["clients"]):
        began = meter.now()
        model = build_peft(model_dir, quantization, where)
        set_peft_model_state_dict(model, global_state)
        optimizer, _ = optimizer_for(model, s["lr"])
        built = meter.now()
        rows = list(range(client * per_client, (client + 1) * per_client))
        seconds, loss = train_steps(model, optimizer, enc, rows, s["batch"], pad_id, meter, where)
        states.append(cpu_state(model))
        del model, optimizer
        # The examples leave the dropped model to Python's collector. Collecting here keeps two
        # models from ever being resident at once (a fair peak memory), but off the clock: a full
        # collection of this process's heap is not a cost the examples pay on every call.
        paused = meter.now()
        gc.collect()
        resumed = meter.now()
        collect_s += resumed - paused
        if meter.cuda:
            torch.cuda.empty_cache()
        calls.append(meter.now() - began - (resumed - paused))
        builds.append(built - began)
        trains.append(seconds)
    total_s = sum(calls)
    peak = meter.peak_mb()
    averaged = {k: torch.stack([st[k].float() for st in states]).mean(0) for k in global_state}
    release(meter)
    tokens = s["clients"] * per_client * s["seq"]
    return {
        "tokens": tokens,
        "steps": s["clients"] * s["local_steps"],
        "client_calls": len(builds),
        "total_s": round(total_s, 4),
        "tokens_per_s": round(tokens / total_s, 1),
        "model_build_s": {"sum": round(sum(builds), 3), "mean": round(statistics.mean(builds), 3)},
        "train_s": round(sum(trains), 4),
        "training_tokens_per_s": round(tokens / sum(trains), 1),
        "gc_collect_s_not_counted": round(collect_s, 3),
        "peak_memory_mb": peak,
        "final_loss": round(loss, 4),
        "averaged_tensors": len(averaged),
    }


# ---------------------------------------------------------------------------------------------
# report


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 4)


def judge(cells: dict, unquantized: str, applicable: bool) -> tuple[dict, dict, dict]:
    """(ratios per precision, 4-bit over unquantized peak memory per way, targets with met flags)."""
    ratios = {
        p: {
            "fedlora_over_plain": ratio(c["fedlora"]["tokens_per_s"], c["plain_peft"]["tokens_per_s"]),
            "fedlora_over_flower_example": ratio(c["fedlora"]["tokens_per_s"], c["flower_example"]["tokens_per_s"]),
            "fedlora_training_over_plain": ratio(
                c["fedlora"]["training_tokens_per_s"], c["plain_peft"]["tokens_per_s"]
            ),
            "fedlora_run_over_plain": ratio(c["fedlora"]["run_tokens_per_s"], c["plain_peft"]["tokens_per_s"]),
        }
        for p, c in cells.items()
    }
    memory = {
        way: ratio(cells["4bit"][way]["peak_memory_mb"], cells[unquantized][way]["peak_memory_mb"])
        for way in ("plain_peft", "fedlora", "flower_example")
    }
    values = {
        "fedlora_over_plain_tokens_per_s": {p: r["fedlora_over_plain"] for p, r in ratios.items()},
        "fedlora_over_flower_example_tokens_per_s": {p: r["fedlora_over_flower_example"] for p, r in ratios.items()},
        "fedlora_4bit_over_bfloat16_peak_memory": {"fedlora": memory["fedlora"]},
    }
    targets: dict[str, Any] = {}
    for name, bound in TARGETS.items():
        entry: dict[str, Any] = {**bound, "value": values[name]}
        if not applicable:
            entry["met"] = None
            entry["reason"] = "not applicable: a --quick run of a tiny model; the targets are for the full CUDA run"
        else:
            got = list(values[name].values())
            if "at_least" in bound:
                entry["met"] = all(v is not None and v >= bound["at_least"] for v in got)
            else:
                entry["met"] = all(v is not None and v <= bound["at_most"] for v in got)
        targets[name] = entry
    return ratios, memory, targets


def versions() -> dict[str, str | None]:
    import bitsandbytes
    import flwr
    import peft
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "flwr": flwr.__version__,
    }


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def run(where, settings: dict[str, Any], quick: bool) -> dict:
    """Build the model and data, run every (precision x way) cell, return the report."""
    import torch

    cuda = where.device.startswith("cuda")
    meter = Meter(where.device)
    unquantized = where.dtype  # bfloat16 on a GPU, float32 on the CPU
    precisions = {unquantized: "none", "8bit": "8bit", "4bit": "4bit"}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = write_model(model_dir, settings, torch.bfloat16 if cuda else torch.float32)
        train, held_out, rows = write_data(Path(tmp), settings)
        enc, pad_id = encoded_rows(str(model_dir), train, settings["seq"])
        setup_s = time.perf_counter() - began
        cells: dict[str, dict] = {}
        for label, quantization in precisions.items():
            # (b) between (a) and (c), so neither baseline always runs on the coldest or warmest process.
            cells[label] = {
                "plain_peft": plain_peft(str(model_dir), quantization, where, enc, pad_id, settings, meter),
                "fedlora": fedlora_sim(str(model_dir), quantization, where, train, held_out, settings, meter),
                "flower_example": flower_example(str(model_dir), quantization, where, enc, pad_id, settings, meter),
            }
    ratios, memory, targets = judge(cells, unquantized, cuda and not quick)
    trainable = cells[unquantized]["plain_peft"]["trainable_params"]
    return {
        "device": where.device,
        "device_name": device_name(where.device),
        "cuda": cuda,
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "model": {
            "architecture": "LlamaForCausalLM, random weights from a LlamaConfig (no download)",
            **settings["model"],
            "vocab_size": settings["vocab_size"],
            "params": params,
            "params_billions": round(params / 1e9, 3),
            "saved_dtype": "bfloat16" if cuda else "float32",
        },
        "lora": {**LORA, "target_modules": list(TARGET_MODULES), "trainable_params": trainable},
        "seq": settings["seq"],
        "batch_size": settings["batch"],
        "clients": settings["clients"],
        "local_steps": settings["local_steps"],
        "steps": settings["clients"] * settings["local_steps"],
        "tokens_per_way": settings["clients"] * settings["local_steps"] * settings["batch"] * settings["seq"],
        "warmup_steps": settings["warmup_steps"],
        "lr": settings["lr"],
        "train_rows": rows,
        "precisions": list(precisions),
        "compute_dtype": where.dtype,
        "peak_memory_measure": (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the memory allocated "
            "when the cell started (MiB)"
            if cuda
            else "null: on the CPU ru_maxrss is process-wide and only grows, so a cell's own peak cannot be told"
        ),
        "ways": {
            "plain_peft": "from_pretrained + get_peft_model once, every step back to back (tokens_per_s over the "
            "timed steps, after warm-up steps)",
            "fedlora": "simulate() in-process, 1 round x clients x local_steps; tokens_per_s over the round's wall "
            "time (messages, client steps, reply checks, aggregation, server evaluation on batch_size rows); "
            "training_tokens_per_s over the clients' own clocks; run_tokens_per_s over the whole simulate() call; "
            "the one-time model load is model_load_s, outside all three",
            "flower_example": "every client call rebuilds the model from disk (quantization, k-bit preparation, "
            "get_peft_model), loads the global adapter, trains, extracts its state and drops the model; "
            "tokens_per_s over all calls, builds included",
        },
        "setup_s": round(setup_s, 2),
        "cells": cells,
        "ratios": ratios,
        "peak_memory_4bit_over_unquantized": memory,
        "targets": targets,
        "seconds": round(time.perf_counter() - began, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny config on the CPU (float32, one thread): only checks that it runs"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu")
    parser.add_argument("--local-steps", type=int, default=None, help="steps per client (default 4; quick 1)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4; quick 2)")
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(RESULTS),
        help="also write the JSON here (no path: benchmarks/results/gpu.json, full CUDA runs only)",
    )
    args = parser.parse_args()
    quiet_libraries()
    # LLM.int8 says on every 8-bit matmul that it casts float32/bfloat16 inputs to float16: expected.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    from fedlora.errors import ConfigError
    from fedlora.model.devices import placement

    try:
        where = placement("cpu" if args.quick and args.device == "auto" else args.device, "auto", key="--device")
    except ConfigError as err:
        print(f"gpu.py: {err}", file=sys.stderr)
        return 2
    cuda = where.device.startswith("cuda")
    if not args.quick and not cuda:
        print("gpu.py: the full benchmark needs a CUDA GPU (torch sees none here); use --quick", file=sys.stderr)
        return 2
    if args.out == str(RESULTS) and (args.quick or not cuda):
        print("gpu.py: benchmarks/results/gpu.json keeps full CUDA runs only; give --out FILE", file=sys.stderr)
        return 2
    settings = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.local_steps is not None:
        settings["local_steps"] = args.local_steps
    if args.batch is not None:
        settings["batch"] = args.batch
    if not cuda:
        torch.set_num_threads(1)  # the CPU check shares a small machine; one thread keeps it steady
    with stdout_to_stderr():
        report = {"benchmark": "gpu", "quick": args.quick, **run(where, settings, args.quick)}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
