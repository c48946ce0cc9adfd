"""Atomic file writes: the one helper every fedlora file goes through.

:func:`atomic_write_bytes` writes to a temporary file beside the target, flushes and fsyncs it,
then renames it onto the target with :func:`os.replace`, so a reader (or a crash) sees either
the old file or the complete new one, never a half-written one.

The temporary file is created with mode 0600 and ``O_EXCL`` (:func:`tempfile.mkstemp`), so its
content is never readable by anyone else, not even for the moment between creating and
renaming it. A ``private`` file (a private key) keeps 0600; any other file is given the mode a
plain ``open(path, "w")`` would have, ``0o666 & ~umask``, just before the rename.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

PRIVATE_MODE = 0o600

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux reports it in ``/proc/self/status``; elsewhere it is read by setting a restrictive
    umask and restoring the old one at once (restrictive, so a file another thread creates in
    that instant is never more open than intended).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def public_mode() -> int:
    """Mode of an ordinary new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, private: bool = False
) -> Path:
    """Replace ``path`` with ``data`` atomically; create its parent folders if missing.

    Parameters
    ----------
    path : path
        The file to write.
    data : bytes-like
        Its new content.
    private : bool
        Mode 0600 (owner only) for secrets such as private keys; otherwise ``0o666 & ~umask``.
        Either way the content is only ever in a file with mode 0600 until it is complete.

    Returns
    -------
    Path
        ``path``.

    On any failure (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp: O_CREAT | O_EXCL with mode 0600 (less the umask), in the target's folder so the
    # rename below stays on one file system.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            # 0600 exactly for a private file (a strict umask may have left it 0400); the
            # umask's mode for an ordinary one, now that its content is complete.
            _chmod(fd, tmp, PRIVATE_MODE if private else public_mode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", private: bool = False
) -> Path:
    """:func:`atomic_write_bytes` for text (``encoding`` defaults to UTF-8)."""
    return atomic_write_bytes(path, text.encode(encoding), private=private)


def _chmod(fd: int, name: str, mode: int) -> None:
    if os.chmod in os.supports_fd:
        os.fchmod(fd, mode)
    else:  # pragma: no cover - platforms without fchmod
        os.chmod(name, mode)
