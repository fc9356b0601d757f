"""Pipeline step time and speedup over a simulated link: uncompressed vs direct, rotated
direct and AC-SGD activation compression (pp=2), and AC-SGD + DP gradient compression on a
pp=2 x dp=2 mesh, steady state *and* whole run (first epoch included).

One invocation = one link (run it under the CPU lock, once per link); results are merged
into one JSON file keyed by link. Every setting runs ``--repeats`` times (default 2, interleaved with the
other settings; per step the faster repeat counts, since load on the shared box only adds
time), each run ``--steps`` steps (default 24
= 3 epochs of the packaged pipeline config: 256 windows, 8 steps an epoch at pp=2). Figures:

* steady state: median step time (max over ranks per step) of the steps after the first
  epoch (+1), speedup = T_none / T_codec;
* whole run: the sum of all step times of the first ``k`` steps, speedup = sum T_none /
  sum T_codec, for ``k`` = ``--short`` (default 6: a run shorter than one epoch, where every
  visit is a sample's first and AC-SGD sends through ``compression.act_first``) and ``k`` =
  all steps (a run longer than one epoch). A ``k``-step run behaves as the first ``k`` steps of
  a longer one (only the lr schedule's horizon differs), so both come from the same run;
  process start-up and model building are not steps and are not counted;
* the **critical-path bound** T_lb per step: :func:`schedules.simulate_timing` runs the 1F1B
  schedule event by event with each forward/backward lasting its *isolated minimum* compute
  time (one thread, no communication; the fastest of this and earlier invocations), each message on its
  stage's FIFO egress link for latency + 8 * bytes / bandwidth (the bytes that step really
  sent, from the wire meter), the DP gradient reduction's modeled link seconds after the
  last backward starts, then the optimizer step; codec and AC-SGD buffer work cost nothing.
  So T_lb is a lower bound on the step under the link model, T_none / T_lb an upper bound
  on the speedup, and ``T_lb / T`` (<= 100% when the bound holds) says how much of the step
  is the unavoidable compute + link critical path. A row above 100% means the bound was
  violated (compute measured in isolation slower than in the run); it is flagged, never
  counted as success. (The former "ideal" (C + M_none) / (C + M_codec) assumed forward and
  backward transfers overlap completely, which 1F1B cannot do, and is gone.)

    flock /tmp/commtrain-cpu.lock python benchmarks/pipeline_speed.py --link 10mbit
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

from commtrain.config import CONFIG_DIR, load_config  # noqa: E402
from commtrain.demo import torchrun  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402

CONFIG = CONFIG_DIR / "pipeline.yaml"  # the packaged example config
OUT = ROOT / "benchmarks" / "out"
TRAIN_WINDOWS, BATCH, N_MICRO = 256, 32, 4  # of the packaged config (checked against the config below)

# name -> (dp, overrides). act_grad of the 4-bit direct rows is 8-bit, as in AC-SGD 4/8, so
# they differ only in the forward activations (delta vs direct vs rotated direct).
NONE = ["compression.act=none", "compression.act_grad=none", "compression.act_delta=false", "compression.grad=none"]
ROT4 = "quant:bits=4,group=128,rotate=hadamard"
SETTINGS: dict[str, tuple[int, list[str]]] = {
    "uncompressed": (1, NONE),
    "direct fwd4/bwd8": (1, ["compression.act=quant:bits=4", "compression.act_grad=quant:bits=8",
                             "compression.act_delta=false", "compression.grad=none"]),
    "rotated direct fwd4/bwd8": (1, [f"compression.act={ROT4}", "compression.act_grad=quant:bits=8",
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


# -- compute: each stage's isolated forward / backward / optimizer time --------------------------
def measure_compute(reps: int = 7) -> dict:
    """Minimum over ``reps`` of each stage's forward and backward of one microbatch and of its
    AdamW step, on one thread (as a torchrun rank), no communication: lower bounds on what
    the same work takes inside the run."""
    import torch

    from commtrain.models import build_model

    cfg = load_config(str(CONFIG))
    assert (cfg.train.batch_size, cfg.parallel.microbatches) == (BATCH, N_MICRO), "update the constants above"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model)
        stages = model.stage_modules(2)
        mb, T = BATCH // N_MICRO, cfg.train.seq_len
        x = torch.randint(0, model.vocab_size, (mb, T))
        y = torch.randint(0, model.vocab_size, (mb, T))
        out: dict = {}
        for s, stage in enumerate(stages):
            opt = torch.optim.AdamW(stage.parameters(), lr=1e-4, betas=(0.9, 0.95))
            f, b, o = [], [], []
            for _ in range(reps + 2):
                inp = x if s == 0 else torch.randn(mb, T, model.hidden_size, requires_grad=True)
                t0 = time.perf_counter()
                h = stage(inp)
                if s == 1:
                    h = model.loss(h, y) / N_MICRO
                t1 = time.perf_counter()
                if s == 1:
                    h.backward()
                else:
                    torch.autograd.backward(h, torch.randn_like(h))
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad()
                t3 = time.perf_counter()
                f.append(t1 - t0), b.append(t2 - t1), o.append(t3 - t2)
            out[s] = {"F": min(f[2:]), "B": min(b[2:]), "opt": min(o[2:])}
        return out
    finally:
        torch.set_num_threads(threads)


# -- the bound ---------------------------------------------------------------------------------
def step_bound(compute: dict, rows_by_rank: list[dict], dp: int, bw_bps: float, latency_s: float) -> float:
    """Critical-path lower bound of one step (see the module doc): per replica, the 1F1B
    schedule timed by :func:`simulate_timing` with this step's bytes per message."""
    from commtrain.parallel.pipeline.schedules import build_schedule, simulate_timing

    sched = build_schedule("1f1b", 2, N_MICRO)
    worst = 0.0
    for d in range(dp):
        ranks = {s: s * dp + d for s in range(2)}  # Mesh.global_rank(stage, dp_rank)
        channel = {"F": "act", "B": "act_grad"}

        def msg_s(a, ranks=ranks):
            nbytes = rows_by_rank[ranks[a.stage]]["wire_bytes"][channel[a.kind]] / N_MICRO
            return latency_s + 8.0 * nbytes / bw_bps

        t = simulate_timing(sched, lambda a: compute[a.stage][a.kind], msg_s)
        for s in range(2):
            row = rows_by_rank[ranks[s]]
            grad_s = (row.get("modeled_comm_s") or {}).get("grad", 0.0) or 0.0
            last_b = t.last_backward(s)
            busy = sum(msg_s(a) for a in sched[s] if a in t.arrive)
            red_end = max(t.step_s, t.start[last_b] + grad_s, busy + grad_s)
            worst = max(worst, red_end + compute[s]["opt"])
    return worst


