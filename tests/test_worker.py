"""The deployed device's worker (fedlora.client.worker) and the light ClientApp (fedlora.client.entry).

Each test starts real worker subprocesses on a Unix socket in a private temporary directory;
every one is bounded by timeouts and stopped by its pid. Most use a small stand-in handlers
module (written to tmp_path); one runs a whole simulation whose every message goes through a
worker running fedlora's real handlers, and compares it with the same simulation run directly.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import process_alive
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedlora.client import worker as W

pytestmark = pytest.mark.unit

FAKE_HANDLERS = """
import os
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict


def handle_train(msg, context):
    n = int(context.state.config_records["count"]["n"]) + 1 if "count" in context.state.config_records else 1
    context.state["count"] = ConfigRecord({"n": n})
    got = float(msg.content.metric_records["m"]["x"])
    return Message(RecordDict({"m": MetricRecord({"n": n, "x2": 2 * got})}), reply_to=msg)


def handle_evaluate(msg, context):
    context.state["touched"] = ConfigRecord({"yes": True})
    raise ValueError("bad data in row 3")


def handle_query(msg, context):
    os._exit(3)  # the worker dies in the middle of a message
"""


@pytest.fixture
def socket_dir():
    """A private directory with a short path (Unix socket paths are limited to ~104 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix=W.DIR_PREFIX, dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)  # the worker may have removed it already


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def start_worker(address: str, key: bytes, handlers: str = W.HANDLER_MODULE, pythonpath: Path | None = None):
    env = {**os.environ, W.AUTHKEY_ENV: key.hex()}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "fedlora.client.worker", "--address", address, "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(
        cmd + ["--handlers", handlers], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert _wait_for(lambda: os.path.exists(address) or proc.poll() is not None, 60), "worker did not start"
        assert proc.poll() is None, proc.stdout.read()
    except BaseException:
        _kill(proc)
        raise
    return proc


@pytest.fixture
def fake_worker(socket_dir, tmp_path):
    (tmp_path / "fake_handlers.py").write_text(FAKE_HANDLERS)
    address, key = str(socket_dir / W.SOCKET_NAME), secrets.token_bytes(W.AUTHKEY_BYTES)
    proc = start_worker(address, key, "fake_handlers", tmp_path)
    yield address, key, proc
    _kill(proc)


def _message(kind: str, x: float = 1.5) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 5, 1
    msg = Message(RecordDict({"m": MetricRecord({"x": x})}), message_type=kind, dst_node_id=7, group_id="1")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperNode sets it
    return msg


