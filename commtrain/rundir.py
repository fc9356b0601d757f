"""Run identity: which run an ``out_dir`` holds, and whether this run may resume it.

A run directory records its run in ``config.yaml`` (the resolved config, written by rank 0
once the trainer is set up; :func:`commtrain.export.write_run_config`). The run's
*identity* is that config minus the keys that may change between a run and its resumption
(:data:`MAY_CHANGE_ON_RESUME`: how long to train, how often to evaluate and checkpoint,
the link simulation, time-outs, ...). Everything else -- model, data, tokenizer, parallel
layout, codecs, optimizer and schedule settings, seed, batch size -- must match, or the
checkpoints of one run would be continued with the settings of another. Its
:func:`fingerprint` (SHA-256 of the identity, 16 hex digits) is written into every
checkpoint manifest.

``resume`` (:data:`commtrain.config.RESUME_MODES`) decides what happens to a non-empty
``out_dir`` (:func:`plan`):

=========  =====================  =============================  ============================
mode       empty / missing dir    same identity                  other identity / no record
=========  =====================  =============================  ============================
auto       start fresh            resume (fresh if no ckpt)      refuse, naming the keys
never      start fresh            refuse (``--overwrite``: move the old run aside, fresh)
must       refuse                 resume (refuse if no ckpt)     refuse, naming the keys
=========  =====================  =============================  ============================

``--overwrite`` never deletes: the old directory is renamed ``<out_dir>.old-<time>``.
``error.log`` / ``error_rank<r>.log`` alone do not make a directory non-empty (a run that
failed at set-up leaves nothing else behind).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .runtime import RunError

RUN_RECORD = "config.yaml"  # commtrain.export.RUN_CONFIG: the resolved config of the run
ERROR_LOGS = ("error.log", "error_rank*.log")

# Keys (dotted; "section.*" for a whole section) that may differ between a run and its
# resumption. train.steps may grow or shrink (not below the checkpoint's step); the lr
# schedule then follows :class:`commtrain.lr_schedule.WarmupCosine`'s rule.
MAY_CHANGE_ON_RESUME = (
    "out_dir", "resume", "backend", "timeout_s",
    "train.steps", "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
    "train.progress", "train.nonfinite", "train.max_nonfinite_steps",
    "data.cache_dir",  # where the BPE tokenizer is cached (its identity is data.tokenizer + data.*)
    "parallel.overlap", "zero.buckets_in_flight",  # when reductions run, not what they compute
    "link.*",  # the simulated link: timing only
)
# Paths are compared absolute (config.yaml stores them so); a relative path is the cwd's.
_PATH_KEYS = ("model.hf_path", "model.init_from", "data.path")


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in MAY_CHANGE_ON_RESUME)


def _abs(value):
    if value is None:
        return None
    if isinstance(value, list):
        return [_abs(v) for v in value]
    return os.path.abspath(os.path.expanduser(str(value)))


def identity(raw: dict[str, Any]) -> dict[str, Any]:
    """The keys of a resolved config (as a nested dict) that must not change on resume."""
    flat = {k: v for k, v in _flatten(raw).items() if not _may_change(k)}
    for k in _PATH_KEYS:
        if k in flat:
            flat[k] = _abs(flat[k])
    return flat


def fingerprint(raw: dict[str, Any]) -> str:
    """16 hex digits of the SHA-256 of :func:`identity` (canonical JSON)."""
    blob = json.dumps(identity(raw), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def differences(recorded: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key: recorded -> new"`` for every identity key that differs. A key the record lacks
    (written by an older commtrain) counts as its default value."""
    from .config import Config

    defaults = identity(Config().to_dict())
    # The new config as config.yaml would store it (YAML types: lists, not tuples).
    a, b = identity(recorded), identity(yaml.safe_load(yaml.safe_dump(new)))
    out = []
    for key in sorted(set(a) | set(b)):
        old = a.get(key, defaults.get(key))
        if old != b.get(key, defaults.get(key)):
            out.append(f"{key}: {old!r} -> {b.get(key)!r}")
    return out


