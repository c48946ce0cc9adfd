"""Tiny random image models built from a config, for the offline image quickstart and tests.

``model.name = "synthetic:tiny-vit"`` (a 2-layer ViT over 32 x 32 images) and
``"synthetic:tiny-clip"`` (a 2-layer CLIP, both towers, with a small BPE tokenizer) are written
once per machine to a cache folder and then read by the real loading code, like any local
folder. Their weights are random (seeded, so every process of a run builds the same model):
they exist so that ``fedlora simulate images`` and the tests run with no network, and learn
only what the federation teaches them. The real presets (``vit``, ``flora_vlm``) name hub
checkpoints instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

#: Bumped when the models below change, so an old cached copy is not reused.
VERSION = 1
IMAGE_SIZE = 32
#: Words the tiny CLIP tokenizer merges whole (prompts and the synthetic shapes' names); any
#: other word still tokenizes, letter by letter.
PROMPT_WORDS = (
    "a an the of photo picture image drawing small large bright dark "
    "circle square triangle cross ring diamond star red green blue yellow . ,"
)


def _tiny_body() -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def write_tiny_vit(directory: str | Path) -> str:
    """A 2-layer random ViT (hidden 32, 8 x 8 patches of a 32 x 32 image, seeded) and its image
    processor, saved to ``directory`` (no head: a classifier starts fresh)."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, **_tiny_body())
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)
    return str(directory)


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer trained on :data:`PROMPT_WORDS` (with every letter, so any word tokenizes)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizerFast

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,-"),
        show_progress=False,
    )
    bpe.train_from_iterator([PROMPT_WORDS] * 4, trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in learned["merges"]]
    return CLIPTokenizerFast(vocab=learned["vocab"], merges=merges)


def write_tiny_clip(directory: str | Path) -> str:
    """A 2-layer random CLIP (both towers hidden 32, projection 16, 32 x 32 images, seeded) with
    :func:`tiny_clip_tokenizer` and a CLIP processor, saved to ``directory``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_clip_tokenizer()
    text = {
        **_tiny_body(),
        "vocab_size": len(tok),
        "max_position_embeddings": 32,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    vision = {**_tiny_body(), "image_size": IMAGE_SIZE, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(directory)
    return str(directory)


#: ``model.name`` values that name a tiny random model, and what writes it.
SYNTHETIC_MODELS: dict[str, Callable[[str | Path], str]] = {
    "synthetic:tiny-vit": write_tiny_vit,
    "synthetic:tiny-clip": write_tiny_clip,
}


def cache_root() -> Path:
    """Where the tiny models are cached: ``$FEDLORA_CACHE`` or a per-user temporary folder."""
    if os.environ.get("FEDLORA_CACHE"):
        return Path(os.environ["FEDLORA_CACHE"]) / "models"
    return Path(tempfile.gettempdir()) / f"fedlora-{os.getuid() if hasattr(os, 'getuid') else 'user'}" / "models"


def synthetic_model_dir(name: str) -> str:
    """The folder of the tiny model ``name`` (:data:`SYNTHETIC_MODELS`), written on first use.

    Written into a fresh sibling folder and renamed into place, so processes that start at once
    (a simulation's workers, a deployment on one host) never read a half-written model.
    """
    target = cache_root() / f"{name.split(':', 1)[1]}-v{VERSION}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        SYNTHETIC_MODELS[name](staging)
        try:
            staging.rename(target)
        except OSError:  # another process put it there first: theirs is the same model
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
