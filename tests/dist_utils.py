"""Spawn N gloo ranks on loopback for a test: ``run_ranks(fn, world_size, *args)``.

``fn(rank, world_size, *args)`` runs in a fresh process (``forkserver`` context with torch
preloaded, so ``fn`` must be a module-level function) after ``dist.init_process_group("gloo")`` on
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


# Ranks start from a fork server that has imported torch (and torch._dynamo, which every
# optimizer's constructor imports) once: a fresh process, as with ``spawn``, without paying
# ~3 s of imports per rank per test. Nothing in it has touched torch.distributed or threads.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "commtrain.comm", "commtrain.compress",
            "commtrain.parallel", "commtrain.train"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_ranks(fn, world_size: int, *args, timeout: float = 120, pg_timeout: float = 30, threads: int = 1) -> list:
    ctx = _context()
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


def _cli_entry(rank, nproc, port, argv, env, out_path, err_path):
    """One rank of ``commtrain <argv>`` as torchrun would start it (its environment protocol;
    rank 0 hosts the store, as without torchrun's agent), stdout/stderr to files."""
    import sys

    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                      TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)  # torch was imported before OMP_NUM_THREADS was set (the fork server)
    code = 1
    try:
        from commtrain.cli import main

        code = main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))


def launch(nproc: int, argv: list[str], env: dict | None = None, timeout: float = 240):
    """``torchrun --nproc_per_node=N -m commtrain <argv>`` for tests, without torchrun's own
    process and the per-rank imports (ranks fork from the preloaded server): a
    ``subprocess.CompletedProcess`` whose stdout/stderr are the ranks' (rank order) and whose
    returncode is the first failing rank's. As torchrun does, once a rank fails the others are
    sent SIGTERM (then killed after 30 s); after ``timeout`` all are killed and TimeoutError raised."""
    import signal
    import subprocess
    import tempfile

    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ct_launch") as tmp:
        outs = [(os.path.join(tmp, f"out{r}"), os.path.join(tmp, f"err{r}")) for r in range(nproc)]
        procs = [ctx.Process(target=_cli_entry, args=(r, nproc, port, argv, dict(env or {}), *outs[r]))
                 for r in range(nproc)]
        for p in procs:
            p.start()
        deadline, failed, term_at = time.monotonic() + timeout, None, None
        try:
            while any(p.exitcode is None for p in procs):
                time.sleep(0.05)
                if failed is None:
                    failed = next((p.exitcode for p in procs if p.exitcode not in (None, 0)), None)
                    if failed is not None:
                        term_at = time.monotonic()
                        for p in procs:
                            if p.exitcode is None:
                                os.kill(p.pid, signal.SIGTERM)
                if term_at is not None and time.monotonic() > term_at + 30:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"commtrain {' '.join(argv[:1])}: ranks did not finish within {timeout:g} s")
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)
        codes = [p.exitcode for p in procs]
        code = failed if failed is not None else next((c for c in codes if c), 0)
        read = lambda path: open(path, errors="replace").read()  # noqa: E731
        return subprocess.CompletedProcess(["commtrain", *argv], code, "".join(read(o) for o, _ in outs),
                                           "".join(read(e) for _, e in outs))


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
