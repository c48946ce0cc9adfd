"""One run directory, one writer: an exclusive OS lock on ``<run dir>/.lock``.

Two runs writing one folder would interleave their rounds in metrics.jsonl and overwrite each
other's checkpoints, so every run (``fedlora simulate``, fresh or ``--resume``, and
``fedlora-server``) holds this lock from before it writes or removes anything there until it
ends. ``fcntl.flock`` ties the lock to the open file, not to the file's existence: the kernel
drops it when the holder dies in any way (SIGKILL included), so a crash never leaves a stale
lock and ``--resume`` works at once. The holder writes its pid into the file so that a refused
run can say which process to wait for.

On a platform without ``fcntl`` there is no lock (and no crash): runs behave as before.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fedlora.errors import FedLoraError

try:
    import fcntl
except ImportError:  # Windows: no flock; a run goes unguarded rather than not at all
    fcntl = None  # type: ignore[assignment]

#: The lock file's name inside the run directory (hidden: it is no result of the run).
LOCK_NAME = ".lock"

# A lock file can be removed by the run that held it as it lets go (:meth:`RunLock.release`),
# between another's open() and flock(); that one then tries again with the new file.
_ATTEMPTS = 20


class RunLock:
    """The exclusive lock of one run directory, held by this process until :meth:`release`.

    Take it with :meth:`acquire`; use it as a context manager to release it on any exit.
    """

    def __init__(self, run_dir: Path, fd: int | None, created: list[Path]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd = fd
        #: Folders :meth:`acquire` made to hold the lock (innermost first): removed again on
        #: release when the run left nothing in them, so an early error leaves no trace.
        self.created = created

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Lock ``run_dir``, creating it (and missing parents) if needed, without waiting.

        Raises
        ------
        FedLoraError
            Another process holds it: one line naming its pid. Nothing in the folder is changed
            then (the lock file is the holder's, only opened here).
        """
        run_dir = Path(run_dir)
        created: list[Path] = []
        if fcntl is None:
            return cls(run_dir, None, _make_dirs(run_dir))
        try:
            for _ in range(_ATTEMPTS):
                created += _make_dirs(run_dir)
                fd = _try_lock(run_dir / LOCK_NAME)
                if fd is not None:
                    # Only the holder writes the file, so a refused run reads the holder's pid.
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                    return cls(run_dir, fd, created)
            raise FedLoraError(f"run directory {run_dir}: its lock file {LOCK_NAME} keeps being replaced; try again")
        except BaseException:
            _remove_empty(created)
            raise

    def release(self) -> None:
        """Let go of the lock (idempotent), removing the lock file and the folders
        :meth:`acquire` created that are still empty."""
        if self._fd is not None and _same_file(self._fd, self.path):
            # Removed while still held: a run that opened it meanwhile finds it gone and retries.
            try:
                self.path.unlink()
            except OSError:
                pass
        _remove_empty(self.created)
        self.created = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive lock; None when the file was replaced or its
    folder removed meanwhile (try again); FedLoraError naming the holder when another has it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:  # the holder removed its empty folder as it ended
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise FedLoraError(
            f"run directory {path.parent} is in use by {who} (another fedlora run writes there); "
            "wait for it to end, or pick another folder with --out DIR"
        ) from None
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
            os.close(fd)
            raise
        # A filesystem without locks (some network mounts): run unguarded, as before locks.
        return fd
    if _same_file(fd, path):
        return fd
    os.close(fd)  # a lock on a file already unlinked guards nothing
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> int | None:
    """The pid the lock's holder wrote (None in the instant before it has)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the ones made here, innermost first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove each of ``folders`` (innermost first) that is empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:  # already removed (a failed run's folder, discarded)
            continue
        except OSError:
            break
