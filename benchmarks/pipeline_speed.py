"""Pipeline step time and speedup over a simulated link: uncompressed vs direct and AC-SGD
activation compression (pp=2), and AC-SGD + DP gradient compression on a pp=2 x dp=2 mesh.

One invocation = one link (run it under the CPU lock, once per link); results are merged
into one JSON file keyed by link. For every layout it also runs the uncompressed setting
on an *unthrottled* link, whose step time is the compute-only baseline C of the ideal::

    ideal = (C + M_none) / (C + M_codec)

M = modeled link seconds of the bytes actually sent in a step (``modeled_comm_s`` summed
over channels) on the busiest rank (median over measured steps per rank, then max over
ranks). Achieved = T_none / T_codec, both measured at the link in the same invocation.

AC-SGD sends a sample's first visit uncompressed (it fills the buffer row), so the
corpus is small (the packaged pipeline config: 256 windows, 8 steps per epoch at pp=2) and only
steps after the first epoch are timed.

    flock /tmp/commtrain-cpu.lock python benchmarks/pipeline_speed.py --link 100mbit
    flock /tmp/commtrain-cpu.lock python benchmarks/pipeline_speed.py --link 1gbit
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

from commtrain.config import CONFIG_DIR  # noqa: E402
from commtrain.demo import torchrun  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402

CONFIG = CONFIG_DIR / "pipeline.yaml"  # the packaged example config
OUT = ROOT / "benchmarks" / "out"

# name -> (ranks, dp, overrides). act_grad of "direct 4-bit" is 8-bit, as in AC-SGD 4/8,
# so the two differ only in delta vs direct forward activations.
NONE = ["compression.act=none", "compression.act_grad=none", "compression.act_delta=false", "compression.grad=none"]
SETTINGS: dict[str, tuple[int, list[str]]] = {
    "uncompressed": (1, NONE),
    "direct fwd4/bwd8": (1, ["compression.act=quant:bits=4", "compression.act_grad=quant:bits=8",
                             "compression.act_delta=false", "compression.grad=none"]),
    "AC-SGD fwd4/bwd8": (1, ["compression.act=quant:bits=4", "compression.act_grad=quant:bits=8",
                             "compression.act_delta=true", "compression.grad=none"]),
    "AC-SGD fwd2/bwd4": (1, ["compression.act=quant:bits=2", "compression.act_grad=quant:bits=4",
                             "compression.act_delta=true", "compression.grad=none"]),
    "pp2xdp2 uncompressed": (2, NONE),
    "pp2xdp2 AC-SGD fwd2/bwd4 + grad q4+EF": (2, [
        "compression.act=quant:bits=2", "compression.act_grad=quant:bits=4", "compression.act_delta=true",
        "compression.grad=quant:bits=4", "compression.error_feedback=true"]),
}
BASELINE = {1: "uncompressed", 2: "pp2xdp2 uncompressed"}


def measure(run_dir: Path, world: int, skip: int) -> dict:
    """Median step time (max over ranks per step), busiest rank's modeled link seconds,
    bytes per rank, over the steps after ``skip``."""
    per_rank = []
    for r in range(world):
        rows = [x for x in read_metrics(run_dir / ("metrics.jsonl" if r == 0 else f"metrics_rank{r}.jsonl"))
                if "event" not in x]
        per_rank.append(rows[skip:])
    n = min(len(rows) for rows in per_rank)
    if n < 3:
        raise RuntimeError(f"{run_dir}: only {n} steps after skipping {skip}; raise --steps")
    step_times = [max(rows[i]["step_time_s"] for rows in per_rank) for i in range(n)]
    modeled = [statistics.median(sum((x["modeled_comm_s"] or {}).values()) for x in rows) for rows in per_rank]
    wire = [{ch: statistics.median(x["wire_bytes"][ch] for x in rows) for ch in rows[0]["wire_bytes"]} for rows in per_rank]
    comm = [statistics.median(x["comm_s"] for x in rows) for rows in per_rank]
    evals = [x for x in read_metrics(run_dir / "metrics.jsonl") if x.get("event") == "eval"]
    return {
        "step_time_s": statistics.median(step_times),
        "step_time_mean_s": statistics.mean(step_times),
        "modeled_comm_s_busiest": max(modeled),
        "modeled_comm_s_per_rank": modeled,
        "comm_wait_s_per_rank": comm,
        "wire_bytes_per_rank": wire,
        "timed_steps": n,
        "final_loss": per_rank[0][-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
    }


def run(name: str, dp: int, sets: list[str], link: str | None, args, tag: str) -> dict:
    run_dir = OUT / "pipeline_speed" / tag / name.replace(" ", "_").replace("/", "-").replace("+", "p")
    shutil.rmtree(run_dir, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    overrides = [f"out_dir={run_dir}", "resume=false", f"train.steps={args.steps}", "parallel.pp=2",
                 f"parallel.dp={dp}", *sets, *args.set]
    overrides += [f"link.bandwidth={link}", f"link.latency={args.latency}"] if link else []
    t0 = time.perf_counter()
    torchrun(2 * dp, ["train", "--config", str(CONFIG), *[a for o in overrides for a in ("--set", o)]])
    # Steps per epoch: 256 train windows / global batch (32 per replica x dp).
    skip = args.skip if args.skip is not None else 256 // (32 * dp) + 1
    res = measure(run_dir, 2 * dp, skip)
    res.update(dp=dp, overrides=overrides, wall_s=time.perf_counter() - t0, skip=skip)
    print(f"  {name:<40} link={link or 'unthrottled':<8} step {res['step_time_s']:.4f}s  "
          f"M_busiest {res['modeled_comm_s_busiest']:.4f}s", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", required=True, help="bandwidth of the simulated link, e.g. 100mbit, 1gbit, 10mbit")
    ap.add_argument("--latency", default=None, help="one-way latency (default: the named profile's, else 100us)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--skip", type=int, default=None, help="steps not timed (default: the first epoch + 1)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of setting names")
    ap.add_argument("--json", default=str(OUT / "pipeline_speed.json"))
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = ap.parse_args(argv)
    if args.latency is None:
        args.latency = {"100mbit": "100us", "1gbit": "50us", "10gbit": "20us"}.get(args.link, "100us")

    names = args.only or list(SETTINGS)
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown setting(s) {sorted(unknown)}; allowed: {list(SETTINGS)}")
    dps = sorted({SETTINGS[n][0] for n in names})
    print(f"pipeline_speed: link {args.link} ({args.latency}), {args.steps} steps per run", flush=True)
    compute = {dp: run(f"{BASELINE[dp]} unthrottled", dp, SETTINGS[BASELINE[dp]][1], None, args, "unthrottled")
               for dp in dps}
    rows = {n: run(n, SETTINGS[n][0], SETTINGS[n][1], args.link, args, args.link) for n in names}

    table = {}
    for n, r in rows.items():
        dp = r["dp"]
        base = rows.get(BASELINE[dp])
        C = compute[dp]["step_time_s"]
        entry = {**r, "C_unthrottled_s": C}
        if base is not None:
            entry["speedup"] = base["step_time_s"] / r["step_time_s"]
            entry["ideal_speedup"] = (C + base["modeled_comm_s_busiest"]) / (C + r["modeled_comm_s_busiest"])
            entry["achieved_over_ideal"] = entry["speedup"] / entry["ideal_speedup"]
            entry["comm_share_uncompressed"] = base["modeled_comm_s_busiest"] / (C + base["modeled_comm_s_busiest"])
        table[n] = entry

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.link] = {"latency": args.latency, "steps": args.steps, "compute": compute, "rows": table}
    path.write_text(json.dumps(data, indent=1))
    print()
    print(format_table(args.link, table, args.latency))
    return 0


def pipeline_ideal(rows: dict, n: str, base: str, bw_bps: float, latency_s: float, n_micro: int) -> float:
    """Critical-path ideal of a link-bound 1F1B step: the backward link cannot start the last
    microbatch's gradient before its activation has arrived, so the step is about
    C + M_act + M_act_grad / n_micro + M_grad (the gradient all-reduce follows the backward).
    M per channel = 8 * bytes / bandwidth (+ latency per message) of the busiest rank."""
    def step(r):
        m = {ch: max(w[ch] for w in r["wire_bytes_per_rank"]) * 8 / bw_bps for ch in ("act", "act_grad", "grad")}
        return (r["C_unthrottled_s"] + m["act"] + m["act_grad"] / n_micro + m["grad"]
                + latency_s * (n_micro + 1))
    return step(rows[base]) / step(rows[n])


def format_table(link: str, table: dict, latency: str, n_micro: int = 4) -> str:
    from commtrain.units import parse_bandwidth, parse_latency

    head = (f"| {'setting (link ' + link + ')':<44} | step s | busiest MB/step | M s | speedup | ideal | achieved/ideal "
            f"| pipeline ideal | achieved/pipeline ideal |\n"
            f"|{'-' * 46}|-------:|----------------:|----:|--------:|------:|---------------:|---:|---:|")
    lines = [head]
    bw, lat = parse_bandwidth(link), parse_latency(latency)
    for n, r in table.items():
        base = BASELINE[r["dp"]]
        pi = pipeline_ideal(table, n, base, bw, lat, n_micro) if base in table else None
        mb = max(sum(w.values()) for w in r["wire_bytes_per_rank"]) / 1e6
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        ideal = f"{r['ideal_speedup']:.2f}x" if "ideal_speedup" in r else "-"
        ratio = f"{100 * r['achieved_over_ideal']:.0f}%" if "achieved_over_ideal" in r else "-"
        lines.append(f"| {n:<44} | {r['step_time_s']:.4f} | {mb:15.3f} | {r['modeled_comm_s_busiest']:.3f} | "
                     f"{sp:>7} | {ideal:>5} | {ratio:>14} | "
                     + (f"{pi:.2f}x | {100 * r['speedup'] / pi:.0f}% |" if pi and "speedup" in r else "- | - |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
