"""The run directory: resolved config, metrics.jsonl, atomic checkpoints, progress lines.

Layout of ``runs/<name>/``::

    .lock                held by the run writing the folder, while it runs (fedlora.run.lock)
    config.toml          the resolved configuration (re-runnable as a preset)
    metrics.jsonl        one JSON object per round
    checkpoints/         round_0001.safetensors + round_0001.json (strategy state, sha256 of the round's
                         files), round_0001.nodes.pb (simulation: the Context.state of the nodes served that round),
                         round_0001.server.safetensors (the strategy's tensor state: server optimizer
                         moments), latest.json
    adapter/             the final adapter in PEFT's save_pretrained layout
    events.out.tfevents.*  TensorBoard scalars per round (aggregated and per client)
    report.md, *.png     the run's report (fedlora.run.report), written at the end
    summary.json         final metrics, written at the end
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors.torch import save

from fedlora.config import RunConfig
from fedlora.config.model import resumable_keys
from fedlora.errors import FedLoraError, RunFailed
from fedlora.files import atomic_write_bytes
from fedlora.run.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    _finite_tensors,
    _pointer_round,
    _sidecar_digest,
    _Unusable,
)
from fedlora.run.lock import LOCK_NAME, RunLock


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by None, through dicts,
    lists and tuples: metrics.jsonl, summary.json and nodes.json stay strict JSON (a diverged
    loss is written ``null``, never a bare ``NaN`` other parsers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


class RunDirectory:
    """One run's output folder.

    Parameters
    ----------
    path : str or Path
        The folder (``runs/<name>`` by default).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        #: The folder's lock while this object's run holds it (:meth:`open` to :meth:`close`);
        #: a RunDirectory made directly (readers, the deployed ServerApp whose launcher holds
        #: the lock) has none.
        self.lock: RunLock | None = None

    @classmethod
    def open(cls, path: str | Path, *, resume: bool) -> RunDirectory:
        """Take the folder's lock (one writer per run directory: :mod:`fedlora.run.lock`), then
        check the folder may be used; the run holds it until :meth:`close` (``with`` closes it).

        The folder is created only to hold the lock; an error here, or any before the run
        writes its first file, leaves no trace (:meth:`close` removes what the lock created).

        Raises
        ------
        FedLoraError
            One line: another process holds the folder (naming its pid), there is nothing to
            resume, or a new run's folder is not empty.
        """
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise FedLoraError(f"--out: {run.path} exists and is not a directory")
        # Locked before it is looked at: a live run's folder is refused as in use, not as "exists".
        run.lock = RunLock.acquire(run.path)
        try:
            run._check_usable(resume)
        except BaseException:
            run.close()
            raise
        return run

    def _check_usable(self, resume: bool) -> None:
        if resume:
            # A run stopped before its first checkpoint still has its config.toml: it starts over.
            if self.latest_checkpoint_round() is None and not (self.path / "config.toml").is_file():
                raise FedLoraError(f"--resume: no checkpoint under {self.path / 'checkpoints'}")
        elif any(p.name != LOCK_NAME for p in self.path.iterdir()):
            raise FedLoraError(
                f"run directory {self.path} already exists; pick another with --out DIR or continue it with --resume"
            )

    def close(self) -> None:
        """Release the folder's lock (idempotent); a folder the lock created that the run left
        empty is removed with it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def discard_unfinished(self) -> bool:
        """Remove the run directory when no round of it was checkpointed (a run that failed
        before its first round leaves no trace); True when it was removed.

        Only the run holding the folder's lock (:meth:`open`) removes anything: a folder another
        process holds, or one this object never locked, is left as it is.
        """
        if self.lock is None or not self.path.is_dir() or self.latest_checkpoint_round() is not None:
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    # -- files ---------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def write_config(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path / "config.toml", tomli_w.dumps(cfg.to_dict()).encode())

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(finite_json(record), sort_keys=True, allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written before a crash, not checkpointed)."""
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())

    def write_json(self, name: str, obj: Any) -> None:
        text = json.dumps(finite_json(obj), indent=2, sort_keys=True, allow_nan=False)
        atomic_write_bytes(self.path / name, (text + "\n").encode())

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(
        self,
        server_round: int,
        state: dict[str, torch.Tensor],
        extra: dict[str, Any],
        nodes: bytes | None = None,
        server: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write round ``server_round``'s global state (and the nodes' own state, simulation
        only, and the strategy's tensor state when it has any), then its sidecar with their
        checksums, then move the ``latest`` pointer.

        The sidecar is written last: a round whose sidecar is missing or names other bytes was
        not completed and :meth:`load_checkpoint` passes over it.
        """
        stem = f"round_{server_round:04d}"
        files = {f"{stem}.safetensors": save({k: v.contiguous() for k, v in state.items()})}
        if nodes is not None:
            files[f"{stem}.nodes.pb"] = nodes
        if server:
            files[f"{stem}.server.safetensors"] = save({k: v.contiguous() for k, v in server.items()})
        for name, data in files.items():
            atomic_write_bytes(self.checkpoint_dir / name, data)
        sidecar = {
            "format": CHECKPOINT_FORMAT,
            "round": server_round,
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
            "extra": extra,
        }
        sidecar["digest"] = _sidecar_digest(sidecar)
        atomic_write_bytes(self.checkpoint_dir / f"{stem}.json", json.dumps(sidecar, sort_keys=True).encode())
        atomic_write_bytes(self.checkpoint_dir / "latest.json", json.dumps({"round": server_round}).encode())

    def node_state_path(self, server_round: int) -> Path:
        """Round ``server_round``'s node-state file (simulation: the nodes served that round)."""
        return self.checkpoint_dir / f"round_{server_round:04d}.nodes.pb"

    def node_state_chain(self, server_round: int) -> list[Path]:
        """The node-state files of rounds 1..``server_round``, oldest first, each checked against its
        round's sidecar: each holds only the nodes served in its round, so a resume needs them all.

        Raises
        ------
        RunFailed
            One line naming the first file that is missing or fails its checksum.
        """
        chain = []
        for r in range(1, server_round + 1):
            path = self.node_state_path(r)
            if not path.is_file():
                continue  # a round of a run without node state (or before this format)
            try:
                sums = json.loads((self.checkpoint_dir / f"round_{r:04d}.json").read_bytes()).get("sha256", {})
            except (OSError, ValueError, AttributeError):
                raise RunFailed(
                    f"--resume: the sidecar of round {r} is unreadable; the nodes' state cannot be restored"
                ) from None
            want = sums.get(path.name)
            if want is not None and _file_sha256(path) != want:
                raise RunFailed(
                    f"--resume: {path.name} does not match its checksum; the nodes' state cannot be restored"
                )
            chain.append(path)
        return chain

    def checkpoint_rounds(self) -> list[int]:
        """Rounds with any checkpoint file on disk, newest first (good or not: see :meth:`load_checkpoint`)."""
        rounds = set()
        if self.checkpoint_dir.is_dir():
            for p in self.checkpoint_dir.glob("round_*"):
                m = re.fullmatch(r"round_(\d+)\.(safetensors|json|nodes\.pb|server\.safetensors)", p.name)
                if m:
                    rounds.add(int(m.group(1)))
        pointer = _pointer_round(self.checkpoint_dir / "latest.json")
        if pointer is not None:
            rounds.add(pointer)
        return sorted(rounds, reverse=True)

    def latest_checkpoint_round(self) -> int | None:
        """The newest round with a checkpoint file on disk (not yet verified), or None."""
        rounds = self.checkpoint_rounds()
        return rounds[0] if rounds else None

    def load_checkpoint(self, report: Callable[[str], None] | None = None) -> tuple[int, dict[str, torch.Tensor], dict]:
        """(round, global state, sidecar extra) of the newest good checkpoint (see :meth:`load_round`)."""
        ckpt = self.load_round(report)
        return ckpt.round, ckpt.state, ckpt.extra

    def load_round(self, report: Callable[[str], None] | None = None) -> Checkpoint:
        """The newest checkpoint whose files match their checksums, walking back from the newest
        round on disk; each unusable round is reported in one line and moved to
        ``checkpoints/unusable/`` once an older one loads (a missing ``latest.json`` is no
        obstacle: the rounds on disk are scanned).

        Raises
        ------
        FedLoraError
            One line when no round is usable.
        """
        report = report or (lambda line: None)
        rounds = self.checkpoint_rounds()
        if not rounds:
            raise FedLoraError(f"--resume: no checkpoint under {self.checkpoint_dir}")
        if _pointer_round(self.checkpoint_dir / "latest.json") is None:
            report("checkpoints: latest.json is missing or unreadable; using the newest good round on disk")
        bad: list[str] = []
        for server_round in rounds:
            try:
                ckpt = self._read_round(server_round)
            except _Unusable as why:
                bad.append(f"round {server_round}: {why}")
                report(f"checkpoint of round {server_round} is unusable ({why}); trying an older one")
                continue
            if bad:
                self._set_aside([r for r in rounds if r > server_round])
                report(f"checkpoints: resuming from round {server_round}, the newest good one")
            return ckpt
        raise FedLoraError(f"--resume: no usable checkpoint under {self.checkpoint_dir} ({'; '.join(bad)})")

    def _read_round(self, server_round: int) -> Checkpoint:
        """One round's checkpoint, verified; raises :class:`_Unusable` naming what is wrong."""
        stem = f"round_{server_round:04d}"
        side_path = self.checkpoint_dir / f"{stem}.json"
        try:
            sidecar = json.loads(side_path.read_bytes())
        except FileNotFoundError:
            raise _Unusable(f"{side_path.name} is missing") from None
        except (OSError, ValueError) as err:
            raise _Unusable(f"{side_path.name} is not valid JSON: {err}") from None
        if not isinstance(sidecar, dict):
            raise _Unusable(f"{side_path.name} is not a checkpoint sidecar")
        if "format" in sidecar:
            if sidecar.get("digest") != _sidecar_digest(sidecar):
                raise _Unusable(f"{side_path.name} fails its checksum")
            if sidecar.get("round") != server_round:
                raise _Unusable(f"{side_path.name} belongs to round {sidecar.get('round')}")
            sums, extra = dict(sidecar.get("sha256") or {}), dict(sidecar.get("extra") or {})
        else:  # written before checksums: trusted as far as it loads
            sums, extra = {}, sidecar
        blobs: dict[str, bytes] = {}
        for name in {f"{stem}.safetensors", *sums}:
            try:
                blobs[name] = (self.checkpoint_dir / name).read_bytes()
            except FileNotFoundError:
                raise _Unusable(f"{name} is missing") from None
            if name in sums and hashlib.sha256(blobs[name]).hexdigest() != sums[name]:
                size = len(blobs[name])
                raise _Unusable(f"{name} does not match its checksum ({'empty' if not size else f'{size:,} bytes'})")
        state = _finite_tensors(blobs, f"{stem}.safetensors")
        server = _finite_tensors(blobs, f"{stem}.server.safetensors") if f"{stem}.server.safetensors" in blobs else None
        return Checkpoint(server_round, state, extra, blobs.get(f"{stem}.nodes.pb"), server)

    def _set_aside(self, rounds: list[int]) -> None:
        """Move the files of unusable newer rounds out of the way (kept for inspection), so a
        resumed run neither reads them again nor mixes them with its own rounds."""
        aside = self.checkpoint_dir / "unusable"
        for server_round in rounds:
            for p in self.checkpoint_dir.glob(f"round_{server_round:04d}.*"):
                aside.mkdir(exist_ok=True)
                os.replace(p, aside / p.name)

    def check_resume_config(self, cfg: RunConfig) -> None:
        """Refuse to resume with a configuration whose meaning differs from the run's ``config.toml``.

        Only the keys in :data:`RESUME_MUTABLE` (how long and where the run goes on, not what it
        computes) may differ; the first other difference is named in one line.

        Raises
        ------
        FedLoraError
            ``config.toml`` is missing or unreadable, or a key outside :data:`RESUME_MUTABLE` differs.
        """
        path = self.path / "config.toml"
        try:
            saved = RunConfig.from_dict(tomllib.loads(path.read_text(encoding="utf-8"))).to_dict()
        except FileNotFoundError:
            raise FedLoraError(f"--resume: {path} is missing; cannot tell which run this is") from None
        except (OSError, ValueError) as err:  # TOMLDecodeError and ConfigError are ValueErrors
            raise FedLoraError(f"--resume: {path} is unreadable: {err}") from None
        key = config_difference(saved, cfg.to_dict())
        if key is not None:
            old, new = _flat(saved).get(key), _flat(cfg.to_dict()).get(key)
            raise FedLoraError(
                f"--resume: {key} = {new!r} differs from the run's config.toml ({old!r}); a resumed run keeps its "
                f"meaning (only {', '.join(RESUME_MUTABLE)} may change): start a new run with --out DIR"
            )


#: Config keys a resumed run may change: how long, how patiently and where it goes on, never what
#: it computes (strategy, lora, model, data, federation.clients, seed, privacy, robustness are fixed).
#: Read from the schema: the fields marked :data:`fedlora.config.model.RESUMABLE`.
RESUME_MUTABLE = resumable_keys(RunConfig)


def _file_sha256(path: Path) -> str:
    """A file's sha256, read in blocks (node-state files may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists, such as data.tasks, stay whole values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_difference(saved: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first flattened key outside :data:`RESUME_MUTABLE` whose value differs, or None."""
    a, b = _flat(saved), _flat(new)
    for key in sorted(set(a) | set(b)):
        if key not in RESUME_MUTABLE and a.get(key) != b.get(key):
            return key
    return None
