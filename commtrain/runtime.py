"""What surrounds a training run in one process: the process group (from torchrun's
environment, with a restart-scoped rendezvous store), RNG state, the run's errors
(:class:`RunError`, the claimed run directory for the error log), stop signals, and fault
injection for the recovery tests. The Trainer (:mod:`commtrain.train`) runs inside
:func:`distributed`.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


# -- errors that end a run ------------------------------------------------------------------
class RunError(RuntimeError):
    """An error that ends the run, raised on *every* rank together (after a collective
    agreement, or from a check every rank makes alike). Its message is one complete line --
    what is wrong, the key and value, what to do -- so only rank 0 prints it."""


_run_dir: Path | None = None


def claim_run_dir(path: str | os.PathLike | None) -> None:
    """Record the run directory this process now writes (None: none yet). Errors are logged
    there (``error.log``); before a run owns its directory, nothing is written into it."""
    global _run_dir
    _run_dir = None if path is None else Path(path)


def claimed_run_dir() -> Path | None:
    return _run_dir


# -- stop signals ----------------------------------------------------------------------------
class StopSignals:
    """SIGTERM/SIGINT ask the run to stop at the next step boundary (the trainer agrees on it
    across ranks, saves a checkpoint and returns). The same request often arrives twice at
    once (Ctrl-C reaches torchrun and its workers, and torchrun then forwards it): a repeat
    within ``REPEAT_S`` is ignored; a later one acts as usual (SIGINT: KeyboardInterrupt,
    SIGTERM: terminate). Installed only in the main thread; ``close`` restores the handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_S = 2.0

    def __init__(self):
        self.received: int | None = None
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import time

        now = time.monotonic()
        if self.received is None:
            self.received, self._at = signum, now
            log.warning("received %s: stopping after this step (checkpoint, then exit); send it again to abort",
                        signal.Signals(signum).name)
            return
        if now - self._at < self.REPEAT_S:
            return
        self.close()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)  # the default action, now restored

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# -- process group ------------------------------------------------------------------------
@contextlib.contextmanager
def distributed(cfg):
    """Initialise torch.distributed from torchrun's environment (or a 1-rank group), then tear down."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    tmp = None
    if created:
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, store=_restart_scoped_store(timeout), rank=int(os.environ["RANK"]),
                                    world_size=world_size, timeout=timeout)
        else:  # a plain `python -m commtrain train`: a group of one
            tmp = tempfile.mkdtemp(prefix="commtrain-pg-")
            dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=world_size, timeout=timeout)
    try:
        yield device
    finally:
        if created:
            dist.destroy_process_group()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _restart_scoped_store(timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys scoped to this torchrun restart attempt.

    After ``torchrun --max-restarts`` restarts a failed group, the store still holds the
    previous attempt's keys, and gloo would connect to the dead workers' addresses
    (pytorch/pytorch#135712). A prefix per attempt keeps the attempts apart.
    """
    rank = int(os.environ["RANK"])
    # Under torchrun the agent hosts the store; otherwise (Ray, hand-set env) rank 0 does.
    is_master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
        is_master=is_master, timeout=timeout, wait_for_workers=False,
    )
    return dist.PrefixStore(f"commtrain/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# -- RNG state (part of every checkpoint) ---------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def maybe_inject_fault(step: int, rank: int) -> None:
    """Fault injection for recovery tests: ``COMMTRAIN_FAULT_STEP=k`` kills rank
    ``COMMTRAIN_FAULT_RANK`` (default 0) right after step k, on torchrun's first attempt only."""
    at = os.environ.get("COMMTRAIN_FAULT_STEP")
    if at is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    if step == int(at) and rank == int(os.environ.get("COMMTRAIN_FAULT_RANK", "0")):
        log.error("COMMTRAIN_FAULT_STEP=%s: killing rank %d after step %d", at, rank, step)
        os._exit(17)


def nonfinite_steps() -> tuple[set[int] | None, int | None, int]:
    """Fault injection for the non-finite guard: ``COMMTRAIN_NONFINITE_STEPS`` = step numbers
    (1-based, as in the metrics) like ``5`` or ``3,7`` or ``5-`` (5 and every later one);
    ``COMMTRAIN_NONFINITE_RANK`` (default 0) is the rank whose gradients turn NaN
    (``COMMTRAIN_NONFINITE_VALUE=inf``: +inf, as an fp16 overflow gives). Returns
    (steps or None, first open-ended step or None, rank)."""
    spec = os.environ.get("COMMTRAIN_NONFINITE_STEPS")
    if not spec:
        return None, None, 0
    steps, start = set(), None
    for part in spec.split(","):
        part = part.strip()
        if part.endswith("-"):
            start = int(part[:-1])
        elif part:
            steps.add(int(part))
    return steps, start, int(os.environ.get("COMMTRAIN_NONFINITE_RANK", "0"))


def inject_nonfinite_grads(params, rank: int, current_step) -> list:
    """Register hooks that turn this rank's gradients NaN at the steps of
    :func:`nonfinite_steps` (``current_step()`` gives the 1-based step being computed).
    Registered before the gradient sync's own hooks, so the NaN is what gets reduced."""
    steps, start, at_rank = nonfinite_steps()
    if steps is None or rank != at_rank:
        return []
    value = float(os.environ.get("COMMTRAIN_NONFINITE_VALUE", "nan"))

    def poison(p):
        s = current_step()
        if s in steps or (start is not None and s >= start):
            p.grad.fill_(value)

    return [p.register_post_accumulate_grad_hook(poison) for p in params if p.requires_grad]


class RNGState:
    """The process's RNG states as a stateful part of the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)
