"""Shared fixtures: tiny random BERT and GPT-2 saved to disk (so the real loading code runs),
and small run configurations over the synthetic task."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    from fedlora.synthetic import vocabulary

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + vocabulary() + list("abcdefghijklmnopqrstuvwxyz0123456789")
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer random BERT encoder (no head: the classifier starts fresh, as for MiniLM)."""
    import torch
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer random GPT-2 causal LM sharing the tiny word-piece tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tok = _tokenizer(directory)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def tiny_config(model_dir: str, *, task: str = "classification", strategy: str = "fedavg", sets: tuple[str, ...] = ()):
    """A 3-client, 2-round run on the synthetic task, small enough for seconds per run."""
    from fedlora.config import RunConfig, apply_overrides

    raw = {
        "name": f"tiny-{task}-{strategy}",
        "rounds": 2,
        "seed": 0,
        "model": {"name": model_dir, "task": task, "max_length": 16},
        "lora": {
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "target_modules": ["query", "value"] if task == "classification" else ["c_attn"],
        },
        "data": {
            "path": "synthetic:topics",
            "max_train_examples": 150,
            "max_eval_examples": 40,
            "partitioner": "dirichlet" if task == "classification" else "iid",
        },
        "federation": {"clients": 3, "local_steps": 2, "batch_size": 8, "lr": 0.01},
        "strategy": {"name": strategy},
    }
    raw = apply_overrides(raw, list(sets))
    return RunConfig.from_dict(raw)


@pytest.fixture
def make_config():
    return tiny_config