# -- runs --------------------------------------------------------------------------------------
def read_steps(run_dir: Path, world: int) -> list[list[dict]]:
    """Per step, every rank's metrics row."""
    per_rank = []
    for r in range(world):
        rows = [x for x in read_metrics(run_dir / ("metrics.jsonl" if r == 0 else f"metrics_rank{r}.jsonl"))
                if "event" not in x]
        per_rank.append(rows)
    n = min(len(rows) for rows in per_rank)
    return [[per_rank[r][i] for r in range(world)] for i in range(n)]


def measure(steps: list[list[dict]], skip: int, short: int, compute: dict, dp: int, bw: float, lat: float) -> dict:
    if len(steps) - skip < 3:
        raise RuntimeError(f"only {len(steps)} steps, {skip} of them the first epoch; raise --steps")
    step_time = [max(r["step_time_s"] for r in st) for st in steps]
    bound = [step_bound(compute, st, dp, bw, lat) for st in steps]
    busiest = [max(sum(r["wire_bytes"].values()) for r in st) for st in steps]
    total = [sum(sum(r["wire_bytes"].values()) for r in st) for st in steps]
    return {
        "step_time_s": step_time,
        "bound_s": bound,
        "busiest_bytes": busiest,
        "total_bytes": total,
        "first_epoch_total_bytes": statistics.median(total[:skip - 1]),
        "steady_total_bytes": statistics.median(total[skip:]),
        "steady_step_s": statistics.median(step_time[skip:]),
        "steady_bound_s": statistics.median(bound[skip:]),
        "steady_busiest_bytes": statistics.median(busiest[skip:]),
        "first_epoch_busiest_bytes": statistics.median(busiest[:skip - 1]),
        "whole_short_s": sum(step_time[:short]),
        "whole_long_s": sum(step_time),
        "whole_short_bound_s": sum(bound[:short]),
        "whole_long_bound_s": sum(bound),
        "wire_bytes_per_rank_steady": [{ch: statistics.median(st[r]["wire_bytes"][ch] for st in steps[skip:])
                                        for ch in steps[0][r]["wire_bytes"]} for r in range(len(steps[0]))],
        "comm_wait_s_per_rank": [statistics.median(st[r]["comm_s"] for st in steps[skip:]) for r in range(len(steps[0]))],
        "final_loss": steps[-1][0]["loss"],
    }


