"""``commtrain ray``: run the trainer on a Ray cluster, one Ray actor per rank.

    commtrain ray --num-workers 2 --config tiny --set train.steps=4
    commtrain ray --address auto --num-workers 16 --gpus-per-worker 1 --config my_run.yaml

Why actors and not Ray Train's ``TorchTrainer``: the trainer already initialises
torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and owns its checkpoints and metrics. Actors that set exactly those variables and
call ``commtrain.cli.main(["train", ...])`` run the *same* code path as ``torchrun`` -- same
process group, same config validation, same ``metrics.jsonl`` -- whereas ``TorchTrainer``
would create its own process group, wrap the loop in a session and write results under its own
storage path (by default in the home directory).

Rendezvous, as torchrun does it: the launcher (here: rank 0's actor, before the trainer
starts) hosts the TCP store and every rank, rank 0 included, joins it as a client
(``TORCHELASTIC_USE_AGENT_STORE=True``). The store listens on a socket the launcher bound
itself, so it is reachable only on ``MASTER_ADDR``, not on every interface:

- ``--address local`` (the default; a private single-machine Ray): everything on loopback.
  Ray's node address is 127.0.0.1 (no dashboard), the store binds 127.0.0.1, and gloo/NCCL
  are pinned to the loopback interface (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``,
  unless already set).
- ``--address auto`` / ``ray://...`` (a cluster the user runs): the store binds rank 0's
  node IP (or ``--master-addr``).

``LOCAL_RANK`` is the actor's index among the actors on its node; with
``--gpus-per-worker 1`` Ray restricts ``CUDA_VISIBLE_DEVICES`` to the actor's GPU, so
``LOCAL_RANK`` is 0 (the only visible device). The config is validated here first (one line
on error, before Ray starts), read here and shipped as text to a temporary file on each worker
that is removed when the rank ends; relative ``out_dir`` paths resolve against the driver's
working directory when it exists on the worker (a shared filesystem), else the worker's own.

Output: the workers train with ``train.progress=false``; the driver shows one progress bar
(a line every ``--progress-every`` seconds when stderr is not a terminal) from rank 0's
``metrics.jsonl`` when it can see it (same machine or a shared filesystem). Worker log lines
reach the driver whole, prefixed ``(rank<r> pid=...)``. Ray's session files go to a temporary
directory that is removed at the end (unless ``--temp-dir`` names one).

A failed rank fails the run: the others are killed (their process-group timeout would
otherwise keep them waiting on a dead peer), and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOG_GRACE_S = 1.0  # seconds for Ray to forward the ranks' last output lines before shutdown


def loopback_ifname() -> str:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on BSD/macOS)."""
    names = {name for _, name in socket.if_nameindex()}
    return "lo" if "lo" in names or "lo0" not in names else "lo0"


def bound_listener(host: str) -> socket.socket:
    """A listening TCP socket on ``host`` and a free port (the store's, bound to one address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1024)
    return sock


class RankWorker:
    """One trainer rank (decorated as a Ray actor in :func:`launch`)."""

    def __init__(self, rank: int):
        self.rank = rank
        self._store = self._listener = None

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it: "(rank1 pid=...)"
        return f"rank{self.rank}"

    def where(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def host_store(self, host: str, world_size: int, timeout_s: float) -> int:
        """Host the rendezvous store on ``host`` only (as torchrun's agent does); return its port."""
        import torch.distributed as dist

        self._listener = bound_listener(host)
        port = self._listener.getsockname()[1]
        self._store = dist.TCPStore(host, port, world_size, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=timeout_s),
                                    master_listen_fd=self._listener.fileno())
        return port

    def run(self, env: dict[str, str], config_text: str | None, config_name: str, overrides: list[str], cwd: str) -> int:
        os.environ.update(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)
        argv, path = ["train"], None
        try:
            if config_text is not None:
                fd, path = tempfile.mkstemp(prefix=f"commtrain-r{env['RANK']}-", suffix=f"-{config_name}")
                with os.fdopen(fd, "w") as f:
                    f.write(config_text)
                argv += ["--config", path]
            for item in overrides:
                argv += ["--set", item]
            sys.path.insert(0, cwd)  # the driver's checkout first, when it is visible here
            from commtrain.cli import main

            return int(main(argv) or 0)
        finally:
            if path is not None:
                os.unlink(path)


