"""Communication-avoiding DP (issue 10): the DiLoCo outer loop against per-step fp32 all-reduce
and per-step PowerSGD rank 4, on the fine-tuning setting of ``benchmarks/finetune.py``.

    python benchmarks/outer_sync.py run                       # all rows: quality x 3 seeds, sim 100 Mbit/s, real tc link
    python benchmarks/outer_sync.py run --rows "DiLoCo H=32 top-k 1% 2-bit + EF" --no-real
    python benchmarks/outer_sync.py timing --steps 64 --pairs 3   # the timing targets, paired A B A B
    python benchmarks/outer_sync.py report                    # table + targets from the JSON

Every row fine-tunes the cached base model (``finetune.py pretrain``) on the Shakespeare corpus
with 2 data-parallel ranks, the same tokens per step and the same number of steps
(``finetune.py``'s shared settings; a DiLoCo inner step sees the same per-replica batch as a
DP step). Per row, in one invocation:

* **quality**: ``--seeds`` runs on an unthrottled loopback link -> final eval loss (the
  outer loop's final sync leaves every replica with the global weights that are evaluated);
* **simulated 100 Mbit/s**: seed 0 again with ``link.profile=100mbit``, run right after the
  seed-0 quality run (the pair whose step times are compared);
* **real 100 Mbit/s** (root only): seed 0 in two network namespaces joined by a ``tc tbf``
  100 Mbit/s link (``launch/netns.py``), no simulated throttle.

``timing`` re-measures the two timing targets in interleaved pairs (this machine's load
drifts within minutes, so a single pair can mislead): ``--pairs`` times (target row
unthrottled, target row at the simulated 100 Mbit/s), then ``--pairs`` times (target row,
PowerSGD rank 4) on the real 100 Mbit/s link; per pair the ratio, reported as median and
range.

Figures per run: bytes per inner step = every byte the rank metered (all steps plus the final
sync) / steps, averaged over ranks; whole-run mean step time = (sum of step times + the final
sync's exposed time) / steps; steady-state median step time. Targets (issue 10): >= 1000x
fewer bytes per inner step than fp32 per-step all-reduce; mean step time at 100 Mbit/s <= 1.1x
the same run's unthrottled one; final eval loss within 1% of fp32 DP (mean of 3 seeds, spread
shown); on the real link, faster than per-step PowerSGD rank 4. The perf model's prediction
for the same setting (bytes per inner step, exposed sync time) is printed beside the measured
figures. Results: benchmarks/results/outer_sync.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune as ft  # noqa: E402

from commtrain.demo import torchrun  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402

NETNS = ROOT / "launch" / "netns.py"
FP32, POWERSGD = "fp32", "PowerSGD rank 4"
TARGET_ROW = "DiLoCo H=32 top-k 1% 2-bit + EF"  # the row the >= 1000x target is about
ROWS = [FP32, POWERSGD, "DiLoCo H=32 fp32", "DiLoCo H=32 2-bit + EF", TARGET_ROW]


# -- one run -----------------------------------------------------------------------------------
def run(name: str, seed: int, base: dict, args, link: str) -> dict:
    """One fine-tuning run of row ``name``; ``link``: ``none`` | a simulated profile | ``real:<rate>``."""
    out = Path(args.work) / f"{ft._slug(name)}_s{seed}_{link.replace(':', '_')}"
    shutil.rmtree(out, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = ft.finetune_sets(name, seed, base, args, out)
    t0 = time.perf_counter()
    if link.startswith("real:"):
        cmd = [sys.executable, str(NETNS), "--prefix", "cto", "--nproc", str(args.nproc), "--rate", link[5:],
               "--timeout", "1800", "--", sys.executable, "-m", "commtrain", "train", *ft._sets(sets),
               "--set", "link.profile=null"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if r.returncode:
            raise RuntimeError(f"netns run failed ({r.returncode}): {r.stderr[-2000:]}")
    else:
        torchrun(args.nproc, ["train", *ft._sets(sets), "--set", f"link.profile={'null' if link == 'none' else link}"])
    res = summarize(out) | {"seed": seed, "link": link, "wall_s": time.perf_counter() - t0}
    print(f"  {name:<32} seed {seed} link {link:<12}: eval {res['final_eval_loss']:.4f}  mean step "
          f"{res['mean_step_s']:.3f}s  bytes/step {res['bytes_per_step']:.0f}", flush=True)
    return res


def summarize(out: Path) -> dict:
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    final_sync = [e for r in rows if r.get("event") == "final_sync" for e in r.get("outer_syncs", [])]
    n = len(steps)
    per_rank = []
    for f in [out / "metrics.jsonl", *sorted(out.glob("metrics_rank*.jsonl"))]:
        rr = read_metrics(f)
        sent = sum(sum(r["wire_bytes"].values()) for r in rr if "event" not in r)
        # the final sync's bytes cross after the last step: counted too (they are the run's)
        sent += sum(e["bytes"] for r in rr if r.get("event") == "final_sync" for e in r.get("outer_syncs", []))
        per_rank.append(sent / n)
    total_s = sum(r["step_time_s"] for r in steps) + sum(e["exposed_s"] for e in final_sync)
    syncs = [e for r in steps for e in r.get("outer_syncs", [])] + final_sync
    return dict(final_eval_loss=[r for r in rows if r.get("final")][-1]["eval_loss"],
                bytes_per_step=statistics.mean(per_rank), mean_step_s=total_s / n,
                median_step_s=statistics.median(r["step_time_s"] for r in steps),
                exposed_sync_s=sum(e["exposed_s"] for e in syncs), outer_syncs=len(syncs),
                loss=[r["loss"] for r in steps])


# -- the table -----------------------------------------------------------------------------------
def predict(name: str, args, measured_compute_s: float, link: str) -> dict | None:
    """The perf model's figures for row ``name`` (grad codec or sync section from its sets)."""
    from commtrain.perfmodel import predict_step

    sets = dict(s.split("=", 1) for s in ft.ROWS[name].sets)
    sync = None
    if sets.get("sync.strategy") == "diloco":
        sync = dict(strategy="diloco", inner_steps=int(sets.get("sync.inner_steps", 32)),
                    codec=sets.get("sync.codec", "none"), outer_optimizer=sets.get("sync.outer_optimizer", "nesterov"))
    p = predict_step("gpt-micro", global_batch=args.global_batch, seq_len=args.seq_len, dp=args.nproc,
                     codecs={"grad": sets.get("compression.grad", "none")} if sync is None else None,
                     link=link, compute_s_measured=measured_compute_s, sync=sync)
    return dict(bytes_per_step=sum(p.wire_bytes.values()), step_s=p.step_s,
                exposed_sync_s_per_step=p.extra.get("exposed_sync_s_per_step"))


