"""Atomic, checksummed, sharded checkpoints.

Layout: ``<root>/step_00000100/{rank0.pt, rank1.pt, ..., manifest.json}``. Every rank
writes its own shard (model/stage weights, its optimizer shard, error-feedback
residuals, AC-SGD buffers, sampler position, RNG states) into a hidden temporary
directory; rank 0 then writes the manifest with each shard's SHA-256 and size and
renames the directory into place. A checkpoint directory therefore either exists
complete or not at all.

A checkpoint holding a non-finite value (NaN/inf in any floating tensor of any rank's
state) is never written: the ranks agree before anything touches the disk, and
:class:`NonFiniteStateError` names the first bad tensors. Rotation (``keep``) runs only
after the new checkpoint is complete, so it never removes the last good one.

Loading walks checkpoints newest first. Each rank verifies its shard (size, checksum,
``torch.load(weights_only=True)`` -- never arbitrary pickle); the ranks agree with one
all-reduce, and a corrupt or truncated checkpoint is reported and skipped in favour of
the previous good one. When checkpoints exist but *none* can be verified,
:meth:`Checkpointer.load_latest` raises (naming every file that failed) rather than let a
run start from scratch over them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .runtime import RunError

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RunError):
    """A checkpoint problem every rank raises alike; the message says what to do."""


class NonFiniteStateError(CheckpointError):
    """The state to save holds NaN/inf; nothing was written."""


def nonfinite_tensors(state: Any, prefix: str = "", limit: int = 3) -> list[str]:
    """Dotted names of (up to ``limit``) floating tensors in ``state`` holding NaN or inf."""
    bad: list[str] = []

    def walk(obj, name):
        if len(bad) >= limit:
            return
        if torch.is_tensor(obj):
            if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
                bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}.{i}" if name else str(i))

    walk(state, prefix)
    return bad


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Collective save/load: every rank of ``group`` must call :meth:`save` and :meth:`load_latest`."""

    def __init__(self, root: str | os.PathLike, keep: int = 3, group=None, fingerprint: str | None = None,
                 also_accept: tuple[str, ...] = ()):
        self.root = Path(root)
        self.keep = keep
        self.group = group
        self.fingerprint = fingerprint  # the run's identity (commtrain.rundir), kept in each manifest
        # Fingerprints of the same run as an older commtrain wrote it (a config key added since
        # changes the hash, not the run): rundir.plan() has already matched the run's record.
        self.accepted = {fingerprint, *also_accept}
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1

    # -- save ---------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (this rank's) as checkpoint ``step``; collective. Raises
        :class:`NonFiniteStateError` on every rank, writing nothing, if any rank's state
        holds NaN/inf."""
        bad = self._gather(nonfinite_tensors(state))
        if any(bad):
            where = "; ".join(f"rank {r}: {', '.join(names)}" for r, names in enumerate(bad) if names)
            raise NonFiniteStateError(
                f"checkpoint step {step} not written: the state holds non-finite values ({where}); the last good "
                f"checkpoint is {self._newest_name()}"
            )
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        shard = tmp / f"rank{self.rank}.pt"
        part = shard.with_suffix(".pt.part")
        torch.save(state, part)
        with open(part, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(part, shard)
        entry = {"file": shard.name, "sha256": sha256_file(shard), "bytes": shard.stat().st_size}
        entries = self._gather(entry)
        if self.rank == 0:
            manifest = {"step": step, "world_size": self.world_size, "shards": entries}
            if self.fingerprint is not None:
                manifest["fingerprint"] = self.fingerprint
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            _fsync_dir(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        # Called with the new checkpoint complete in place: the newest ``keep`` stay.
        for old in self.list()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)

    def _newest_name(self) -> str:
        found = self.list()
        return str(found[0]) if found else "none (nothing saved yet)"

    # -- load ---------------------------------------------------------------------------
    def list(self) -> list[Path]:
        """Complete checkpoint directories, newest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(dirs, key=lambda p: p.name, reverse=True)

    def verify(self, path: Path) -> tuple[dict | None, str | None]:
        """Load and verify this rank's shard of ``path``: (state, None) or (None, problem)."""
        mf = path / "manifest.json"
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            return None, f"manifest {mf} unreadable ({e})"
        theirs = manifest.get("fingerprint")
        if self.fingerprint is not None and theirs is not None and theirs not in self.accepted:
            raise CheckpointError(
                f"checkpoint {path} belongs to another run (fingerprint {theirs}, this run {self.fingerprint}); "
                f"point out_dir elsewhere, or start fresh with resume=never --overwrite (moves the old run aside)"
            )
        if manifest.get("world_size") != self.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {manifest.get('world_size')} ranks but this run has "
                f"{self.world_size}; start with the same world size, or point out_dir elsewhere"
            )
        entry = next((e for e in manifest["shards"] if e["file"] == f"rank{self.rank}.pt"), None)
        shard = path / f"rank{self.rank}.pt"
        if entry is None or not shard.is_file():
            return None, f"shard {shard} missing"
        if shard.stat().st_size != entry["bytes"]:
            return None, f"shard {shard} is truncated ({shard.stat().st_size} of {entry['bytes']} bytes)"
        if sha256_file(shard) != entry["sha256"]:
            return None, f"shard {shard} fails its SHA-256 check (corrupt)"
        try:
            return torch.load(shard, map_location="cpu", weights_only=True), None
        except Exception as e:  # noqa: BLE001 -- any unpickling failure means unusable
            return None, f"shard {shard} cannot be loaded ({type(e).__name__}: {e})"

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """(step, this rank's state) of the newest checkpoint that every rank can load; None
        when there is no checkpoint at all. Raises :class:`CheckpointError` when there are
        checkpoints but none can be verified (naming what failed on every rank)."""
        candidates = self.list()
        # All ranks must walk the same list, even if their directory views differ slightly.
        steps = self._gather([int(_STEP_DIR.match(p.name).group(1)) for p in candidates])[0]
        failed: list[str] = []
        for step in steps:
            path = self.root / f"step_{step:08d}"
            state, problem = self.verify(path)
            if problem:
                log.warning("checkpoint rank %d: %s; trying an older checkpoint", self.rank, problem)
            problems = self._gather(problem)
            if not any(problems):
                return step, state
            failed += [p for p in problems if p]
            if problem is None:
                log.warning("checkpoint %s is unusable on another rank; trying an older checkpoint", path)
        if steps:
            raise CheckpointError(
                f"none of the {len(steps)} checkpoint(s) in {self.root} can be verified ({'; '.join(failed)}); "
                f"nothing was overwritten. Restore the damaged files (e.g. from a backup), or start a new run with "
                f"resume=never --overwrite (moves this one aside)"
            )
        return None

    # -- collectives (no-ops in a single process) ----------------------------------------
    def _barrier(self):
        if self.distributed:
            dist.barrier(group=self.group)

    def _gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

