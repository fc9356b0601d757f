"""Pipeline fidelity: loss curves of a pp=2 run with uncompressed, direct 2-bit, AC-SGD 2-bit
and AC-SGD 4-bit stage boundaries (same seed, same data order, unthrottled link).

Each setting is one ``commtrain train`` run of the packaged pipeline config with a larger corpus
than the speed benchmark (so the run is a few epochs, not dozens: AC-SGD compresses from
the second epoch on, and the held-out loss is not dominated by overfitting), periodic
held-out eval, then a final eval on the held-out split. Results merge into one JSON keyed
by seed; a PNG shows the curves.

    flock /tmp/commtrain-cpu.lock python benchmarks/pipeline_fidelity.py --seed 0
"""
from __future__ import annotations

import argparse
import shutil
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commtrain.config import CONFIG_DIR  # noqa: E402
from commtrain.demo import torchrun  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402

CONFIG = CONFIG_DIR / "pipeline.yaml"  # the packaged example config
OUT = ROOT / "benchmarks" / "out"
PLOTS = ROOT / "benchmarks" / "plots"

# Direct 2-bit uses the same 4-bit backward as AC-SGD 2-bit: the pair differs only in
# sending Q(a) instead of Q(a - m[id]).
SETTINGS: dict[str, list[str]] = {
    "uncompressed": ["compression.act=none", "compression.act_grad=none", "compression.act_delta=false"],
    "direct fwd2/bwd4": ["compression.act=quant:bits=2", "compression.act_grad=quant:bits=4",
                         "compression.act_delta=false"],
    "AC-SGD fwd2/bwd4": ["compression.act=quant:bits=2", "compression.act_grad=quant:bits=4",
                         "compression.act_delta=true"],
    "AC-SGD fwd4/bwd8": ["compression.act=quant:bits=4", "compression.act_grad=quant:bits=8",
                         "compression.act_delta=true"],
    # Diagnostic (not in the default set): isolates the 4-bit backward's share of the gap.
    "AC-SGD fwd2/bwd8": ["compression.act=quant:bits=2", "compression.act_grad=quant:bits=8",
                         "compression.act_delta=true"],
}
DEFAULT = ["uncompressed", "direct fwd2/bwd4", "AC-SGD fwd2/bwd4", "AC-SGD fwd4/bwd8"]
# A corpus of ~1.6k training windows: 300 steps of 32 are ~6 epochs.
DATA = ["data.max_bytes=240000", "data.eval_fraction=0.15", "train.eval_every=25", "train.eval_batches=8"]


def curves(run_dir: Path) -> dict:
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    return {
        "train_loss": [[r["step"], r["loss"]] for r in steps],
        "eval_loss": [[r["step"], r["eval_loss"]] for r in evals],
        "final_eval_loss": evals[-1]["eval_loss"],
        "final_train_loss_last10": sum(r["loss"] for r in steps[-10:]) / min(10, len(steps)),
        "act_bytes_last_step": steps[-1]["wire_bytes"]["act"],
    }


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(SETTINGS, ["black", "tab:red", "tab:blue", "tab:green", "tab:purple"]))
    for seed, runs in sorted(data.items()):
        for name, r in runs.items():
            kw = dict(color=colors.get(name), alpha=0.9 if seed == min(data) else 0.45,
                      label=name if seed == min(data) else None)
            s, l = zip(*r["train_loss"])
            # A 10-step moving average: per-step losses of 32 windows are noisy.
            k = 10
            sm = [sum(l[max(0, i - k + 1):i + 1]) / len(l[max(0, i - k + 1):i + 1]) for i in range(len(l))]
            ax1.plot(s, sm, lw=1.2, **kw)
            es, el = zip(*r["eval_loss"])
            ax2.plot(es, el, marker="o", ms=3, lw=1.2, **kw)
    ax1.set(title="train loss (10-step moving average)", xlabel="step", ylabel="loss (nats/byte)")
    ax2.set(title="held-out eval loss", xlabel="step", ylabel="loss (nats/byte)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 3.5))
    ax2.set_ylim(top=min(ax2.get_ylim()[1], 3.5))
    fig.suptitle("gpt-nano, pp=2 (1F1B, 4 microbatches), byte-level stdlib corpus; seeds: " +
                 ", ".join(map(str, sorted(data))))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", nargs="*", default=None, help="subset of setting names")
    ap.add_argument("--json", default=str(OUT / "pipeline_fidelity.json"))
    ap.add_argument("--plot", default=str(PLOTS / "pipeline_fidelity.png"))
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = ap.parse_args(argv)
    names = args.only or DEFAULT
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown setting(s) {sorted(unknown)}; allowed: {list(SETTINGS)}")

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    runs = data.setdefault(str(args.seed), {})
    for name in names:
        run_dir = OUT / "pipeline_fidelity" / f"seed{args.seed}" / name.replace(" ", "_").replace("/", "-")
        shutil.rmtree(run_dir, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
        overrides = [f"out_dir={run_dir}", "resume=false", f"train.steps={args.steps}", f"train.seed={args.seed}",
                     "parallel.pp=2", "parallel.dp=1", "compression.grad=none", *DATA, *SETTINGS[name], *args.set]
        t0 = time.perf_counter()
        torchrun(2, ["train", "--config", str(CONFIG), *[a for o in overrides for a in ("--set", o)]])
        runs[name] = {**curves(run_dir), "overrides": overrides, "wall_s": time.perf_counter() - t0}
        print(f"  seed {args.seed} {name:<20} final eval {runs[name]['final_eval_loss']:.4f}", flush=True)
        path.write_text(json.dumps(data, indent=1))  # keep what finished if a later run fails
    plot(data, Path(args.plot))
    print()
    print(format_table(data))
    return 0


def format_table(data: dict) -> str:
    seeds = sorted(data, key=int)
    names = [n for n in SETTINGS if all(n in data[s] for s in seeds)]
    base = {s: data[s]["uncompressed"]["final_eval_loss"] for s in seeds if "uncompressed" in data[s]}
    lines = ["| setting | " + " | ".join(f"eval loss (seed {s})" for s in seeds) + " | mean | vs uncompressed |",
             "|---|" + "---:|" * (len(seeds) + 2)]
    for n in names:
        vals = [data[s][n]["final_eval_loss"] for s in seeds]
        mean = sum(vals) / len(vals)
        rel = (f"{100 * (mean / (sum(base.values()) / len(base)) - 1):+.2f}%" if len(base) == len(seeds) else "-")
        lines.append(f"| {n} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {mean:.4f} | {rel} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
