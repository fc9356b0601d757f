"""Data-parallel step time and speedup per gradient codec on simulated links, vs two models.

    python benchmarks/dp_codecs.py --link 100mbit      # one link per invocation (short locked runs)
    python benchmarks/dp_codecs.py --link 1gbit
    python benchmarks/dp_codecs.py --link 10gbit
    python benchmarks/dp_codecs.py --report            # table + PNG from the JSON only

Every row is a real ``torchrun`` training run of the demo config (gpt-micro, 2 ranks,
byte tokenizer, batch 8 x 64 tokens per rank) through ``commtrain train``. Per run:
median step time after ``--skip`` warm-up steps, wire bytes per step (this rank, all
channels), and the link's modeled seconds for those bytes (``modeled_comm_s``).

Two reference speedups, with C the fp32 step time on an *unthrottled* link (measured in the
same invocation: compute with negligible communication) and M the modeled link seconds per
step of the run's measured wire bytes:

    serial model = (C + M_fp32) / (C + M_codec)          # a free codec, no overlap
    bound        = T_fp32 / max(min(C, T_fp32), M_codec)  # a free codec, perfect overlap

The *bound* is a true upper bound on the speedup: a step can be no shorter than its compute
nor than its own link time; T_fp32 is the measured fp32 step on the same link, and compute
is taken as min(C, T_fp32) so that a noisy C can only lower the compute estimate, never
raise it (up to run-to-run noise in T_fp32 itself). The serial model is not a bound: overlap lets a run beat it (fp16 does at 100
Mbit/s). ``of bound`` = achieved / bound. Explicit codec rows use ``compression.policy=always``; the row
"auto (default policy)" is 4-bit + EF under the default ``policy=auto``.

Results are merged into ``--json`` (one entry per link), and the table and PNG are
regenerated from everything in it.
"""
from __future__ import annotations

import argparse
import shutil
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commtrain.demo import summarize, torchrun  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402

LINKS = ("100mbit", "1gbit", "10gbit")
# name -> (grad codec spec, error feedback, policy)
ROWS = {
    "fp32 (none)": ("none", False, "always"),
    "fp16": ("fp16", False, "always"),
    "quant 8-bit + EF": ("quant:bits=8", True, "always"),
    "quant 4-bit + EF": ("quant:bits=4", True, "always"),
    "quant 2-bit + EF": ("quant:bits=2", True, "always"),
    "natural": ("natural", False, "always"),
    "natural_dither": ("natural_dither", False, "always"),
    "top-k 1% + EF": ("topk:ratio=0.01", True, "always"),
    "PowerSGD rank 4": ("powersgd:rank=4", True, "always"),
    "auto (default policy)": ("quant:bits=4", True, "auto"),
}


def run_one(name: str, spec: str, ef: bool, policy: str, link: str | None, args, rep: str = "0") -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in f"{link or 'unthrottled'}_{name}_r{rep}")
    out = Path(args.work) / slug
    shutil.rmtree(out, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = [
        f"train.steps={args.steps}", f"out_dir={out}", "resume=false", "train.progress=false",
        "train.eval_every=0", "train.eval_batches=1", f"link.profile={link if link else 'null'}",
        f"compression.grad={spec}", f"compression.error_feedback={str(ef).lower()}",
        f"compression.policy={policy}", *args.set,
    ]
    t0 = time.perf_counter()
    torchrun(args.nproc, ["train", "--config", str(args.config), *[a for s in sets for a in ("--set", s)]])
    wall = time.perf_counter() - t0
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r][args.skip:]
    row = summarize(out, skip=args.skip)
    print(f"  {name:<24} step {row['step_time_s']:.3f}s  wire {row['wire_bytes'] / 1e6:.2f} MB  ({wall:.0f}s wall)",
          flush=True)
    return dict(steps=steps, wall_s=wall, final_loss=row["final_loss"])


def aggregate(name: str, runs: list[dict], spec: str, ef: bool, policy: str, link: str | None) -> dict:
    """Pool the timed steps of every repeat of one row; medians over the pool."""
    steps = [s for r in runs for s in r["steps"]]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return dict(
        codec=spec, error_feedback=ef, policy=policy, link=link or "unthrottled",
        repeats=len(runs), timed_steps=len(steps),
        step_time_s=med([s["step_time_s"] for s in steps]),
        step_time_per_repeat_s=[med([s["step_time_s"] for s in r["steps"]]) for r in runs],
        wire_bytes=statistics.mean(sum(s["wire_bytes"].values()) for s in steps),
        wire_bytes_by_channel={k: med([s["wire_bytes"][k] for s in steps]) for k in steps[0]["wire_bytes"]},
        modeled_comm_s=med([sum((s["modeled_comm_s"] or {}).values()) for s in steps]),
        compute_s=med([s["compute_s"] for s in steps]),
        comm_s=med([s["comm_s"] for s in steps]),
        final_loss=statistics.mean(r["final_loss"] for r in runs),
        wall_s=sum(r["wall_s"] for r in runs),
    )


