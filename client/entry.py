"""The ClientApp a deployment runs (``fedlora.client.entry:app``): light, it forwards to the worker.

Flower's SuperNode starts a fresh ``flwr-clientapp`` process per message and imports this
module in it, so it imports only Flower and the standard library. When the node config names a
worker (``fedlora-client`` starts one: :mod:`fedlora.client.worker`), each message is handled
there, by a process that keeps torch, transformers and the base model loaded between messages.
Otherwise (the in-process and Ray simulations, tests, a SuperNode started by hand) the handlers
of :mod:`fedlora.client.client_app` run here, as they always did; they are looked up at call
time, so a test can wrap one.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .worker import HANDLERS, call_worker, say_failure, worker_address

app = ClientApp()


def dispatch(kind: str, msg: Message, context: Context) -> Message:
    """Handle a ``kind`` message: in the worker when this node has one, else in this process."""
    address = worker_address(context.node_config)
    if address is not None:
        return call_worker(address, kind, msg, context)
    from . import client_app

    try:
        return getattr(client_app, HANDLERS[kind])(msg, context)
    except Exception as err:  # Flower turns it into the error reply; the device says why first
        say_failure(kind, err)
        raise


@app.query()
def query(msg: Message, context: Context) -> Message:
    return dispatch("query", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return dispatch("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return dispatch("evaluate", msg, context)
