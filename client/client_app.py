"""Flower ClientApp of fedlora (message API).

A client keeps one base model per process (:func:`fedlora.models.load_model`) and one peft
adapter per rank on it; a train message only swaps the adapter's tensors, trains the ones it
received and sends them back (see :mod:`fedlora.strategies.base` for the protocol).

Where the client's data comes from, by ``context.node_config``:

* ``data-path``: a local file on this device (deployment: ``fedlora-client --data``);
* else ``partition-id`` / ``num-partitions``: its partition of the run's dataset (simulation).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters import AdapterSpec, from_record, get_host, seeded_lora_a, to_record
from fedlora.config import RunConfig
from fedlora.data import Encoded, encode, load_partition, load_task_data
from fedlora.models import load_model
from fedlora.training import steps_for, train_local

app = ClientApp()

_ENCODED: dict[tuple, Encoded] = {}
_ENCODED_LOCK = threading.Lock()


def client_data(run: RunConfig, context: Context, tokenizer: Any) -> Encoded:
    """This node's tokenized training examples (cached per process)."""
    node_cfg = context.node_config
    if "data-path" in node_cfg:
        local = RunConfig.from_dict({**run.to_dict(), "data": {**run.to_dict()["data"], "path": str(node_cfg["data-path"]),
                                                                "eval_path": "", "max_train_examples": 0}})
        key: tuple = ("local", repr(local.data), run.model.name, run.model.max_length)
        loader = lambda: load_task_data(local).train  # noqa: E731
    else:
        pid, num = int(node_cfg["partition-id"]), int(node_cfg["num-partitions"])
        key = ("partition", repr(run.data), run.seed, pid, num, run.model.name, run.model.max_length)
        loader = lambda: load_partition(run, pid, num)  # noqa: E731
    with _ENCODED_LOCK:
        if key not in _ENCODED:
            _ENCODED[key] = encode(loader(), tokenizer, run.model.max_length)
        return _ENCODED[key]


def handle_train(msg: Message, context: Context) -> Message:
    """Train the received factors on this node's data and reply with them."""
    config = msg.content["config"]
    run = RunConfig.from_dict(json.loads(str(config["run"])))
    labels = json.loads(str(config["labels"]))
    loaded = load_model(run.model, num_labels=max(len(labels), 2), seed=run.seed)
    host = get_host(loaded)
    spec = AdapterSpec.from_config(run.lora, run.model.task, rank=int(config["rank"]))
    received = from_record(msg.content["arrays"])
    data = client_data(run, context, loaded.tokenizer)
    steps = steps_for(len(data), int(config["batch-size"]), int(config["local-steps"]), float(config["local-epochs"]))
    start = time.perf_counter()
    with host.lock:  # one adapter per rank is shared by the virtual clients of this process
        name = host.ensure(spec, seed=run.seed)
        if "a-seed" in config:
            frozen = {k: s for k, s in host.shapes(name).items() if k not in received}
            host.load_state(name, seeded_lora_a(frozen, int(config["a-seed"])))
        host.load_state(name, received)
        params = host.params(name)
        result = train_local(
            host.peft_model,
            [params[k] for k in received],
            data,
            steps=steps,
            batch_size=int(config["batch-size"]),
            lr=float(config["lr"]),
            pad_id=loaded.tokenizer.pad_token_id,
            causal=run.model.task == "causal_lm",
            seed=int(config["seed"]) + 7919 * int(context.node_config.get("partition-id", context.node_id % 100_003)),
        )
        # Serialized under the lock: the next virtual client reuses these parameters.
        arrays = to_record({k: params[k] for k in received}, str(config["transport-dtype"]))
    metrics = MetricRecord({
        "num-examples": int(len(data)),
        "train-loss": float(result.loss),
        "train-steps": int(result.steps),
        "train-seconds": float(time.perf_counter() - start),
        "rank": int(spec.rank),
    })
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)
