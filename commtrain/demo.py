"""``commtrain demo``: the same short fine-tuning run twice on a simulated slow link.

Once with fp32 gradients and once with a compressed codec (4-bit quantization + error
feedback by default), each launched with ``torchrun`` on loopback, then a table of
step time, wire bytes per step, speedup and final loss.
"""
from __future__ import annotations

import socket
import statistics
import subprocess
import sys
from importlib.resources import as_file
from pathlib import Path

from . import resources
from .metrics import read_metrics

# The packaged example config (commtrain/configs/demo.yaml), handed to the ranks as a file path.
CONFIG = resources.directory(__package__, "configs", "demo.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str]) -> None:
    """Run ``python -m commtrain <args>`` under torchrun on loopback; raise if any rank fails."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "commtrain", *args,
    ]
    subprocess.run(cmd, check=True)


def summarize(out_dir: Path, skip: int = 3) -> dict:
    rows = read_metrics(out_dir / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    timed = steps[skip:] or steps  # the first steps include warm-up (allocator, compile, uncompressed)
    return {
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "wire_bytes": statistics.mean(sum(r["wire_bytes"].values()) for r in timed),
        "final_loss": statistics.mean(r["loss"] for r in steps[-5:]),
        "eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
    }


def format_table(results: dict[str, dict]) -> str:
    base = next(iter(results.values()))
    lines = [f"{'gradients':<28} {'step time':>10} {'wire MB/step':>13} {'speedup':>8} {'train loss':>11} {'eval loss':>10}"]
    for name, r in results.items():
        lines.append(
            f"{name:<28} {r['step_time_s']:>9.3f}s {r['wire_bytes'] / 1e6:>13.2f} "
            f"{base['step_time_s'] / r['step_time_s']:>7.2f}x {r['final_loss']:>11.4f} {r['eval_loss']:>10.4f}"
        )
    return "\n".join(lines)


def run_demo(args) -> int:
    out = Path(args.out_dir)
    runs = {
        "fp32 (none)": ["compression.grad=none"],
        # pinned (policy=always): the row shows the codec it names, not what compression.policy=auto
        # would choose instead on this link (on 100mbit: PowerSGD for every bucket)
        f"{args.codec} + EF": [f"compression.grad={args.codec}", "compression.error_feedback=true",
                               "compression.policy=always"],
    }
    results = {}
    for name, sets in runs.items():
        run_dir = out / name.split()[0].replace(":", "_").replace(",", "_").replace("=", "")
        print(f"\n== {name}: {args.nproc} ranks, link {args.link}, {args.steps} steps -> {run_dir}", flush=True)
        # A fresh run every time, never mixed with an earlier one: resume=never, and the
        # previous demo run in the same directory is moved aside (renamed, not deleted).
        overrides = [
            f"train.steps={args.steps}", f"link.profile={args.link}", f"out_dir={run_dir}", "resume=never",
            *sets, *args.set,
        ]
        with as_file(CONFIG) as config:  # a real file even if the package is zipped
            torchrun(args.nproc, ["train", "--config", str(config), "--overwrite",
                                  *[a for o in overrides for a in ("--set", o)]])
        results[name] = summarize(run_dir)
    print(f"\ncommtrain demo: {args.nproc} ranks on a simulated {args.link} link\n")
    print(format_table(results))
    return 0
