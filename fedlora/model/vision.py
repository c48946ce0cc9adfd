"""Image models: an image classifier with a fresh head, and CLIP as a zero-shot classifier.

``model.task = "image_classification"`` loads ``AutoModelForImageClassification`` with a fresh
head for the run's classes (kept unquantized, trained and exported like the text heads) and its
``AutoImageProcessor``. ``model.task = "clip"`` loads a CLIP/SigLIP model with ``AutoModel`` and
its ``AutoProcessor``, and classifies as FLoRA (Nguyen et al., arXiv 2404.15182) does: by the
model's own image-text similarity against one prompt per class (:class:`PromptClassifier`), so
no head is added and the first evaluation is the pretrained model's zero-shot accuracy.

LoRA goes on the attention's query and value projections by default
(:func:`default_targets`), on the towers ``lora.towers`` names for CLIP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedlora.errors import ConfigError

#: The head a fresh image classifier gets (transformers names it so for ViT, DeiT, DINOv2,
#: Swin, BEiT, ConvNeXt, ResNet): trained and exported in full, never quantized.
IMAGE_HEAD = "classifier"
#: The attention projections LoRA adapts by default, by naming family: the first pair a model has.
ATTENTION_PAIRS = (("query", "value"), ("q_proj", "v_proj"), ("qkv",), ("in_proj",))
#: CLIP's towers (``lora.towers``) by the prefix of their modules in CLIPModel and SiglipModel.
TOWER_PREFIXES = {"text": "text_model.", "vision": "vision_model."}


class PromptClassifier(nn.Module):
    """A CLIP-style model as a classifier: the logits are its ``logits_per_image`` against the
    class prompts that come with every batch, the loss their cross-entropy.

    The model's own children and parameters are registered here under their own names, so the
    parameter names (and a peft adapter saved from this module) are exactly those of the bare
    CLIP model: ``PeftModel.from_pretrained(CLIPModel..., adapter)`` loads the export unchanged.
    The forward pass is the model's own (``model(input_ids, attention_mask, pixel_values)``),
    so SigLIP's sigmoid logits (with their bias) are used as SigLIP computes them.

    Parameters
    ----------
    model : torch.nn.Module
        A ``CLIPModel``-like model: ``forward(input_ids, attention_mask, pixel_values)`` returns
        ``logits_per_image`` (images x texts).
    """

    base_model_prefix = ""  # peft asks the wrapped model for it; the wrapper adds no prefix

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        object.__setattr__(self, "clip", model)  # not a child: its parts are, under their names

    def __getattr__(self, name: str) -> Any:
        # What is not a part of this module is the wrapped model's (config, gradient
        # checkpointing, input embeddings), so code written for transformers models serves both.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "clip" not in self.__dict__:  # still being built
                raise
            return getattr(self.__dict__["clip"], name)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self.clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        logits = out.logits_per_image
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def linear_leaves(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (for messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n in _linear_paths(model)})


def _linear_paths(model: nn.Module) -> list[str]:
    """The model's own linear layers, also once peft has wrapped some (for a second adapter):
    a wrapped layer by its own path, never its ``base_layer`` or its adapters' layers."""
    paths = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not name or not isinstance(module, nn.Linear):
            continue
        if any(p.startswith("lora_") or p in ("modules_to_save", "original_module") for p in parts):
            continue
        paths.append(".".join(parts[:-1]) if parts[-1] == "base_layer" else name)
    return paths


def default_targets(
    model: nn.Module, task: str, towers: tuple[str, ...] = (), names: tuple[str, ...] = ()
) -> list[str]:
    """The modules an image model's LoRA adapts: ``names`` (``lora.target_modules``) or the first
    of :data:`ATTENTION_PAIRS` the model has, restricted to ``towers`` for CLIP.

    For CLIP the result is the full path of every matching module in the chosen towers (peft
    matches a full path exactly); for an image classifier, the names themselves (peft matches
    them as suffixes), never the fresh head.

    Raises
    ------
    ConfigError
        One line naming ``lora.target_modules`` when the model has no attention projection to
        adapt (ConvNeXt, ResNet: name the layers), or ``lora.towers`` when a tower has none.
    """
    linear = [n for n in _linear_paths(model) if n != IMAGE_HEAD]
    leaves = {n.rsplit(".", 1)[-1] for n in linear}
    chosen = tuple(names) or next((pair for pair in ATTENTION_PAIRS if set(pair) <= leaves), ())
    if not chosen:
        raise ConfigError(
            f"config key 'lora.target_modules': {type(model).__name__} has no attention projection to adapt by "
            f"default; name its layers (linear modules: {', '.join(linear_leaves(model)[:12])})"
        )
    if task != "clip":
        return list(chosen)
    paths = []
    for tower in towers:
        prefix = TOWER_PREFIXES[tower]
        found = [n for n in linear if n.startswith(prefix) and any(n.endswith("." + t) for t in chosen)]
        if not found:
            raise ConfigError(
                f"config key 'lora.towers': the {tower} tower ({prefix}*) has no module named "
                f"{' or '.join(chosen)} (linear modules: {', '.join(linear_leaves(model)[:12])})"
            )
        paths += found
    return paths


def skeleton(config: Any, task: str, num_labels: int) -> nn.Module:
    """The image model of ``config`` built on the current device (the meta device for facts)."""
    from transformers import AutoModel, AutoModelForImageClassification

    if task == "clip":
        return AutoModel.from_config(config)
    config.num_labels = num_labels
    return AutoModelForImageClassification.from_config(config)


def load_vision(source: str, task: str, num_labels: int, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    """(model, processor) of an image task read from ``source`` (seed the head before calling).

    The classifier's head is replaced by a fresh one for ``num_labels`` classes
    (``ignore_mismatched_sizes``: a checkpoint fine-tuned on ImageNet keeps its body); CLIP is
    wrapped in :class:`PromptClassifier`.

    Raises
    ------
    OSError, ValueError
        As transformers raises them (the caller turns them into one line naming ``model.name``).
    """
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, AutoProcessor

    if task == "clip":
        model = AutoModel.from_pretrained(source, **kwargs)
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise ValueError(f"{type(model).__name__} is not an image-text model (no text and image features)")
        return PromptClassifier(model), AutoProcessor.from_pretrained(source)
    model = AutoModelForImageClassification.from_pretrained(
        source, num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs
    )
    return model, AutoImageProcessor.from_pretrained(source)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a :class:`PromptClassifier` (itself otherwise)."""
    return model.clip if isinstance(model, PromptClassifier) else model
