"""FL-TAC: one low-rank adapter per task, clustered and aggregated within clusters.

Ping et al., "FL-TAC: Enhanced Fine-Tuning in Federated Learning via Low-Rank, Task-Specific
Adapter Clustering" (arXiv 2404.15384). A client holding data of several tasks trains one
adapter per task it has. The server does not average across tasks: it clusters every received
adapter with k-means on its flattened LoRA factors (k = number of tasks unless set) and
averages (example-weighted, each factor on its own, as FedIT) within each cluster. Each task's
next global adapter is the aggregate of the cluster holding most of that task's adapters;
cluster purity (the share of adapters whose cluster's majority task is their own) says how well
the tasks separate. Each task's adapter is exported on its own (``adapter/<task>/``).

The global state holds every task's adapter under ``<task>::<key>``; scaling is peft's
``alpha / r`` for all.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.config import is_image_task
from fedlora.data import subset
from fedlora.errors import ConfigError
from fedlora.model.adapters import AdapterSpec, is_lora_a, is_lora_b
from fedlora.wire.protocol import NUM_EXAMPLES, split_task_key, task_key, task_metric

from .base import ClientUpdate, GlobalView, LoRAStrategy
from .fedavg import weighted_mean
from .hooks import ClientHooks, TrainGroup
from .options import StrategyOptions, option
from .registry import register
from .robust import Reducer
from .settings import StrategySettings

#: Round config key: JSON list of the tasks whose adapters a node trains this round.
TASKS = "tasks"


def flatten_factors(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One vector of all LoRA factors of an adapter, keys in sorted order (heads excluded)."""
    parts = [state[k].reshape(-1).to(torch.float32) for k in sorted(state) if is_lora_a(k) or is_lora_b(k)]
    return torch.cat(parts)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (k-means++ init, Lloyd iterations) on the rows of ``x``.

    Parameters
    ----------
    x : Tensor
        (n x d) points.
    k : int
        Clusters; at most n.
    seed : int
        Seeds the k-means++ draws.
    iters : int
        Maximum Lloyd iterations (stops early when assignments settle).

    Returns
    -------
    tuple of Tensor
        Cluster index per row (n,) and centres (k x d).
    """
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} must be in [1, {n}]")
    # Centred float32 with matrix-product distances: adapters are long vectors (tens of
    # thousands of entries), where float64 cdist costs seconds for a thousand of them.
    x = x.to(torch.float32)
    offset = x.mean(dim=0, keepdim=True)
    x = x - offset
    sq = (x * x).sum(dim=1)

    def sq_dist(c: torch.Tensor) -> torch.Tensor:
        return (sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(dim=1)[None, :]).clamp_min(0.0)

    gen = torch.Generator().manual_seed(seed)
    centres = [x[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        dist = sq_dist(torch.stack(centres)).min(dim=1).values.to(torch.float64)
        if float(dist.sum()) == 0.0:
            centres.append(x[int(torch.randint(n, (1,), generator=gen))])
        else:
            centres.append(x[int(torch.multinomial(dist / dist.sum(), 1, generator=gen))])
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = sq_dist(c).argmin(dim=1)
        if torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(dim=0)
    return labels, c + offset


def cluster_purity(labels: Sequence[int], tags: Sequence[str]) -> float:
    """Share of items whose cluster's most common tag is their own tag."""
    if not labels:
        return 1.0
    by_cluster: dict[int, Counter] = {}
    for label, tag in zip(labels, tags):
        by_cluster.setdefault(int(label), Counter())[tag] += 1
    return sum(c.most_common(1)[0][1] for c in by_cluster.values()) / len(labels)


def task_clusters(labels: Sequence[int], tags: Sequence[str]) -> dict[str, int]:
    """For each tag, the cluster holding most of its items (ties: the lowest cluster index)."""
    out = {}
    for tag in dict.fromkeys(tags):
        counts = Counter(int(label) for label, t in zip(labels, tags) if t == tag)
        out[tag] = min(counts, key=lambda c: (-counts[c], c))
    return out