def bench_link(link: str, args) -> dict:
    # Repeats are interleaved (round robin over rows) so that slow drifts of a shared
    # 2-core machine hit every row alike instead of whichever row ran during them.
    # C (fp32, unthrottled) runs first *and* last: on a shared machine a single C run is
    # the noisiest number in the table, and every ideal speedup depends on it.
    c = ("C", "none", False, "always", None)
    plan = [c] + [(n, *ROWS[n], link) for n in args.rows] + [c]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in plan}
    for rep in range(args.repeats):
        print(f"== {link}, repeat {rep + 1}/{args.repeats} (C: fp32 on an unthrottled link)", flush=True)
        for i, (name, spec, ef, policy, lk) in enumerate(plan):
            runs[name].append(run_one(name, spec, ef, policy, lk, args, f"{rep}_{i}"))
    base = aggregate("C", runs.pop("C"), "none", False, "always", None)
    rows = {name: aggregate(name, rs, *ROWS[name], link) for name, rs in runs.items()}
    C, fp32 = base["step_time_s"], rows["fp32 (none)"]
    for r in rows.values():
        r["ideal_speedup"] = (C + fp32["modeled_comm_s"]) / (C + r["modeled_comm_s"])
        r["speedup"] = fp32["step_time_s"] / r["step_time_s"]
        r["of_ideal"] = r["speedup"] / r["ideal_speedup"]
        # Paired per repeat (runs of one repeat are adjacent in time): robust to slow drifts.
        r["speedup_per_repeat"] = [f / x for f, x in zip(fp32["step_time_per_repeat_s"], r["step_time_per_repeat_s"])]
    return {"C_unthrottled": base, "rows": rows}


def format_table(data: dict) -> str:
    lines = []
    for link in [l for l in LINKS if l in data["links"]] + [l for l in data["links"] if l not in LINKS]:
        d = data["links"][link]
        lines.append(f"\n{link}  (C = fp32 step on an unthrottled link: {d['C_unthrottled']['step_time_s']:.3f} s)")
        lines.append(f"| {'gradients':<22} | step time | wire MB/step | modeled link s | speedup | serial model "
                     f"| achieved/serial | bound | of bound |")
        lines.append("|" + "|".join(["-" * 24, "-" * 11, "-" * 14, "-" * 16, "-" * 9, "-" * 14, "-" * 17, "-" * 7,
                                     "-" * 10]) + "|")
        C, fp32 = d["C_unthrottled"]["step_time_s"], d["rows"]["fp32 (none)"]["step_time_s"]
        for name, r in d["rows"].items():
            bound = fp32 / max(min(C, fp32), r["modeled_comm_s"])
            lines.append(
                f"| {name:<22} | {r['step_time_s']:>7.3f} s | {r['wire_bytes'] / 1e6:>12.3f} | {r['modeled_comm_s']:>14.4f} "
                f"| {r['speedup']:>6.2f}x | {r['ideal_speedup']:>11.2f}x | {100 * r['of_ideal']:>14.0f}% "
                f"| {bound:>4.2f}x | {100 * r['speedup'] / bound:>7.0f}% |"
            )
        if d["settings"]["repeats"] > 1:
            lines.append("speedup per repeat (paired): " + "; ".join(
                f"{n}: {', '.join(f'{x:.2f}' for x in r['speedup_per_repeat'])}" for n, r in d["rows"].items()
                if n != "fp32 (none)"))
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = [l for l in LINKS if l in data["links"]]
    fig, axes = plt.subplots(1, len(links), figsize=(5.5 * len(links), 4.8), squeeze=False)
    for ax, link in zip(axes[0], links):
        rows = data["links"][link]["rows"]
        names = list(rows)
        xs = range(len(names))
        ax.bar(xs, [rows[n]["speedup"] for n in names], color="tab:blue", label="achieved")
        ax.scatter(xs, [rows[n]["ideal_speedup"] for n in names], color="tab:red", marker="_", s=400,
                   linewidths=3, zorder=3, label="serial model (C + M_fp32) / (C + M)")
        C, fp32 = data["links"][link]["C_unthrottled"]["step_time_s"], rows["fp32 (none)"]["step_time_s"]
        ax.scatter(xs, [fp32 / max(min(C, fp32), rows[n]["modeled_comm_s"]) for n in names], color="black", marker="_", s=400,
                   linewidths=2, zorder=3, label="bound T_fp32 / max(min(C, T_fp32), M)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{link}: speedup vs fp32 (2 ranks, gpt-micro)")
        ax.set_ylabel("step-rate speedup")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--link", action="append", choices=LINKS, help="link profile(s) to run (repeatable)")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="subset of: " + ", ".join(ROWS).replace("%", "%%"))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip", type=int, default=4, help="leading steps excluded (warm-up, uncompressed steps)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every row (steps are pooled)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--config", default="demo", help="a YAML path or a packaged config name (default: demo)")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "dp_codecs_runs"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "dp_codecs.json"))
    ap.add_argument("--png", default=str(ROOT / "benchmarks" / "plots" / "dp_codecs.png"))
    ap.add_argument("--tag", default="", help="store under '<link><tag>' in the JSON (e.g. a paired subset run)")
    ap.add_argument("--report", action="store_true", help="only print the table and plot from --json")
    args = ap.parse_args()
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; allowed: {list(ROWS)}")
    if "fp32 (none)" not in args.rows:
        args.rows.insert(0, "fp32 (none)")  # every speedup is relative to it

    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {"links": {}}
    if not args.report:
        if not args.link:
            ap.error("--link is required (or --report)")
        for link in args.link:
            key = link + args.tag
            data["links"][key] = bench_link(link, args)
            data["links"][key]["settings"] = dict(config=args.config, nproc=args.nproc, steps=args.steps,
                                                   skip=args.skip, repeats=args.repeats, set=args.set,
                                                   command=" ".join(sys.argv))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))
    if not data["links"]:
        ap.error(f"{path}: no results yet; run with --link first")
    print(format_table(data))
    plot(data, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