def table(data: dict) -> str:
    rows = data["rows"]
    fp32 = rows.get(FP32, {})
    ref_loss = statistics.mean(r["final_eval_loss"] for r in fp32.get("quality", [])) if fp32.get("quality") else None
    ref_bytes = fp32["quality"][0]["bytes_per_step"] if fp32.get("quality") else None
    lines = ["| row | bytes / inner step | fewer bytes than fp32 DP | unthrottled: mean (median) step s | "
             "sim 100 Mbit/s: mean (median) step s | sim 100M / unthrottled | real 100 Mbit/s: mean (median) step s | "
             "final eval loss: mean ± std (min..max), 3 seeds | vs fp32 DP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in ROWS if n in rows] + [n for n in rows if n not in ROWS]:
        r = rows[name]
        q = r.get("quality", [])
        q0 = next((x for x in q if x["seed"] == 0), None)
        sim, real = r.get("sim100"), r.get("real100")
        losses = [x["final_eval_loss"] for x in q]
        mean = statistics.mean(losses) if losses else None
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        fmt = lambda x: "-" if x is None else f"{x['mean_step_s']:.3f} ({x['median_step_s']:.3f})"  # noqa: E731
        fewer = "-" if not ref_bytes else f"{ref_bytes / q0['bytes_per_step']:,.0f}x"
        slow = "-" if sim is None else f"{sim['mean_step_s'] / q0['mean_step_s']:.3f}x"
        loss = "-" if mean is None else f"{mean:.4f} ± {std:.4f} ({min(losses):.4f}..{max(losses):.4f})"
        vs = "-" if not ref_loss or name == FP32 else f"{100 * (mean / ref_loss - 1):+.2f}%"
        lines.append(f"| {name} | {q0['bytes_per_step']:,.0f} | {fewer} | {fmt(q0)} | {fmt(sim)} | {slow} | "
                     f"{fmt(real)} | {loss} | {vs} |")
    return "\n".join(lines)


def targets(data: dict) -> str:
    rows = data["rows"]
    t, f, p = rows.get(TARGET_ROW), rows.get(FP32), rows.get(POWERSGD)
    if not (t and f):
        return "(targets need the fp32 and target rows)"
    out = []
    ratio = f["quality"][0]["bytes_per_step"] / t["quality"][0]["bytes_per_step"]
    out.append(f"- bytes per inner step >= 1000x fewer than fp32 per-step all-reduce: {ratio:,.0f}x -> "
               f"{'met' if ratio >= 1000 else 'MISSED'}")
    q0 = next(x for x in t["quality"] if x["seed"] == 0)
    if t.get("sim100"):
        r = t["sim100"]["mean_step_s"] / q0["mean_step_s"]
        out.append(f"- mean step time at 100 Mbit/s (simulated) <= 1.1x unthrottled: {t['sim100']['mean_step_s']:.3f}s / "
                   f"{q0['mean_step_s']:.3f}s = {r:.3f}x -> {'met' if r <= 1.1 else 'MISSED'}")
    lt = [x["final_eval_loss"] for x in t["quality"]]
    lf = [x["final_eval_loss"] for x in f["quality"]]
    rel = statistics.mean(lt) / statistics.mean(lf) - 1
    spread = max(max(lt) - min(lt), max(lf) - min(lf)) / statistics.mean(lf)
    out.append(f"- final eval loss within 1% of fp32 DP ({len(lt)} vs {len(lf)} seeds): {100 * rel:+.2f}% "
               f"(seed spread up to {100 * spread:.2f}%{', larger than the difference' if spread > abs(rel) else ''}) -> "
               f"{'met' if rel <= 0.01 else 'MISSED'}")
    if t.get("real100") and p and p.get("real100"):
        a, b = t["real100"]["mean_step_s"], p["real100"]["mean_step_s"]
        out.append(f"- real 100 Mbit/s link: faster than per-step PowerSGD rank 4: {a:.3f}s vs {b:.3f}s per step -> "
                   f"{'met' if a < b else 'MISSED'}")
    return "\n".join(out)


def model_check(data: dict, args) -> str:
    """The perf model's prediction next to what was measured (compute = fp32's unthrottled median minus its comm)."""
    rows = data["rows"]
    if FP32 not in rows:
        return ""
    compute = statistics.median(x["median_step_s"] for x in rows[TARGET_ROW]["quality"]) if TARGET_ROW in rows else \
        rows[FP32]["quality"][0]["median_step_s"]
    lines = ["| row | bytes / inner step: measured | predicted | sim 100 Mbit/s mean step s: measured | predicted |",
             "|---|---|---|---|---|"]
    for name in [n for n in ROWS if n in rows]:
        r = rows[name]
        pr = predict(name, args, compute, "100mbit")
        sim = r.get("sim100")
        measured = "-" if not sim else f"{sim['mean_step_s']:.3f}"
        lines.append(f"| {name} | {r['quality'][0]['bytes_per_step']:,.0f} | {pr['bytes_per_step']:,.0f} | "
                     f"{measured} | {pr['step_s']:.3f} |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["run", "timing", "report"])
    ap.add_argument("--pairs", type=int, default=3, help="timing: interleaved pairs per comparison")
    ap.add_argument("--comparisons", default="sim,real", help="timing: which of sim,real to measure")
    ap.add_argument("--rows", nargs="*", default=ROWS, help="rows of finetune.py's ROWS table")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--no-real", action="store_true", help="skip the real tc-shaped link rows")
    ap.add_argument("--real-rate", default="100mbit")
    ap.add_argument("--sim-link", default="100mbit")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "outer_sync.json"))
    ap.add_argument("--fresh", action="store_true")
    args, rest = ap.parse_known_args(argv)
    # finetune.py's shared settings (steps, batch, lr, base model, ...): its flags are accepted too
    ft_args = ft.build_parser().parse_args(["finetune", *rest])
    for k, v in vars(ft_args).items():
        if k not in ("rows", "seeds", "json", "fresh", "stage"):
            setattr(args, k, v)
    args.work = str(ROOT / "benchmarks" / "out" / "outer_sync_runs")
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {"rows": {}}
    if args.stage == "run":
        base = ft.pretrain(ft_args)
        data["settings"] = ft.finetune_settings(ft_args, base["key"])
        for name in args.rows:
            rec = data["rows"].setdefault(name, {})
            rec["sets"] = list(ft.ROWS[name].sets)
            q = []
            for seed in args.seeds:
                q.append(run(name, seed, base, args, "none"))
                if seed == 0 and args.sim_link:
                    rec["sim100"] = run(name, 0, base, args, args.sim_link)
            rec["quality"] = q
            if not args.no_real:
                if os.geteuid() != 0:
                    print("real-link rows need root (network namespaces, tc): skipped")
                else:
                    rec["real100"] = run(name, 0, base, args, f"real:{args.real_rate}")
            path.write_text(json.dumps(data, indent=1))
    if args.stage == "timing":
        base = ft.pretrain(ft_args)
        comparisons = {"sim": [(TARGET_ROW, "none"), (TARGET_ROW, args.sim_link)]}
        if not args.no_real and os.geteuid() == 0:
            comparisons["real"] = [(TARGET_ROW, f"real:{args.real_rate}"), (POWERSGD, f"real:{args.real_rate}")]
        wanted = set(args.comparisons.split(","))
        data.setdefault("timing", {})
        for key, (a, b) in [(k, v) for k, v in comparisons.items() if k in wanted]:
            pairs = []
            for _ in range(args.pairs):  # A B A B ...: each pair's ratio is taken under the same load
                ra, rb = run(a[0], 0, base, args, a[1]), run(b[0], 0, base, args, b[1])
                pairs.append(dict(a=ra["mean_step_s"], b=rb["mean_step_s"], ratio=rb["mean_step_s"] / ra["mean_step_s"],
                                  a_median=ra["median_step_s"], b_median=rb["median_step_s"]))
            data["timing"][key] = dict(a=list(a), b=list(b), runs=pairs, steps=args.steps)
        path.write_text(json.dumps(data, indent=1))
    print(table(data))
    print()
    print(targets(data))
    print()
    print(model_check(data, args))
    print()
    print(timing_table(data))
    return 0