def fltac_aggregate(
    adapters: Sequence[Mapping[str, torch.Tensor]],
    tags: Sequence[str],
    weights: Sequence[float],
    k: int,
    seed: int = 0,
    mean: Reducer = weighted_mean,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[int], float]:
    """Cluster the adapters, average within clusters, and give each task its cluster's average.

    Parameters
    ----------
    adapters : sequence of mappings
        Every adapter received this round (one per client per task), same keys and shapes.
    tags : sequence of str
        The task each adapter was trained on (used to name clusters and score purity only).
    weights : sequence of float
        Example counts.
    k : int
        Number of clusters (capped at the number of adapters).
    seed : int
        Seeds k-means.
    mean : callable
        The average within a cluster (weighted mean, or a robust reducer).

    Returns
    -------
    tuple
        ``{task: aggregated adapter}``, the cluster of each adapter, and the purity.
    """
    k = min(k, len(adapters))
    features = torch.stack([flatten_factors(a) for a in adapters])
    labels, _ = kmeans(features, k, seed=seed)
    labels_list = [int(v) for v in labels]
    clusters: dict[int, dict[str, torch.Tensor]] = {}
    for c in sorted(set(labels_list)):
        members = [i for i, v in enumerate(labels_list) if v == c]
        clusters[c] = mean([adapters[i] for i in members], [weights[i] for i in members])
    per_task = {task: clusters[c] for task, c in task_clusters(labels_list, tags).items()}
    return per_task, labels_list, cluster_purity(labels_list, tags)


class FLTACOptions(StrategyOptions):
    clusters: int = option(0, "k of k-means; 0 = the number of tasks", ge=0)
    min_task_examples: int = option(
        1, "a client trains a task's adapter only with at least this many examples of it", ge=1
    )


class FLTACClient(ClientHooks):
    """Client half: one group per task the server names, each the task's adapter (keys
    ``<task>::<key>`` on the wire) trained on this node's examples of that task."""

    def groups(self, received, data, task_rows):
        groups = []
        for task in json.loads(str(self.config[TASKS])):
            tensors = {split_task_key(k)[1]: v for k, v in received.items() if split_task_key(k)[0] == task}
            groups.append(TrainGroup(name=task, tensors=tensors, data=subset(data, task_rows.get(task, []))))
        return groups


