"""fedlora.files: atomic writes whose temporary file is owner-only from its first byte."""

from __future__ import annotations

import os
import stat

import pytest

from fedlora import files
from fedlora.deploy.certs import create_certs
from fedlora.files import atomic_write_bytes, atomic_write_text, current_umask

pytestmark = pytest.mark.unit


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.fixture
def spy(monkeypatch):
    """Record the temporary file's mode and size at its first write, at fsync and at the rename."""
    seen: dict[str, tuple[int, int]] = {}
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def write(fd, data):
        if "write" not in seen:
            st = os.fstat(fd)
            seen["write"] = (stat.S_IMODE(st.st_mode), st.st_size)
        return real_write(fd, data)

    def fsync(fd):
        st = os.fstat(fd)
        seen["fsync"] = (stat.S_IMODE(st.st_mode), st.st_size)
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        st = os.stat(src)
        seen["replace"] = (stat.S_IMODE(st.st_mode), st.st_size)
        seen["tmp_dir"] = (os.path.dirname(os.path.abspath(src)), 0)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(files.os, "write", write)
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    return seen


def test_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_private_file_is_0600_from_its_first_byte(tmp_path, umask, spy):
    target = tmp_path / "deep" / "er" / "secret.key"
    atomic_write_bytes(target, b"secret material", private=True)
    assert spy["write"] == (0o600, 0)  # created 0600, still empty when the first byte goes in
    assert spy["fsync"][0] == 0o600
    assert spy["replace"] == (0o600, len(b"secret material"))
    assert spy["tmp_dir"][0] == str(target.parent)  # same folder: the rename is atomic
    assert target.read_bytes() == b"secret material"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["secret.key"]


def test_public_file_gets_the_umask_mode_only_when_complete(tmp_path, umask, spy):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "{}\n")
    assert spy["write"] == (0o600, 0)
    assert spy["fsync"][0] == 0o600  # content complete, still owner-only
    assert spy["replace"] == (0o666 & ~umask, 3)
    assert target.read_text() == "{}\n"
    assert _mode(target) == 0o666 & ~umask


def test_private_stays_0600_under_a_strict_umask(tmp_path):
    old = os.umask(0o277)
    try:
        target = atomic_write_bytes(tmp_path / "k", b"x", private=True)
    finally:
        os.umask(old)
    assert _mode(target) == 0o600


def test_replacing_a_world_readable_file_with_a_private_one(tmp_path):
    target = tmp_path / "server.key"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    atomic_write_bytes(target, b"new", private=True)
    assert target.read_bytes() == b"new" and _mode(target) == 0o600


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_no_target_and_no_temporary_file(tmp_path, monkeypatch, exc):
    real_write = os.write

    def failing_write(fd, data):
        real_write(fd, bytes(data[:2]))
        raise exc

    monkeypatch.setattr(files.os, "write", failing_write)
    with pytest.raises(type(exc)):
        atomic_write_bytes(tmp_path / "out.bin", b"0123456789")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "latest.json"
    target.write_text('{"round": 1}')

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(target, '{"round": 2}')
    assert target.read_text() == '{"round": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"]


def test_large_and_memoryview_data(tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    atomic_write_bytes(tmp_path / "big", memoryview(data))
    assert (tmp_path / "big").read_bytes() == data


def test_create_certs_keys_are_0600_from_the_first_byte(tmp_path, monkeypatch):
    """Every key fedlora certs writes goes through the helper as private; certificates do not."""
    old = os.umask(0o022)
    calls: list[tuple[str, bool]] = []
    real = files.atomic_write_bytes

    def recording(path, data, *, private=False):
        calls.append((os.path.basename(path), private))
        return real(path, data, private=private)

    import fedlora.deploy.certs as certs

    monkeypatch.setattr(certs, "atomic_write_bytes", recording)
    first_write_modes: list[int] = []
    real_write = os.write

    def write(fd, data):
        st = os.fstat(fd)
        if st.st_size == 0:
            first_write_modes.append(stat.S_IMODE(st.st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(files.os, "write", write)
    try:
        out = create_certs(tmp_path, "localhost", node_names=["a", "b"])
    finally:
        os.umask(old)
    private = {name for name, is_private in calls if is_private}
    assert private == {"ca.key", "server.key", "a.key", "b.key"}
    assert {name for name, is_private in calls if not is_private} == {"ca.crt", "server.crt", "a.pub", "b.pub"}
    assert first_write_modes and set(first_write_modes) == {0o600}
    for key in [out.ca_key, out.server_key, *out.node_keys]:
        assert _mode(key) == 0o600
    for public in [out.ca_cert, out.server_cert, *out.node_public_keys]:
        assert _mode(public) == 0o644
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []
