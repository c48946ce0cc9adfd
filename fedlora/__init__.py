"""fedlora: federated LoRA fine-tuning on Flower.

The core library (this package) holds configuration, models, adapters, data, training and
run output; ``fedlora.server``, ``fedlora.client``, ``fedlora.strategies`` and
``fedlora.simulations`` (the repository's top-level folders) build the federation on top.
"""

__version__ = "0.1.0"
