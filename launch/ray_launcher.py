"""Run the commtrain trainer on a Ray cluster: one Ray actor per rank.

    python launch/ray_launcher.py --num-workers 2 --config tiny --set train.steps=4
    python launch/ray_launcher.py --address auto --num-workers 16 --gpus-per-worker 1 --config my_run.yaml

Why actors and not Ray Train's ``TorchTrainer``: the trainer already initialises
torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and owns its checkpoints and metrics. Actors that set exactly those variables and
call ``commtrain.cli.main(["train", ...])`` run the *same* code path as ``torchrun`` -- same
process group, same config validation, same ``metrics.jsonl`` -- whereas ``TorchTrainer``
would create its own process group, wrap the loop in a session and write results under its own
storage path (by default in the home directory).

Rendezvous: rank 0's actor reports its node IP and a free TCP port; every actor gets
``MASTER_ADDR``/``MASTER_PORT`` from it. ``LOCAL_RANK`` is the actor's index among the actors
on its node; with ``--gpus-per-worker 1`` Ray restricts ``CUDA_VISIBLE_DEVICES`` to the
actor's GPU, so ``LOCAL_RANK`` is 0 (the only visible device). The config file (a path, or
the name of a packaged example config such as ``tiny``) is read on the driver and shipped as
text, so workers on other nodes do not need it on disk; relative
``out_dir`` paths resolve against the driver's working directory when it exists on the
worker (a shared filesystem), else against the worker's own.

A failed rank fails the run: the others are killed (their process-group timeout would
otherwise keep them waiting on a dead peer), and the exit code is non-zero.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankWorker:
    """One trainer rank (decorated as a Ray actor in :func:`launch`)."""

    def where(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), os.getpid()

    def free_port(self) -> int:
        return _free_port()

    def run(self, env: dict[str, str], config_text: str | None, config_name: str, overrides: list[str], cwd: str) -> int:
        os.environ.update(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)
        argv = ["train"]
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


def _private_auth_token() -> None:
    """Keep Ray's token authentication on for the private cluster without a token file.

    Ray >= 2.5x enables token auth for a new local cluster and, when it finds no token,
    generates one and saves it to ``~/.ray/auth_token`` -- a file in the user's home that
    outlives the run. A token passed in ``RAY_AUTH_TOKEN`` is found first, so nothing is
    written; the raylet and workers inherit it from this process's environment. An explicit
    ``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH`` of the user is respected.
    """
    if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def launch(num_workers: int, config: str | None, overrides: list[str], address: str = "local",
           cpus_per_worker: float = 1, gpus_per_worker: float = 0, temp_dir: str | None = None,
           timeout_s: float = 3600.0) -> int:
    """Start ``num_workers`` rank actors, run the trainer on all, return 0 if every rank succeeded."""
    import ray

    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers={num_workers!r} is invalid; allowed: an integer >= 1")
    config_text, name = None, "config.yaml"
    if config is not None:
        from commtrain import resources

        # A file, or the name of a packaged example config (as ``commtrain train --config``).
        packaged = resources.directory("commtrain", "configs")
        try:
            found = resources.find(config, packaged, "config")
        except ValueError:
            raise ValueError(f"config={config!r} is invalid; allowed: an existing YAML file or a packaged config "
                             f"name ({', '.join(resources.names(packaged))})") from None
        config_text, name = found.read_text(), found.name
    init = dict(include_dashboard=False, log_to_driver=True)
    if address == "local":
        # A private single-machine cluster; its sockets and logs under temp_dir (keep it short:
        # unix socket paths are limited to ~107 bytes).
        init.update(num_cpus=max(int(num_workers * cpus_per_worker), 1), _temp_dir=temp_dir)
        _private_auth_token()
        if gpus_per_worker:
            init["num_gpus"] = int(num_workers * gpus_per_worker)
    else:
        init["address"] = address
    ray.init(**{k: v for k, v in init.items() if v is not None})
    try:
        Actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(RankWorker)
        actors = [Actor.remote() for _ in range(num_workers)]
        where = ray.get([a.where.remote() for a in actors], timeout=timeout_s)
        master_addr = where[0][0]
        master_port = ray.get(actors[0].free_port.remote(), timeout=timeout_s)
        by_node: dict[str, int] = {}
        envs = []
        for rank, (ip, _) in enumerate(where):
            local = by_node.get(ip, 0)
            by_node[ip] = local + 1
            envs.append({"RANK": str(rank), "WORLD_SIZE": str(num_workers),
                         "LOCAL_RANK": "0" if gpus_per_worker else str(local),
                         "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)})
        for env, (ip, _) in zip(envs, where):
            env["LOCAL_WORLD_SIZE"] = str(by_node[ip])
        refs = [a.run.remote(env, config_text, name, list(overrides), os.getcwd()) for a, env in zip(actors, envs)]
        return _wait_all(ray, refs, actors, timeout_s)
    finally:
        ray.shutdown()


def _wait_all(ray, refs, actors, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    pending, codes = list(refs), {}
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not done:
            print(f"ray_launcher: timed out after {timeout_s:g} s; killing all ranks", file=sys.stderr)
            codes["timeout"] = 124
            break
        rank = refs.index(done[0])
        try:
            codes[rank] = ray.get(done[0])
        except Exception as e:  # noqa: BLE001 -- a rank's exception, reported with its rank
            print(f"ray_launcher: rank {rank} failed: {e}", file=sys.stderr)
            codes[rank] = 1
        if codes[rank] != 0:
            break
    if pending or any(codes.values()):
        for a in actors:
            ray.kill(a)
        bad = {k: v for k, v in codes.items() if v}
        print(f"ray_launcher: failed ranks/exit codes: {bad}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run `commtrain train` on a Ray cluster, one actor per rank.")
    ap.add_argument("--num-workers", type=int, required=True, help="ranks (= world size)")
    ap.add_argument("--config", help="YAML config (a path, or a packaged name: tiny, pipeline, demo), read here "
                                     "and shipped to the workers")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--address", default="local",
                    help="'local' (start a private single-machine Ray), 'auto' (join the running cluster) or ray://host:port")
    ap.add_argument("--cpus-per-worker", type=float, default=1)
    ap.add_argument("--gpus-per-worker", type=float, default=0, help="1 on GPU clusters (backend auto picks nccl)")
    ap.add_argument("--temp-dir", default=None, help="Ray temp dir for --address local (short path: socket limits)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before all ranks are killed")
    args = ap.parse_args(argv)
    try:
        return launch(args.num_workers, args.config, args.set, args.address, args.cpus_per_worker,
                      args.gpus_per_worker, args.temp_dir, args.timeout)
    except ValueError as e:
        print(f"ray_launcher: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
