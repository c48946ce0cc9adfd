"""The model layer: base model and tokenizer loading (hub name or folder, bitsandbytes
quantization), where and in what precision it runs, what a device can hold, and the LoRA adapters
on a shared base.

- :mod:`~fedlora.model.hub`: is the Hugging Face hub reachable (decided once, fast).
- :mod:`~fedlora.model.loading`: :func:`~fedlora.model.loading.load_model`, quantization, heads.
- :mod:`~fedlora.model.devices`: ``model.device`` / ``model.dtype`` resolved to a placement.
- :mod:`~fedlora.model.capacity`: the memory a (precision, rank) needs, the best under a budget.
- :mod:`~fedlora.model.adapters`: peft adapters on one shared base; their factors as records.
- :mod:`~fedlora.model.lowrank`: pure low-rank algebra (SVD starts, stacking, rank padding).
"""
