"""What a strategy reads and returns besides tensors: what nodes report about themselves
(:class:`NodeInfo`, kept in :class:`NodeDirectory`), one validated reply (:class:`ClientUpdate`,
:func:`decode_reply`) and a global view to export (:class:`GlobalView`).

A node's ``INFO`` record is checked field by field against the bounds below before anything
believes it: a node may only describe itself, within limits, in one line per mistake.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import Message

from fedlora.model.adapters import (
    AdapterSpec,
    from_record,
    is_base_delta,
    module_of,
)
from fedlora.wire import protocol as P


@dataclass
class NodeInfo:
    """What a node said about itself (its ``INFO`` record: a query reply's or a train reply's).

    Attributes
    ----------
    node_id : int
        The node.
    rank : int
        The LoRA rank it trains (its device profile, ``fedlora-client --rank``, or ``lora.rank``).
    device : str
        ``cpu``, ``cuda:0``, ...
    memory_gb : float
        Memory the device reports (0 when unknown).
    num_examples : int
        Its training examples.
    tasks : dict of str to int
        Examples per task (multi-task data), else empty.
    quantization : str
        The base-model precision it trains on (``none``, ``8bit``, ``4bit``).
    dtype : str
        Its compute dtype.
    chosen : dict
        What ``fedlora-client --quantization/--rank auto`` measured and chose (empty otherwise).
    """

    node_id: int
    rank: int
    device: str = "cpu"
    memory_gb: float = 0.0
    num_examples: int = 0
    tasks: dict[str, int] = field(default_factory=dict)
    quantization: str = "none"
    dtype: str = "float32"
    chosen: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, node_id: int, info: Mapping[str, Any]) -> NodeInfo:
        """Parse an ``INFO`` record; ValueError naming the entry when it is malformed.

        Every value is checked before it is kept (a node's word shapes payloads and weights):
        ``rank`` a whole number in ``[1, MAX_INFO_RANK]`` (strategies cap it at ``lora.rank``),
        counts whole and in ``[0, MAX_INFO_COUNT]``, memory finite and non-negative, strings
        short and printable, ``tasks`` and ``chosen`` bounded JSON objects.
        """
        rank = info[P.INFO_RANK]
        if not _whole(rank, 1, MAX_INFO_RANK):
            raise ValueError(f"{P.INFO_RANK} must be a whole number in [1, {MAX_INFO_RANK}], got {rank!r:.40}")
        memory = info.get(P.INFO_MEMORY_GB, 0.0)
        if not isinstance(memory, (int, float)) or isinstance(memory, bool) or not 0 <= memory <= MAX_INFO_MEMORY_GB:
            raise ValueError(f"{P.INFO_MEMORY_GB} must be a number in [0, {MAX_INFO_MEMORY_GB:g}], got {memory!r:.40}")
        num = info.get(P.INFO_NUM_EXAMPLES, 0)
        if not _whole(num, 0, MAX_INFO_COUNT):
            raise ValueError(f"{P.INFO_NUM_EXAMPLES} must be a whole number in [0, {MAX_INFO_COUNT}], got {num!r:.40}")
        tasks = _json_object(info, P.INFO_TASKS)
        if len(tasks) > MAX_INFO_TASKS or not all(_label(k) and _whole(v, 0, MAX_INFO_COUNT) for k, v in tasks.items()):
            raise ValueError(f"{P.INFO_TASKS} must map at most {MAX_INFO_TASKS} task names to example counts")
        texts = {key: info.get(key, default) for key, default in _INFO_TEXTS.items()}
        for key, text in texts.items():
            if not _label(text):
                raise ValueError(f"{key} must be a printable string of at most {MAX_INFO_TEXT} characters")
        return cls(
            node_id=node_id,
            rank=rank,
            device=texts[P.INFO_DEVICE],
            memory_gb=float(memory),
            num_examples=num,
            tasks=dict(tasks),
            quantization=texts[P.INFO_QUANTIZATION],
            dtype=texts[P.INFO_DTYPE],
            chosen=_json_object(info, P.INFO_CHOSEN),
        )


#: Bounds on what a node may say about itself (``INFO``): far above any real device, low enough
#: that nothing downstream (payload shapes, weights, the capability table) is at risk.
MAX_INFO_RANK = 4096
MAX_INFO_MEMORY_GB = 1e9
MAX_INFO_COUNT = 10**12
MAX_INFO_TASKS = 256
MAX_INFO_TEXT = 64
MAX_INFO_JSON = 4096
_INFO_TEXTS = {P.INFO_DEVICE: "cpu", P.INFO_QUANTIZATION: "none", P.INFO_DTYPE: "float32"}


def _whole(value: Any, least: int, most: int) -> bool:
    """Whether ``value`` is an int (not a bool) in ``[least, most]``."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def _label(value: Any) -> bool:
    """Whether ``value`` is a short printable string (it lands in progress lines and tables)."""
    return isinstance(value, str) and len(value) <= MAX_INFO_TEXT and value.isprintable()


def _json_object(info: Mapping[str, Any], key: str) -> dict[str, Any]:
    """The JSON object under ``key`` (``{}`` when absent); ValueError unless it is a string of at
    most :data:`MAX_INFO_JSON` characters holding a finite JSON object."""
    text = info.get(key, "{}")
    if not isinstance(text, str) or len(text) > MAX_INFO_JSON:
        raise ValueError(f"{key} must be a JSON object of at most {MAX_INFO_JSON} characters")

    def refuse(constant: str) -> None:
        raise ValueError(f"{key} holds {constant}")

    try:
        value = json.loads(text, parse_constant=refuse)
    except RecursionError:  # nesting deep enough to exhaust the parser's stack
        raise ValueError(f"{key} is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"{key} is not a JSON object")
    return value


class NodeDirectory:
    """What every node of the run said about itself, kept by the server's round loop and read
    by the strategy it is given to (heterogeneous strategies shape payloads by it)."""

    def __init__(self) -> None:
        self._nodes: dict[int, NodeInfo] = {}

    def record(self, node_id: int, info: Mapping[str, Any]) -> NodeInfo | None:
        """Keep what ``node_id`` reported; None (and nothing kept) for a malformed record."""
        try:
            self._nodes[node_id] = NodeInfo.from_record(node_id, info)
        except (KeyError, TypeError, ValueError):
            return None
        return self._nodes[node_id]

    def get(self, node_id: int) -> NodeInfo | None:
        return self._nodes.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def all(self) -> list[NodeInfo]:
        """Every node that reported, by node id."""
        return [self._nodes[n] for n in sorted(self._nodes)]

    def unknown(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes among ``node_ids`` that have not reported yet, sorted."""
        return sorted(n for n in node_ids if n not in self._nodes)


@dataclass
class GlobalView:
    """One model that the global state describes, as the server evaluates and exports it.

    Attributes
    ----------
    name : str
        ``""`` for the single global adapter; a task name for FL-TAC's per-task adapters.
    spec : AdapterSpec
        Shape of the adapter (rank, alpha, targets).
    state : dict of str to Tensor
        LoRA factors and trained head, keyed as in :mod:`fedlora.model.adapters`.
    base_delta : dict of str to (Tensor, Tensor)
        Per target module, factors ``(B_d, A_d)`` of a delta folded into the frozen weight:
        the model is ``W0 + B_d @ A_d + scaling * B @ A``.
    """

    name: str
    spec: AdapterSpec
    state: dict[str, torch.Tensor]
    base_delta: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def split_base_delta(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(adapter tensors, {module: (B_d, A_d)}) from a state that may hold base-delta factors."""
    adapter = {k: v for k, v in state.items() if not is_base_delta(k)}
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in state:
        if is_base_delta(key) and key.endswith("_A"):
            module = module_of(key)
            deltas[module] = (state[f"{module}.base_delta_B"], state[key])
    return adapter, deltas


@dataclass
class ClientUpdate:
    """One validated reply, decoded.

    Attributes
    ----------
    node_id : int
        The replying node.
    state : dict of str to Tensor
        The trained tensors (float32), same keys as were sent to this node.
    num_examples : int
        Examples the client trained on this round (the FedAvg weight).
    metrics : dict
        The reply's MetricRecord as plain values.
    """

    node_id: int
    state: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)


def decode_reply(msg: Message) -> ClientUpdate:
    """ClientUpdate from a (validated) train reply."""
    metrics = dict(msg.content[P.METRICS])
    return ClientUpdate(
        node_id=msg.metadata.src_node_id,
        state=from_record(msg.content[P.ARRAYS]),
        num_examples=int(metrics[P.NUM_EXAMPLES]),
        metrics=metrics,
    )