def read_record(out_dir: Path) -> dict[str, Any] | None:
    """The recorded resolved config of ``out_dir`` as a nested dict, or None."""
    path = out_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"out_dir={str(out_dir)!r}: its run record {path} is unreadable ({e}); restore it, or start "
                       f"a new run with resume=never --overwrite (moves this one aside)") from None
    return raw if isinstance(raw, dict) else None


def run_files(out_dir: Path) -> list[str]:
    """Entries of ``out_dir`` that belong to a run (everything but error logs), sorted."""
    if not out_dir.is_dir():
        return []
    logs = {p.name for pat in ERROR_LOGS for p in out_dir.glob(pat)}
    return sorted(p.name for p in out_dir.iterdir() if p.name not in logs)


@dataclasses.dataclass
class Plan:
    """What to do with ``out_dir``: ``resume`` (try the checkpoints) or start fresh;
    ``recorded_steps``: the recorded run's train.steps (for the lr schedule of old
    checkpoints); ``moved_to``: where ``--overwrite`` put the previous run."""

    resume: bool
    recorded_steps: int | None = None
    moved_to: str | None = None
    changed: list[str] = dataclasses.field(default_factory=list)  # allowed keys that differ (for the log)
    # The recorded run's own fingerprint: its checkpoints carry it even where this commtrain's
    # fingerprint differs only by config keys added since (at their defaults).
    recorded_fingerprint: str | None = None


def plan(out_dir: str | os.PathLike, resolved: dict[str, Any], mode: str, overwrite: bool = False) -> Plan:
    """Decide (on one rank) what to do with ``out_dir`` for a run with the resolved config
    ``resolved`` (nested dict); raises :class:`RunError` with one line when it must refuse.
    With ``overwrite`` a non-empty ``out_dir`` is renamed aside here."""
    out = Path(out_dir)
    if overwrite and mode == "must":
        raise RunError("--overwrite with resume=must is contradictory; allowed: --overwrite with resume=never "
                       "(or auto), or resume=must without --overwrite")
    files = run_files(out)
    if not files:
        if mode == "must":
            raise RunError(f"resume=must: out_dir={str(out)!r} holds no run to resume; allowed: an out_dir with "
                           f"checkpoints of this run, or resume=auto to start one")
        return Plan(resume=False)
    if overwrite:
        return Plan(resume=False, moved_to=str(move_aside(out)))
    shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
    if mode == "never":
        raise RunError(f"resume=never: out_dir={str(out)!r} already holds a run ({shown}); pass --overwrite to move "
                       f"it aside (renamed, not deleted), or choose another out_dir")
    record = read_record(out)
    if record is None:
        raise RunError(f"out_dir={str(out)!r} is not empty ({shown}) but has no run record ({RUN_RECORD}), so it "
                       f"cannot be resumed safely; choose another out_dir, or resume=never --overwrite to move it aside")
    diffs = differences(record, resolved)
    if diffs:
        raise RunError(f"out_dir={str(out)!r} holds a different run; these settings differ: {'; '.join(diffs)}. "
                       f"Allowed on resume: {', '.join(MAY_CHANGE_ON_RESUME)}. Use the run's settings, another "
                       f"out_dir, or resume=never --overwrite to move the old run aside")
    changed = [k for k in sorted(set(_flatten(record)) & set(_flatten(resolved)))
               if _may_change(k) and k not in ("out_dir", "resume") and _flatten(record)[k] != _flatten(resolved)[k]]
    steps = (record.get("train") or {}).get("steps")
    return Plan(resume=True, recorded_steps=steps if isinstance(steps, int) else None, changed=changed,
                recorded_fingerprint=fingerprint(record))


def move_aside(out: Path) -> Path:
    """Rename ``out`` to ``<out>.old-<YYYYmmdd-HHMMSS>[-n]`` (never deletes)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
        n += 1
    os.rename(out, target)
    return target
