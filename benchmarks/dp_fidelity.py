"""Training fidelity per gradient codec: loss curves and final eval loss vs fp32.

    python benchmarks/dp_fidelity.py --rows "fp32 (none)" fp16 "quant 8-bit + EF"   # a few rows per
    python benchmarks/dp_fidelity.py --rows "quant 4-bit + EF" "quant 2-bit + EF"     # invocation, merged
    python benchmarks/dp_fidelity.py --report                                          # table + PNG only

Every row is the same ``commtrain train`` run (same seed, so the same initial weights and
the same batches in the same order on every rank; 2 ranks; unthrottled link, so it runs
at compute speed) that differs only in the gradient codec (rows and specs as in
``dp_codecs.py``, all with ``compression.policy=always``). Eval loss is measured every
``--eval-every`` steps and at the end over a fixed held-out set (``--eval-batches``
batches of ``batch_size`` sequences per rank).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from commtrain.demo import torchrun  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402
from dp_codecs import ROWS  # noqa: E402

ROWS = {k: v for k, v in ROWS.items() if not k.startswith("auto")}  # no link to price: auto == always
TARGETS = {"quant 4-bit + EF": 0.01, "top-k 1% + EF": 0.03}  # issue 3: relative final eval loss vs fp32


def run_row(name: str, args) -> dict:
    spec, ef, _ = ROWS[name]
    out = Path(args.work) / "".join(c if c.isalnum() else "_" for c in name)
    shutil.rmtree(out, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = [
        f"model.preset={args.model}", f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
        f"train.eval_batches={args.eval_batches}", f"train.lr_warmup_steps={args.lr_warmup}",
        f"out_dir={out}", "resume=false", "train.progress=false", "link.profile=null",
        f"compression.grad={spec}", f"compression.error_feedback={str(ef).lower()}", "compression.policy=always",
        *args.set,
    ]
    t0 = time.perf_counter()
    torchrun(args.nproc, ["train", "--config", str(args.config), *[a for s in sets for a in ("--set", s)]])
    wall = time.perf_counter() - t0
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    print(f"  {name:<22} final eval loss {evals[-1]['eval_loss']:.4f}  ({wall:.0f}s wall)", flush=True)
    return dict(codec=spec, error_feedback=ef, wall_s=wall,
                loss=[r["loss"] for r in steps], eval=[(r["step"], r["eval_loss"]) for r in evals],
                final_eval_loss=evals[-1]["eval_loss"],
                wire_bytes_per_step=sum(steps[-1]["wire_bytes"].values()))


def format_table(data: dict) -> str:
    rows = data["rows"]
    ref = rows.get("fp32 (none)", {}).get("final_eval_loss")
    lines = [f"| {'gradients':<22} | final eval loss | vs fp32 | target | mean train loss, last 20 steps |",
             "|" + "|".join(["-" * 24, "-" * 17, "-" * 9, "-" * 8, "-" * 32]) + "|"]
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        rel = (r["final_eval_loss"] / ref - 1) if ref else float("nan")
        tgt = TARGETS.get(name)
        verdict = "" if tgt is None else (f"<= {tgt:.0%} " + ("met" if abs(rel) <= tgt or rel < 0 else "MISSED"))
        tail = r["loss"][-20:]
        lines.append(f"| {name:<22} | {r['final_eval_loss']:>15.4f} | {100 * rel:>+6.2f}% | {verdict:<6} "
                     f"| {sum(tail) / len(tail):>30.4f} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name in [n for n in ROWS if n in data["rows"]]:
        r = data["rows"][name]
        loss = np.asarray(r["loss"])
        w = min(data["settings"].get("smooth", 10), len(loss))
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        style = dict(lw=2.2, color="black") if name.startswith("fp32") else dict(lw=1.1)
        ax.plot(np.arange(w, len(loss) + 1), smooth, label=name, **style)
        st, ev = zip(*r["eval"])
        ax2.plot(st, ev, marker="o", ms=3, label=name, **style)
    ax.set_title(f"train loss ({w}-step moving mean), 2 ranks, {data['settings']['model']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
    ax2.set_title("held-out eval loss")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="*", default=[], help="rows to run, from: " + ", ".join(ROWS).replace("%", "%%"))
    ap.add_argument("--model", default="gpt-micro")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr-warmup", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--config", default="demo", help="a YAML path or a packaged config name (default: demo)")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "dp_fidelity_runs"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "dp_fidelity.json"))
    ap.add_argument("--png", default=str(ROOT / "benchmarks" / "plots" / "dp_fidelity.png"))
    ap.add_argument("--report", action="store_true", help="only print the table and plot from --json")
    args = ap.parse_args()
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; allowed: {list(ROWS)}")
    if not args.rows and not args.report:
        ap.error("give --rows (or --report)")

    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    settings = dict(model=args.model, steps=args.steps, lr_warmup=args.lr_warmup, eval_every=args.eval_every,
                    eval_batches=args.eval_batches, nproc=args.nproc, config=args.config, set=args.set, smooth=10)
    if data.get("settings") and args.rows and {k: v for k, v in data["settings"].items()} != settings:
        print(f"note: settings differ from the rows already in {path}: {data['settings']}", file=sys.stderr)
    for name in args.rows:
        data["rows"][name] = run_row(name, args)
        data["settings"] = settings
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    print(format_table(data))
    plot(data, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
