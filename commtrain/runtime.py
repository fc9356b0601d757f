"""What surrounds a training run in one process: the process group (from torchrun's
environment, with a restart-scoped rendezvous store), RNG state, and fault injection for
the recovery tests. The Trainer (:mod:`commtrain.train`) runs inside :func:`distributed`.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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




class RNGState:
    """The process's RNG states as a stateful part of the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)
