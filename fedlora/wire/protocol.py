"""The wire protocol between the fedlora ServerApp and ClientApp: every key, in one place.

Server, client and strategies name message contents only through these constants. A key
that belongs to one strategy alone (FFA-LoRA's ``a-seed``, HetLoRA's pruning settings) lives in
that strategy's module, next to both halves that use it.

Messages (Flower message API; types are Flower's ``MessageType``):

* ``query`` (server -> node, once per node, for strategies whose payload depends on it):
  content ``{CONFIG: shared run config}``; the reply holds ``{INFO: capabilities}``.
* ``train``: content ``{ARRAYS: tensors to install and train (plus base-delta factors to fold
  into the frozen weights), CONFIG: shared + per-round + per-node settings}``; the reply holds
  ``{ARRAYS: the trained tensors, METRICS: train metrics, INFO: capabilities}``.
* ``evaluate`` (personalized strategies): content as for ``train`` plus ``EXPORT``; the reply
  holds ``{METRICS: evaluation metrics}``.

Tensor keys inside ``ARRAYS`` are peft's (``...query.lora_A.weight``; see
:mod:`fedlora.model.adapters`); a multi-adapter strategy qualifies them by adapter with
:func:`task_key` (``<task>::<key>``).
"""

from __future__ import annotations

# -- record names inside a message's RecordDict ----------------------------------------------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

# -- ConfigRecord keys every message carries (the run, shared by all nodes) -------------------
RUN = "run"  # the resolved RunConfig as JSON
RUN_UID = "run-uid"  # a token made when the run starts, kept across --resume: names a node's saved state
LABELS = "labels"  # JSON list of class names in id order
RUN_TASKS = "run-tasks"  # JSON list of the run's task names (empty: single task)
# The only key of the query a deployed server sends every node when its run has ended: one line
# saying how it ended; the device prints it and fedlora-client exits 0.
RUN_OVER = "run-over"
RUN_OVER_LINE = "the federation is over"  # what the device prints for it; fedlora-client watches for it

# -- ConfigRecord keys of a train / evaluate message (per round, per node) -------------------
SERVER_ROUND = "server-round"
RANK = "rank"
ALPHA = "alpha"
LOCAL_STEPS = "local-steps"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LR = "lr"
SEED = "seed"
TRANSPORT_DTYPE = "transport-dtype"
TRANSPORT_QUANTIZE = "transport-quantize"
ERROR_FEEDBACK = "error-feedback"
PROXIMAL_MU = "proximal-mu"  # FedProx: weight mu of (mu / 2) ||w - w_received||^2 in the local loss
# The stateful downlink of the base change (:mod:`fedlora.strategies.basechain`): the digest of the
# base this message builds to, and (when only links since then are sent) the one it builds on.
BASE_DIGEST = "base-digest"
BASE_FROM = "base-from"
EXPORT = "export"  # evaluate: also write this node's personalized adapter

# -- MetricRecord keys of a train reply -------------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_SECONDS = "train-seconds"
# RANK (above) also: the rank the node will train next (after any self-pruning).
# Local DP (privacy.mode = "local"): the node's sample-level epsilon so far, at privacy.delta.
EPSILON = "epsilon"
# A node whose privacy budget the round would exceed trains nothing and replies with these
# (no ARRAYS): the epsilon this round would have reached, and the budget.
BUDGET_STOP = "budget-stop"
EPSILON_NEXT = "epsilon-next"
EPSILON_BUDGET = "epsilon-budget"
# A node training one adapter per task adds NUM_EXAMPLES and TRAIN_LOSS per task: task_metric().

# -- ConfigRecord keys of a node's capability record (INFO) -----------------------------------
INFO_RANK = "rank"
INFO_DEVICE = "device"
INFO_MEMORY_GB = "memory-gb"
INFO_QUANTIZATION = "quantization"  # the base-model precision the node trains on
INFO_DTYPE = "dtype"  # its compute dtype
INFO_CHOSEN = "chosen"  # JSON: what --device/--quantization/--rank auto measured and chose
INFO_NUM_EXAMPLES = "num-examples"
INFO_TASKS = "tasks"  # JSON {task: examples}
INFO_BASE_DIGEST = "base-digest"  # train replies: the base change the node holds (basechain)

# -- node_config keys (set by fedlora-client or the simulation runtimes) ----------------------
NODE_DATA_PATH = "data-path"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_RANK = "rank"
NODE_EXPORT_DIR = "export-dir"
NODE_DEVICE = "device"  # fedlora-client --device, or the simulation's device for this delivery
NODE_QUANTIZATION = "quantization"  # fedlora-client --quantization
NODE_MODEL = "model"  # fedlora-client --model: this device's own base (strategies that allow one)

# -- run_config keys of a deployed run (written by fedlora-server, read by the deployed ServerApp)
RUN_CONFIG_FEDLORA = "fedlora-config"  # the resolved RunConfig as JSON
RUN_CONFIG_RUN_DIR = "run-dir"  # absolute runs/<name>/ on the server machine
RUN_CONFIG_RESUME = "resume"
RUN_CONFIG_MIN_CLIENTS = "min-clients"
RUN_CONFIG_WAIT_CLIENTS = "wait-clients"

# -- what a node keeps in Flower's Context.state across rounds --------------------------------
LOCAL_STATE = "fedlora-local"
PRIVACY_STATE = "fedlora-privacy"  # the node's privacy ledger (JSON), never sent
RESIDUAL_STATE = "fedlora-residual"  # error feedback: last upload's rounding residual, never sent

# -- several adapters in one flat state --------------------------------------------------------
TASK_SEP = "::"


def task_key(task: str, key: str) -> str:
    """Key of tensor (or metric) ``key`` of task ``task``'s adapter inside one flat mapping."""
    return f"{task}{TASK_SEP}{key}"


def split_task_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`task_key`; ``("", key)`` for keys of no task."""
    if TASK_SEP in key:
        task, _, rest = key.partition(TASK_SEP)
        return task, rest
    return "", key


def task_metric(metric: str, task: str) -> str:
    """Name of a per-task metric in a reply's MetricRecord: ``<metric>::<task>``
    (``num-examples::sst2``), so a metric's per-task values share its prefix."""
    return f"{metric}{TASK_SEP}{task}"


def task_metrics(metrics: dict, metric: str) -> dict[str, object]:
    """``{task: value}`` of the per-task entries of ``metric`` (see :func:`task_metric`)."""
    prefix = f"{metric}{TASK_SEP}"
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
