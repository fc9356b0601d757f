"""Spawn N gloo ranks on loopback for a test: ``run_ranks(fn, world_size, *args)``.

``fn(rank, world_size, *args)`` runs in a fresh process (``spawn`` context, so ``fn``
must be a module-level function) after ``dist.init_process_group("gloo")`` on
127.0.0.1 with a free port; its return values come back as a list indexed by rank.
If any rank raises, ``run_ranks`` raises RuntimeError carrying that rank's traceback;
if the ranks do not all finish within ``timeout`` seconds they are killed and
TimeoutError is raised. ``pg_timeout`` is the process group's own timeout, so that a
collective waiting on a dead peer errors instead of hanging.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback

import torch

from commtrain.compress import build_codec


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, pg_timeout, threads, results, args):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout)
        )
        out = fn(rank, world_size, *args)
        # plain pickle (not torch's shared-memory reducer): the result must outlive this process
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, world_size: int, *args, timeout: float = 120, pg_timeout: float = 30, threads: int = 1) -> list:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, pg_timeout, threads, results, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in outs and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]}) without a result")
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outs))
                    raise TimeoutError(f"rank(s) {missing} did not finish within {timeout:g} s")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            outs[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [outs[r] for r in range(world_size)]


class NonSummable:
    """A wire codec (the comm protocol) forcing the reduce-scatter/all-gather path: it hides
    the wrapped codec's summable payload."""

    lossless = False

    def __init__(self, spec):
        self.codec = build_codec(spec)
        self.spec = f"nonsummable({self.codec.spec})"

    def summable_dtype(self, dtype):
        return None

    def compress(self, x, *, key=None):
        return self.codec.compress(x)

    def decompress(self, pkt):
        return self.codec.decompress(pkt)

    def payload_nbytes(self, numel, dtype=torch.float32):
        return self.codec.payload_nbytes(numel, dtype)