@register
class FLTAC(LoRAStrategy):
    """``fltac``: one adapter per task; k-means clustering of all received adapters, FedAvg within
    each cluster (options ``clusters``: k, 0 = number of tasks; ``min_task_examples``: a client
    trains a task's adapter only with at least this many examples of it)."""

    name = "fltac"
    secure_aggregation_refusal = "it clusters the nodes' individual adapters"
    central_dp_refusal = (
        "it clusters the nodes' individual adapters, which a single noisy mean of updates does not provide"
    )
    options_class = FLTACOptions
    client_hooks = FLTACClient
    needs_node_info = True
    #: Within a cluster the adapters are averaged factor by factor, as FedIT: a coordinate-wise
    #: reducer fits there (the clustering itself is on the clipped replies).
    robust_aggregators = ("mean", "trimmed_mean", "median")
    #: Each task's adapter is a tensor the server keeps across rounds, replaced by its cluster's
    #: average: a pseudo-gradient per task (zero for a task no node trained this round).
    server_optimizer_refusal = ""

    def __init__(self, settings: StrategySettings, spec: AdapterSpec, **kwargs: Any) -> None:
        super().__init__(settings, spec, **kwargs)
        self.purity: float | None = None
        self.cluster_sizes: list[dict[str, int]] = []
        self._payloads: dict[tuple, dict[str, torch.Tensor]] = {}

    @classmethod
    def check_setup(cls, cfg, tasks: list[str]) -> None:
        super().check_setup(cfg, tasks)
        if not tasks and is_image_task(cfg.model.task):
            raise ConfigError(
                f"config key 'strategy.name': strategy 'fltac' needs multi-task data, and image runs "
                f"(model.task = {cfg.model.task!r}) are single-task"
            )
        if not tasks:
            raise ConfigError(
                "config key 'data.task_column': strategy 'fltac' needs multi-task data; "
                "set data.task_column or list [[data.tasks]]"
            )

    def initialize(self, state: dict[str, torch.Tensor], host=None) -> dict[str, torch.Tensor]:
        if not self.tasks:
            raise ValueError("FL-TAC needs the task names before initialisation")
        return {task_key(t, k): v.clone() for t in self.tasks for k, v in state.items()}

    def node_tasks(self, node_id: int) -> list[str]:
        info = self.nodes.get(node_id)
        have = info.tasks if info is not None else {}
        return [t for t in self.tasks if have.get(t, 0) >= self.options.min_task_examples]

    def configure_train(self, server_round, arrays, config, grid):
        self._payloads = {}
        return super().configure_train(server_round, arrays, config, grid)

    def sample(self, grid, server_round):
        return [n for n in self.draw(grid, server_round) if self.node_tasks(n)]

    def payload(self, node_id: int, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tasks = tuple(self.node_tasks(node_id))
        if tasks not in self._payloads:
            self._payloads[tasks] = {k: v for k, v in state.items() if split_task_key(k)[0] in tasks}
        return self._payloads[tasks]

    def client_config(self, node_id: int, server_round: int) -> dict[str, Any]:
        return {TASKS: json.dumps(self.node_tasks(node_id))}

    def check_reply(self, node_id: int, metrics: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
        # Each task adapter in the reply is weighted by its task's count: a zero would leave a
        # cluster weightless (its mean undefined).
        returned = {split_task_key(k)[0] for k in state}
        for task in self.tasks:
            key = task_metric(NUM_EXAMPLES, task)
            if task in returned and key in metrics and not (isinstance(metrics[key], int) and metrics[key] >= 1):
                raise ValueError(
                    f"{key} must be a positive integer for a task the reply trained, got {metrics[key]!r:.40}"
                )

    def aggregate(
        self, server_round: int, state: dict[str, torch.Tensor], updates: list[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        adapters, tags, weights, owners = [], [], [], []
        for update in updates:
            for task in self.tasks:
                part = {split_task_key(k)[1]: v for k, v in update.state.items() if split_task_key(k)[0] == task}
                if part:
                    adapters.append(part)
                    tags.append(task)
                    weights.append(int(update.metrics.get(task_metric(NUM_EXAMPLES, task), update.num_examples)))
                    owners.append(update.node_id)
        k = self.options.clusters or len(self.tasks)
        per_task, labels, purity = fltac_aggregate(
            adapters, tags, weights, k, seed=self.settings.seed + server_round, mean=self.average(weighted_mean)
        )
        for task, adapter in per_task.items():
            state.update({task_key(task, key): v for key, v in adapter.items()})
        self.purity = purity
        sizes: dict[int, Counter] = {}
        for label, tag, owner in zip(labels, tags, owners):
            sizes.setdefault(label, Counter())[tag] += 1
            self._client_facts.setdefault(owner, {}).setdefault("clusters", {})[tag] = label
        self.cluster_sizes = [dict(sizes[c]) for c in sorted(sizes)]
        return state

    def round_metrics(self) -> dict[str, Any]:
        if self.purity is None:
            return {}
        return {"cluster_purity": self.purity, "cluster_tasks": self.cluster_sizes}

    def views(self, state: Mapping[str, torch.Tensor]) -> list[GlobalView]:
        out = []
        for task in self.tasks:
            part = {split_task_key(k)[1]: v for k, v in state.items() if split_task_key(k)[0] == task}
            out.append(GlobalView(name=task, spec=self.spec, state=part))
        return out