def run(name: str, dp: int, sets: list[str], args, rep: int) -> tuple[Path, list[str]]:
    """One training run of a setting; returns its directory and overrides."""
    run_dir = OUT / "pipeline_speed" / args.link / f"rep{rep}" / name.replace(" ", "_").replace("/", "-").replace("+", "p")
    shutil.rmtree(run_dir, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    overrides = [f"out_dir={run_dir}", "resume=false", f"train.steps={args.steps}", "parallel.pp=2",
                 f"parallel.dp={dp}", *sets, *args.set, f"link.bandwidth={args.link}", f"link.latency={args.latency}"]
    torchrun(2 * dp, ["train", "--config", str(CONFIG), *[a for o in overrides for a in ("--set", o)]])
    return run_dir, overrides


def combine(reps: list[list[list[dict]]]) -> list[list[dict]]:
    """Per step, the repeat whose step was fastest (max over ranks): load on the shared box
    only ever adds time, and repeats of a setting are interleaved with the other settings."""
    n = min(len(r) for r in reps)
    return [min((r[i] for r in reps), key=lambda st: max(x["step_time_s"] for x in st)) for i in range(n)]


def main(argv=None) -> int:
    from commtrain.units import parse_bandwidth, parse_latency

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--link", required=True, help="bandwidth of the simulated link, e.g. 100mbit, 1gbit, 10mbit")
    ap.add_argument("--latency", default=None, help="one-way latency (default: the named profile's, else 100us)")
    ap.add_argument("--steps", type=int, default=24, help="steps per run (a run longer than one epoch)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved; per step the fastest")
    ap.add_argument("--short", type=int, default=6, help="whole-run figure of the first N steps (< one epoch)")
    ap.add_argument("--skip", type=int, default=None, help="steps not in the steady state (default: first epoch + 1)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of setting names")
    ap.add_argument("--json", default=str(OUT / "pipeline_speed.json"))
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--from-runs", action="store_true",
                    help="no training: re-read this link's run directories and the compute times in --json")
    args = ap.parse_args(argv)
    if args.latency is None:
        args.latency = {"100mbit": "100us", "1gbit": "50us", "10gbit": "20us"}.get(args.link, "100us")
    bw, lat = parse_bandwidth(args.link), parse_latency(args.latency)

    names = args.only or list(SETTINGS)
    unknown = set(names) - set(SETTINGS)
    if unknown:
        ap.error(f"unknown setting(s) {sorted(unknown)}; allowed: {list(SETTINGS)}")
    print(f"pipeline_speed: link {args.link} ({args.latency}), {args.steps} steps per run", flush=True)
    saved = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    if args.from_runs:
        measured = {int(k): v for k, v in saved[args.link].get("compute_measured", saved[args.link]["compute"]).items()}
    else:
        measured = measure_compute()
    # The isolated compute does not depend on the link: the bound uses the fastest measurement
    # of any invocation (load from other sessions can only have slowed the others down).
    compute = {s: {k: min([v] + [float(res.get("compute_measured", res["compute"])[str(s)][k])
                                 for res in saved.values() if "compute" in res])
                   for k, v in c.items()} for s, c in measured.items()}
    print("  isolated compute per microbatch (s): " + ", ".join(
        f"stage {s}: F {c['F']:.4f} B {c['B']:.4f} opt {c['opt']:.4f}" for s, c in compute.items()), flush=True)
    runs: dict[str, list] = {n: [] for n in names}
    for rep in range(args.repeats):  # interleaved: every setting once, then again
        for n in names:
            dp = SETTINGS[n][0]
            run_dir = (OUT / "pipeline_speed" / args.link / f"rep{rep}" / n.replace(" ", "_").replace("/", "-")
                       .replace("+", "p")) if args.from_runs else run(n, dp, SETTINGS[n][1], args, rep)[0]
            runs[n].append(read_steps(run_dir, 2 * dp))
    rows = {}
    for n in names:
        dp = SETTINGS[n][0]
        epoch = TRAIN_WINDOWS // (BATCH * dp)  # steps per epoch (each replica walks its own shard)
        skip = args.skip if args.skip is not None else epoch + 1
        rows[n] = measure(combine(runs[n]), skip, args.short, compute, dp, bw, lat)
        rows[n].update(dp=dp, overrides=SETTINGS[n][1], skip=skip, steps_per_epoch=epoch, repeats=args.repeats,
                       step_time_s_per_repeat=[[max(x["step_time_s"] for x in st) for st in r] for r in runs[n]])
        print(f"  {n:<40} steady {rows[n]['steady_step_s']:.4f}s (bound {rows[n]['steady_bound_s']:.4f}s)  "
              f"whole {rows[n]['whole_long_s']:.2f}s", flush=True)

    table = {}
    for n, r in rows.items():
        base = rows.get(BASELINE[r["dp"]])
        entry = dict(r)
        if base is not None:
            entry["steady_speedup"] = base["steady_step_s"] / r["steady_step_s"]
            entry["steady_speedup_max"] = base["steady_step_s"] / r["steady_bound_s"]
            entry["whole_short_speedup"] = base["whole_short_s"] / r["whole_short_s"]
            entry["whole_long_speedup"] = base["whole_long_s"] / r["whole_long_s"]
        entry["bound_over_measured_steady"] = r["steady_bound_s"] / r["steady_step_s"]
        entry["bound_violations"] = sum(b > t for b, t in zip(r["bound_s"], r["step_time_s"]))
        table[n] = entry

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.link] = {"latency": args.latency, "steps": args.steps, "short": args.short, "compute": compute,
                       "compute_measured": measured,
                       "repeats": args.repeats,
                       "rows": table}
    path.write_text(json.dumps(data, indent=1))
    print()
    print(format_table(args.link, data[args.link]))
    return 0


def format_table(link: str, res: dict) -> str:
    """The markdown table of one link's results (as written to the JSON)."""
    short, steps = res["short"], res["steps"]
    lines = [
        f"| setting (link {link}, {res['latency']}) | MB/step 1st epoch | MB/step later | steady step s | "
        f"bound s | T_lb/T | steady speedup | max (T_none/T_lb) | whole run {short} steps | whole run {steps} steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in res["rows"].items():
        def x(k):
            return f"{r[k]:.2f}x" if k in r else "-"
        flag = "" if r["bound_over_measured_steady"] <= 1 else " (bound violated)"
        lines.append(
            f"| {n} | {r['first_epoch_total_bytes'] / 1e6:.3f} | {r['steady_total_bytes'] / 1e6:.3f} | "
            f"{r['steady_step_s']:.4f} | {r['steady_bound_s']:.4f} | {100 * r['bound_over_measured_steady']:.0f}%{flag} | "
            f"{x('steady_speedup')} | {x('steady_speedup_max')} | {x('whole_short_speedup')} | {x('whole_long_speedup')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
