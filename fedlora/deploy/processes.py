"""Process helpers both launchers share (``fedlora-server`` and ``fedlora-client``), and the
simulation's worker lanes: Flower's commands beside this Python, their environment, children
that die with their launcher, and stopping a child's whole process group."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def tool(name: str) -> str:
    """Path of a Flower command installed beside this Python (the venv's bin/)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def tool_env() -> dict[str, str]:
    """Environment for Flower's processes: they start further Flower commands by name."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Each message starts a ClientApp/ServerApp process once the SuperExec sees the task: look often.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    return env


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when the process starting it dies.

    A SIGKILL of ``fedlora-server`` or ``fedlora-client`` runs no cleanup, and the SuperLink and
    SuperNode are in their own sessions (so a Ctrl-C reaches only the launcher): without this they
    would go on serving and training. Flower's own children (SuperExec, ServerApp, ClientApp)
    watch their parent's pid and end with it. Linux only; elsewhere a no-op.
    """
    parent = os.getpid()

    def hook() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def loopback_port() -> int:
    """A free port on 127.0.0.1 for the SuperLink itself (only this host reaches it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def end_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace`` seconds if it is still there."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=5)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass
