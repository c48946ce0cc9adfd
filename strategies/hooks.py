"""The client half of a strategy: hooks the generic ClientApp calls around local training.

The ClientApp (:mod:`fedlora.client.client_app`) knows nothing about any strategy. For a train
message it does, in order::

    hooks = strategy_class.client_hooks(config)      # from the message's ConfigRecord
    host.set_base_delta(*hooks.base_delta(...))      # what the frozen base becomes this round
    for group in hooks.groups(received, data, rows): # one adapter to train per group
        install hooks.frozen(...)                    #   untrained tensors (a shared seeded A)
        install group.tensors                        #   what the server sent
        install hooks.kept(...)                      #   what the node keeps for itself
        extra = hooks.outside(...)                   #   trained beside the adapter (SLoRA's sparse entries)
        with hooks.training(...) as before_step:   #   per-step behaviour (DyLoRA's rank)
            train_local(..., regularizer=hooks.regularizer(...), dp=...)
        out, metrics = hooks.after_train(...)        #   what to send (pruned, say)
        hooks.keep(...)                              #   what to keep for the next round
    reply with every group's ``out``

and for an evaluate message (personalized strategies) it installs the received tensors and
``hooks.kept(...)``. Every method has a default that is right for FedIT (train and send back
exactly what was received), so a strategy overrides only what it changes. Hooks are plain
objects over tensors: tests call them without Flower, a model or data.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fedlora.files import atomic_write_bytes
from fedlora.model.adapters import exact_on_wire, from_record, module_of, to_record
from fedlora.wire.protocol import LOCAL_STATE


@dataclass
class TrainGroup:
    """One adapter a node trains this round, on some of its examples.

    Attributes
    ----------
    name : str
        ``""`` for the single adapter; a task name when a node trains one adapter per task
        (the reply's keys and per-task metrics are then qualified with it).
    tensors : dict of str to Tensor
        The received tensors to install and train (unqualified keys).
    data : Any
        The examples (:class:`fedlora.data.Encoded`) to train them on.
    """

    name: str
    tensors: dict[str, torch.Tensor]
    data: Any


class NodeStore:
    """Tensors a node keeps for itself across rounds (FedSA-LoRA's private B), in Flower's
    ``Context.state`` and, on a device, in a file of its own.

    ``Context.state`` persists across rounds in every runtime (the in-process simulation, whose
    checkpoints include it; Ray; a deployed SuperNode), and nothing in it is ever sent. A
    SuperNode keeps it in memory only, and a restarted server starts a new Flower run whose
    Context is empty, so a device also writes what it keeps to ``file`` (safetensors, tagged
    with the run's ``run_uid``) and reads it back when its state is empty: a resumed run finds
    its private factors, a new run of the same preset (another ``run_uid``) starts afresh.
    """

    def __init__(self, state: RecordDict, file: Path | None = None, run_uid: str = "") -> None:
        self._state = state
        self._file = file
        self._run_uid = run_uid

    def load(self) -> dict[str, torch.Tensor]:
        if LOCAL_STATE in self._state:
            return from_record(self._state[LOCAL_STATE])
        if self._file is None or not self._run_uid or not self._file.is_file():
            return {}
        try:
            with safe_open(str(self._file), framework="pt") as f:
                if (f.metadata() or {}).get("run_uid") != self._run_uid:
                    return {}  # another run's: never mix a stale private factor into this one
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, RuntimeError, SafetensorError):  # unreadable: start afresh, not fail
            return {}
        self._state[LOCAL_STATE] = to_record(tensors)
        return tensors

    def save(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._state[LOCAL_STATE] = to_record(tensors)
        if self._file is not None and self._run_uid:
            data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, {"run_uid": self._run_uid})
            atomic_write_bytes(self._file, data, private=True)


def digest(tensors: Mapping[str, torch.Tensor], extra: str = "") -> str:
    """A short token naming ``tensors`` (CRC of keys and bytes), so equal base deltas are applied once."""
    crc = zlib.crc32(extra.encode())
    for key in sorted(tensors):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(tensors[key].detach().contiguous().numpy().tobytes(), crc)
    return f"{extra}:{crc:08x}"


def fold_factors(factors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense per-module ``B_d @ A_d`` of received ``<module>.base_delta_A/B`` factors."""
    dense: dict[str, torch.Tensor] = {}
    for key, a in factors.items():
        if key.endswith("_A"):
            module = module_of(key)
            dense[module] = factors[f"{module}.base_delta_B"] @ a
    return dense


class ClientHooks:
    """Client-side behaviour of a strategy (the defaults are FedIT's).

    Parameters
    ----------
    config : mapping
        The train or evaluate message's ConfigRecord: a strategy reads the keys its server half
        put there (:meth:`fedlora.strategies.LoRAStrategy.client_config`).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config

    # -- before training ---------------------------------------------------------------------

    def base_delta(
        self, host: Any, modules: list[str], factors: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], str]:
        """What to add to the frozen base weights this round, and a token naming it.

        Parameters
        ----------
        host : AdapterHost
            Gives the pretrained weights (:meth:`~fedlora.model.adapters.AdapterHost.base_weight`).
        modules : list of str
            The adapter's target modules.
        factors : mapping
            The received base-delta factors (``<module>.base_delta_A/B``, ``D = B @ A``): the
            exact strategies merge updates into the base and send the merge this way.

        Returns
        -------
        tuple
            ``{module: dense (out x in) delta}`` and a token (``""`` for none).
        """
        return fold_factors(factors), digest(factors) if factors else ""

    def groups(
        self, received: Mapping[str, torch.Tensor], data: Any, task_rows: Mapping[str, list[int]]
    ) -> list[TrainGroup]:
        """The adapters to train and on which examples (default: one, on all of them).

        Parameters
        ----------
        received : mapping
            The received tensors other than base-delta factors.
        data : Encoded
            All of this node's training examples.
        task_rows : mapping of str to list of int
            Row indices of ``data`` per task (empty for single-task data).
        """
        return [TrainGroup(name="", tensors=dict(received), data=data)]

    def frozen(self, shapes: Mapping[str, tuple[int, ...]], group: TrainGroup) -> dict[str, torch.Tensor]:
        """Values for adapter tensors that were not sent and are not trained (default: none,
        they keep what they hold)."""
        return {}

    def kept(
        self, shapes: Mapping[str, tuple[int, ...]], received: Mapping[str, torch.Tensor], store: NodeStore
    ) -> dict[str, torch.Tensor]:
        """Tensors this node keeps for itself: installed over the received ones, trained with
        them, never sent (default: none)."""
        return {}

    def outside(self, host: Any, group: TrainGroup) -> dict[str, torch.nn.Parameter]:
        """Parameters beside the adapter that local training steps with it, keyed as they are sent
        back (default: none). SLoRA's first stage trains sparse entries of the frozen weights this
        way: the hook makes the parameters here and wires them into the model in :meth:`training`;
        the node sends their trained values with the adapter's tensors.

        Parameters
        ----------
        host : AdapterHost
            The node's adapter host (its pretrained weights: :meth:`~fedlora.model.adapters.AdapterHost.base_weight`).
        group : TrainGroup
            The adapter about to be trained.
        """
        return {}

    # -- during training ----------------------------------------------------------------------

    def regularizer(self, params: Mapping[str, torch.nn.Parameter], rank: int) -> Callable[[], torch.Tensor] | None:
        """A penalty added to every step's loss (default: none).

        It must depend on the parameters alone, never on examples: under DP-SGD its gradient is
        added after the per-example clipping and noise, at no privacy cost.
        """
        return None

    def training(self, model: torch.nn.Module, spec: Any) -> contextlib.AbstractContextManager:
        """Entered around one group's local training; yields a callable run before every step
        with the 0-based step (DyLoRA samples the step's rank), or None (the default).

        Parameters
        ----------
        model : torch.nn.Module
            The peft model with the group's adapter active (hooks it installs must go on exit).
        spec : AdapterSpec
            The adapter's shape.
        """
        return contextlib.nullcontext(None)

    # -- after training -----------------------------------------------------------------------

    def after_train(
        self, trained: dict[str, torch.Tensor], rank: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What to send for one group, and metrics to add to the reply (``rank``: the rank the
        node trains next). Default: the trained tensors as they are."""
        return trained, {}

    def keep(self, store: NodeStore, kept: dict[str, torch.Tensor]) -> None:
        """Store what :meth:`kept` installed, as trained, for the next round (default: nothing).

        ``kept`` holds the live parameters: :meth:`NodeStore.save` serializes (copies) them.
        """


def split_received(received: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors to train, base-delta factors and links to fold into the frozen weights)."""
    trained = {k: v for k, v in received.items() if not exact_on_wire(k)}
    factors = {k: v for k, v in received.items() if exact_on_wire(k)}
    return trained, factors