def _context(address: str | None = None) -> Context:
    node_config = {"partition-id": 0} | ({W.NODE_WORKER_ADDRESS: address} if address else {})
    return Context(run_id=5, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_reply_and_state_come_back(fake_worker):
    address, key, _ = fake_worker
    context = _context(address)
    for n in (1, 2):
        msg = _message("train", x=float(n))
        reply = W.call_worker(address, "train", msg, context, authkey=key)
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.dst_node_id == msg.metadata.src_node_id
        assert dict(reply.content.metric_records["m"]) == {"n": n, "x2": 2.0 * n}
        # The worker's context.state is now the ClientApp's (Flower persists it between messages).
        assert context.state.config_records["count"]["n"] == n


def test_entry_app_forwards_through_node_config(fake_worker, monkeypatch):
    from fedlora.client.entry import app

    address, key, _ = fake_worker
    monkeypatch.setenv(W.AUTHKEY_ENV, key.hex())
    context = _context(address)
    reply = app(_message("train", x=4.0), context)
    assert reply.content.metric_records["m"]["x2"] == 8.0 and context.state.config_records["count"]["n"] == 1


def test_handler_error_arrives_as_the_same_error(fake_worker):
    address, key, proc = fake_worker
    context = _context(address)
    with pytest.raises(ValueError) as info:
        W.call_worker(address, "evaluate", _message("evaluate"), context, authkey=key)
    err = info.value
    # Flower's error reply reads str(type(err)) and str(err): both as if raised here.
    assert str(type(err)) == "<class 'ValueError'>" and str(err) == "bad data in row 3"
    assert context.state.config_records["touched"]["yes"] is True  # state written before the error
    reply = W.call_worker(address, "train", _message("train"), context, authkey=key)  # still serving
    assert reply.content.metric_records["m"]["n"] == 1
    assert proc.poll() is None


def test_error_of_a_class_not_imported_here():
    err = W.remote_error("some.unimported.module", "Boom", "it broke")
    assert str(type(err)) == "<class 'some.unimported.module.Boom'>" and str(err) == "it broke"
    from fedlora.errors import DataError

    err = W.remote_error("fedlora.errors", "DataError", "--data x.csv: no column 'text'")
    assert isinstance(err, DataError) and str(type(err)) == str(DataError)


def test_wrong_authkey_is_refused(fake_worker):
    address, key, proc = fake_worker
    with pytest.raises(W.WorkerError, match="refused"):
        W.call_worker(address, "train", _message("train"), _context(address), authkey=secrets.token_bytes(32))
    reply = W.call_worker(address, "train", _message("train"), _context(address), authkey=key)
    assert reply.content.metric_records["m"]["n"] == 1 and proc.poll() is None


def test_missing_authkey_is_one_line(monkeypatch):
    monkeypatch.delenv(W.AUTHKEY_ENV, raising=False)
    with pytest.raises(W.WorkerError, match=W.AUTHKEY_ENV) as info:
        W.authkey_from_env()
    assert "\n" not in str(info.value)


def test_a_dead_worker_is_reported_in_one_line(fake_worker):
    address, key, proc = fake_worker
    with pytest.raises(W.WorkerError, match="stopped while handling a query message") as info:
        W.call_worker(address, "query", _message("query"), _context(address), authkey=key)
    assert "\n" not in str(info.value)
    assert proc.wait(timeout=10) == 3
    with pytest.raises(W.WorkerError, match="not running") as info:
        W.call_worker(address, "train", _message("train"), _context(address), authkey=key)
    assert "\n" not in str(info.value)


def test_worker_exits_when_its_parent_is_killed(socket_dir):
    """A SIGKILL of the parent (fedlora-client) must not leave the worker running."""
    address = str(socket_dir / W.SOCKET_NAME)
    parent_code = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        env = dict(os.environ, {W.AUTHKEY_ENV}={secrets.token_hex(32)!r})
        cmd = [sys.executable, "-m", "fedlora.client.worker", "--address", {address!r},
               "--parent-pid", str(os.getpid()), "--handlers", "json"]
        child = subprocess.Popen(cmd, env=env)
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(parent.stdout.readline())
        assert _wait_for(lambda: os.path.exists(address), 30)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        gone = _wait_for(lambda: not process_alive(child_pid), 10)
        assert gone, "the worker outlived its parent"
        assert not os.path.exists(address) and not socket_dir.exists()  # its private directory too
    finally:
        _kill(parent)
        if child_pid is not None and process_alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_client_package_stays_light():
    """The per-message ClientApp imports neither torch nor transformers (nor fedlora's handlers)."""
    code = (
        "import sys, fedlora.client.entry, fedlora.client.worker\n"
        "heavy = [m for m in ('torch', 'transformers', 'fedlora.client.client_app') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    from fedlora.client import app, handle_train  # the package still offers the real ClientApp

    assert callable(handle_train) and app is not None


@pytest.mark.simulation
def test_simulation_through_a_worker_matches_direct(tiny_bert, make_config, tmp_path, socket_dir, monkeypatch):
    """Every message of a fedsa run (train and evaluate, node state kept in context.state between
    rounds) handled by a worker running fedlora's real handlers: the same adapters as in-process."""
    from fedlora.client import entry
    from fedlora.run.directory import RunDirectory
    from fedlora.run.progress import Progress
    from fedlora.simulations import runtime

    cfg = make_config(tiny_bert, strategy="fedsa")
    runtime.simulate(cfg, out=tmp_path / "direct", progress=Progress(quiet=True), report=False)

    address, key = str(socket_dir / W.SOCKET_NAME), secrets.token_bytes(W.AUTHKEY_BYTES)
    proc = start_worker(address, key)
    try:
        base = runtime.InProcessGrid

        class ViaWorker(base):
            def __init__(self, client_app, num_nodes, run_id=1, node_config=None):
                super().__init__(entry.app, num_nodes, run_id, {**(node_config or {}), W.NODE_WORKER_ADDRESS: address})

        monkeypatch.setattr(runtime, "InProcessGrid", ViaWorker)
        monkeypatch.setenv(W.AUTHKEY_ENV, key.hex())
        result = runtime.simulate(cfg, out=tmp_path / "worker", progress=Progress(quiet=True), report=False)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            _kill(proc)
    log = proc.stdout.read()
    assert "worker ready" in log, log
    assert all(r["clients_ok"] == 3 and not r["dropped"] for r in result.rounds), result.rounds
    assert not os.path.exists(address)  # SIGTERM: the worker removed its socket
    _, direct, _ = RunDirectory(tmp_path / "direct").load_checkpoint()
    _, via, _ = RunDirectory(tmp_path / "worker").load_checkpoint()
    assert direct.keys() == via.keys()
    for k in direct:
        assert torch.allclose(direct[k], via[k], atol=1e-6), k
    # The clients' own (personalized) evaluation ran in the worker too, with the state it kept.
    direct_rounds = [r["eval_accuracy"] for r in RunDirectory(tmp_path / "direct").read_metrics()]
    assert [r["eval_accuracy"] for r in result.rounds] == pytest.approx(direct_rounds)


# -- the worker as the SuperNode's ClientApp executor (fedlora.client.executor) --------------------


def _fab(clientapp: str) -> bytes:
    import tomli_w
    from flwr.cli.build import build_fab_from_files

    project = {
        "project": {"name": "fab-test", "version": "1.0.0", "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "test", "components": {"serverapp": "x:app", "clientapp": clientapp}}}},
    }
    fab, _ = build_fab_from_files({"pyproject.toml": tomli_w.dumps(project).encode()})
    return fab


def test_executor_files_are_private_and_agree_on_the_secret(socket_dir):
    from fedlora.client import executor as X

    key = secrets.token_bytes(W.AUTHKEY_BYTES)
    secret = X.superexec_secret(key)
    assert secret == X.superexec_secret(key) and secret != key and len(secret) == 32
    assert X.read_runtime(socket_dir) is None
    from fedlora.files import atomic_write_bytes

    atomic_write_bytes(socket_dir / X.RUNTIME_NAME, b"127.0.0.1:4242", private=True)  # as the launcher writes it
    assert X.read_runtime(socket_dir) == "127.0.0.1:4242"
    assert (socket_dir / X.RUNTIME_NAME).stat().st_mode & 0o777 == 0o600
    assert X.clientapp_reference(_fab(X.APP_REFERENCE)) == "fedlora.client.entry:app"


def test_executor_runs_only_fedloras_clientapp(capsys):
    """A run whose FAB names another ClientApp gets Flower's load error, and the device says why."""
    from flwr.common.constant import ErrorCode, SubStatus

    from fedlora.client import executor as X

    msg = _message("train")
    reply, status, _ = X.call_app(msg, _context(), _fab("evil.module:app"))
    assert status == SubStatus.FAILED and reply.has_error()
    assert reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert "names the ClientApp 'evil.module:app'" in capsys.readouterr().out


def test_executor_error_reply_is_flwr_clientapps():
    """fedlora's ClientApp raising in the worker gives the server the error reply a
    ``flwr-clientapp`` process sends: the same code and ``<class ...>:<'message'>`` reason."""
    from flwr.common.constant import ErrorCode, SubStatus

    from fedlora.client import executor as X

    msg = _message("train")  # no fedlora payload: the handler refuses it
    reply, status, details = X.call_app(msg, _context(), _fab(X.APP_REFERENCE))
    assert status == SubStatus.FAILED and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == details and details.startswith("<class '") and ":<'" in details


def test_watcher_keeps_flowers_secret_note_quiet():
    import io

    from fedlora.client.device import Watcher

    lines = []
    text = (
        "WARNING :   EXPERIMENTAL: SuperExec authentication is experimental and may change.\n"
        "WARNING :   something the user should see\n"
    )
    Watcher(io.StringIO(text), lines.append, verbose=False).thread.join(timeout=5)
    assert lines == ["WARNING :   something the user should see"]