def timing_table(data: dict) -> str:
    t = data.get("timing")
    if not t:
        return ""
    lines = ["Paired timing (seed 0; mean step time over the whole run, each pair run back to back):", "",
             "| comparison | steps per run | A | B | pairs: B / A (s) | median B/A | range | target |",
             "|---|---|---|---|---|---|---|---|"]
    targets = {"sim": ("<= 1.1x", lambda r: r <= 1.1), "real": ("< 1.0x (faster than PowerSGD)", lambda r: r > 1.0)}
    for key, c in t.items():
        ratios = [p["ratio"] for p in c["runs"]]
        med = statistics.median(ratios)
        label, ok = targets[key]
        if key == "real":  # B is PowerSGD: the target row is faster iff B / A > 1
            verdict = f"DiLoCo / PowerSGD = {1 / med:.3f}x -> {'met' if ok(med) else 'MISSED'}"
        else:
            verdict = f"{label}: {'met' if ok(med) else 'MISSED'}"
        each = ", ".join("%.3f/%.3f" % (p["b"], p["a"]) for p in c["runs"])
        lines.append(f"| {key} | {c['steps']} | {c['a'][0]} @ {c['a'][1]} | {c['b'][0]} @ {c['b'][1]} | {each} | {med:.3f}x | "
                     f"{min(ratios):.3f}..{max(ratios):.3f} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
