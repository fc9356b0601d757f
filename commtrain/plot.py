"""``commtrain plot RUN_DIR [RUN_DIR ...] [--out PNG]``: one PNG, three panels, runs overlaid.

1. loss per step (rank 0's ``metrics.jsonl``; eval losses as markers),
2. step time (seconds, rank 0),
3. bytes all ranks sent per step, one line per channel that carried any (``grad``, ``act``,
   ``act_grad``, ``param``), log scale: compressed and raw runs differ by orders of magnitude.

matplotlib's Agg backend: no display needed.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .metrics import read_metrics, wire_bytes_by_step

N_PANELS = 3
_STYLES = {"grad": "-", "act": "--", "act_grad": ":", "param": "-."}


def plot_runs(run_dirs: list[str], out: str):
    """Draw the runs into ``out`` (PNG); returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time, ax_wire) = plt.subplots(N_PANELS, 1, figsize=(8, 10), sharex=True)
    for i, run in enumerate(run_dirs):
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            plt.close(fig)
            raise ValueError(f"RUN_DIR {str(run)!r} has no metrics.jsonl")
        rows = read_metrics(path)
        steps = [r for r in rows if "event" not in r]
        evals = [r for r in rows if r.get("event") == "eval" and r.get("eval_loss") is not None]
        color, label = f"C{i % 10}", Path(run).name or str(run)
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], color=color, label=f"{label} train")
        if evals:
            ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o", color=color,
                         label=f"{label} eval")
        ax_time.plot([r["step"] for r in steps], [r["step_time_s"] for r in steps], color=color, label=label)
        wire = wire_bytes_by_step(run)
        channels = sorted({ch for per in wire.values() for ch, n in per.items() if n})
        for ch in channels:
            xs = sorted(wire)
            ax_wire.plot(xs, [max(wire[s].get(ch, 0), 1) for s in xs], _STYLES.get(ch, "-"), color=color,
                         label=f"{label} {ch}")
    ax_loss.set_ylabel("loss")
    ax_time.set_ylabel("step time (s)")
    ax_wire.set_ylabel("bytes sent per step\n(all ranks)")
    ax_wire.set_yscale("log")
    ax_wire.set_xlabel("step")
    for ax in (ax_loss, ax_time, ax_wire):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    ax_loss.set_title(", ".join(Path(r).name or str(r) for r in run_dirs))
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


def plot_main(args) -> int:
    out = args.out or (str(Path(args.run_dirs[0]) / "metrics.png") if len(args.run_dirs) == 1 else "compare.png")
    try:
        plot_runs(args.run_dirs, out)
    except ValueError as e:
        print(f"commtrain plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