def _private_auth_token() -> None:
    """Keep Ray's token authentication on for the private cluster without a token file.

    Ray >= 2.5x enables token auth for a new local cluster and, when it finds no token,
    generates one and saves it to ``~/.ray/auth_token`` -- a file in the user's home that
    outlives the run. A token passed in ``RAY_AUTH_TOKEN`` is found first, so nothing is
    written; the raylet and workers inherit it from this process's environment. An explicit
    ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH`` of the user is respected.
    """
    if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def ray_init_kwargs(address: str, num_workers: int, cpus_per_worker: float, gpus_per_worker: float,
                    temp_dir: str | None) -> dict:
    """``ray.init`` arguments: a private loopback-only cluster for ``local``, else join ``address``."""
    init = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    if address == "local":
        # Sockets and logs under temp_dir (keep it short: unix socket paths are limited to
        # ~107 bytes); every Ray server on 127.0.0.1.
        init.update(num_cpus=max(int(num_workers * cpus_per_worker), 1), _temp_dir=temp_dir,
                    _node_ip_address=LOOPBACK)
        if gpus_per_worker:
            init["num_gpus"] = int(num_workers * gpus_per_worker)
    else:
        init["address"] = address
    return {k: v for k, v in init.items() if v is not None}


class _Progress:
    """The driver's view of training: rank 0's metrics.jsonl, as a bar (TTY) or periodic lines."""

    def __init__(self, path: Path | None, total: int, every_s: float, stream=sys.stderr):
        self.path, self.total, self.every_s, self.stream = path, total, every_s, stream
        self.t0, self.last_print, self.step = time.time(), 0.0, 0
        self.bar = None
        if path is not None and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, file=stream)

    def _last_row(self) -> dict | None:
        try:
            if self.path.stat().st_mtime < self.t0 - 1:  # a previous run's file, not yet truncated
                return None
            lines = self.path.read_text().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            if "event" not in row:
                return row
        return None

    def poll(self, final: bool = False) -> None:
        if self.path is None:
            return
        row = self._last_row()
        if row is None or row["step"] == self.step:
            return
        self.step = row["step"]
        if self.bar is not None:
            self.bar.update(self.step - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        elif final or time.time() - self.last_print >= self.every_s:
            self.last_print = time.time()
            print(f"commtrain ray: step {self.step}/{self.total}, loss {row['loss']:.4f}, "
                  f"{row['tokens_per_s']:,.0f} tokens/s", file=self.stream, flush=True)

    def close(self) -> None:
        self.poll(final=True)
        if self.bar is not None:
            self.bar.close()


def _check_config(config: str | None, overrides: list[str], num_workers: int, address: str):
    """Validate on the driver (one line, before Ray starts); returns the Config or None (remote, unverifiable)."""
    from .config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
        return cfg.validate(num_workers)
    except ConfigError as e:
        if address == "local":
            raise ValueError(f"config error: {e}") from None
        # On a cluster, paths in the config may exist only on the workers: they validate again.
        print(f"commtrain ray: warning: the config does not validate on the driver ({e}); "
              "the workers will check it", file=sys.stderr)
        return None


def launch(num_workers: int, config: str | None, overrides: list[str], address: str = "local",
           cpus_per_worker: float = 1, gpus_per_worker: float = 0, temp_dir: str | None = None,
           timeout_s: float = 3600.0, master_addr: str | None = None, progress_every_s: float = 10.0) -> int:
    """Start ``num_workers`` rank actors, run the trainer on all, return 0 if every rank succeeded."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"--num-workers={num_workers!r} is invalid; allowed: an integer >= 1")
    config_text = None
    if config is not None:
        from . import resources

        # A file, or the name of a packaged example config (as ``commtrain train --config``);
        # read on the driver and shipped as text, so workers need no copy of it.
        packaged = resources.directory("commtrain", "configs")
        try:
            config_text = resources.find(config, packaged, "config").read_text()
        except ValueError:
            raise ValueError(f"config={config!r} is invalid; allowed: an existing YAML file or a packaged config "
                             f"name ({', '.join(resources.names(packaged))})") from None
    cfg = _check_config(config, overrides, num_workers, address)
    if address == "local":
        # Ray resolves a 127.0.0.1 node address to the machine's routable IP unless it runs
        # in its "no clusters" mode (its default on macOS/Windows), which keeps every Ray
        # server on loopback. Read when ray is first imported, inherited by its processes.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not sys.stdout.isatty():  # worker-line prefixes without colour codes in logs and pipes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    import ray

    own_tmp = None
    if address == "local" and temp_dir is None:
        own_tmp = temp_dir = tempfile.mkdtemp(prefix="ctray-", dir="/tmp")  # short: socket path limits
    if address == "local":
        _private_auth_token()
    try:
        ray.init(**ray_init_kwargs(address, num_workers, cpus_per_worker, gpus_per_worker, temp_dir))
        try:
            return _run(ray, cfg, num_workers, config, config_text, overrides, address, cpus_per_worker,
                        gpus_per_worker, timeout_s, master_addr, progress_every_s)
        finally:
            # Ray forwards the ranks' output by tailing their log files asynchronously: give it
            # a moment, or the ranks' last lines (the end-of-run summary) are lost at shutdown.
            time.sleep(LOG_GRACE_S)
            ray.shutdown()
    finally:
        if own_tmp is not None:
            shutil.rmtree(own_tmp, ignore_errors=True)


def _run(ray, cfg, num_workers, config, config_text, overrides, address, cpus_per_worker, gpus_per_worker,
         timeout_s, master_addr, progress_every_s) -> int:
    Actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(RankWorker)
    actors = [Actor.remote(rank) for rank in range(num_workers)]
    where = ray.get([a.where.remote() for a in actors], timeout=timeout_s)
    local = address == "local"
    master = master_addr or (LOOPBACK if local else where[0][0])
    port = ray.get(actors[0].host_store.remote(master, num_workers, timeout_s), timeout=timeout_s)
    by_node: dict[str, int] = {}
    envs = []
    for rank, (ip, _) in enumerate(where):
        n = by_node.get(ip, 0)
        by_node[ip] = n + 1
        env = {"RANK": str(rank), "WORLD_SIZE": str(num_workers), "LOCAL_RANK": "0" if gpus_per_worker else str(n),
               "MASTER_ADDR": master, "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
        if local:
            lo = loopback_ifname()
            env.update({k: os.environ.get(k, lo) for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")})
        envs.append(env)
    for env, (ip, _) in zip(envs, where):
        env["LOCAL_WORLD_SIZE"] = str(by_node[ip])
    show = cfg is not None and cfg.train.progress
    prog = _Progress(Path(cfg.out_dir).resolve() / "metrics.jsonl" if show else None,
                     cfg.train.steps if cfg is not None else 0, progress_every_s)
    name = os.path.basename(config) if config else "config.yaml"
    worker_sets = [*overrides, "train.progress=false"]  # one progress view: the driver's
    refs = [a.run.remote(env, config_text, name, worker_sets, os.getcwd()) for a, env in zip(actors, envs)]
    try:
        return _wait_all(ray, refs, actors, timeout_s, prog)
    finally:
        prog.close()


def _wait_all(ray, refs, actors, timeout_s: float, prog: _Progress) -> int:
    deadline = time.monotonic() + timeout_s
    pending, codes = list(refs), {}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"commtrain ray: timed out after {timeout_s:g} s; killing all ranks", file=sys.stderr)
            codes["timeout"] = 124
            break
        done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 1.0))
        prog.poll()
        if not done:
            continue
        rank = refs.index(done[0])
        try:
            codes[rank] = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 -- a rank's exception, reported with its rank
            print(f"commtrain ray: rank {rank} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
            codes[rank] = 1
        if codes[rank] != 0:
            break
    if pending or any(codes.values()):
        for a in actors:
            ray.kill(a)
        bad = {k: v for k, v in codes.items() if v}
        print(f"commtrain ray: failed ranks/exit codes: {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="commtrain ray", description="Run `commtrain train` on a Ray cluster, one actor per rank.")
    ap.add_argument("--num-workers", type=int, required=True, help="ranks (= world size)")
    ap.add_argument("--config", help="YAML config, read here and shipped to the workers")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--address", default="local",
                    help="'local' (a private single-machine Ray on loopback), 'auto' (join the running cluster) "
                         "or ray://host:port")
    ap.add_argument("--master-addr", default=None,
                    help="address the rendezvous store binds and ranks dial (default: 127.0.0.1 for local, "
                         "else rank 0's node IP)")
    ap.add_argument("--cpus-per-worker", type=float, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=0, help="1 on GPU clusters (backend auto picks nccl)")
    ap.add_argument("--temp-dir", default=None,
                    help="Ray temp dir for --address local (short path: socket limits; default: a fresh one, removed)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before all ranks are killed")
    ap.add_argument("--progress-every", type=float, default=10.0,
                    help="seconds between progress lines when stderr is not a terminal")
    args = ap.parse_args(argv)
    try:
        return launch(args.num_workers, args.config, args.set, args.address, args.cpus_per_worker,
                      args.gpus_per_worker, args.temp_dir, args.timeout, args.master_addr, args.progress_every)
    except ValueError as e:
        print(f"commtrain ray: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
