"""compression.policy=auto vs every fixed codec, per link, simulated and real (issue 11).

    flock /tmp/commtrain-cpu.lock python benchmarks/adaptive.py --link 1gbit --mode sim
    sudo flock /tmp/commtrain-cpu.lock python benchmarks/adaptive.py --link 1gbit --mode real
    python benchmarks/adaptive.py --report          # results/adaptive.md from results/adaptive.json

One invocation = one link, all its rows: ``none`` (raw fp32 all-reduce), ``auto``
(``compression.grad=quant:bits=4`` as the preferred codec, ``policy=auto``, the default
candidate list), and each candidate pinned (``policy=always``): fp16, quant:bits=8,
quant:bits=4, powersgd:rank=4. On unthrottled / 10gbit ``none`` and ``auto`` run twice,
interleaved (first and last), and their figure is the mean of the two medians. Every run: the packaged demo config,
gpt-micro (3.3M params, 4 MiB buckets), 2 ranks, batch 8 x 64, ``--steps`` steps (30); the figure
is the median step time over the steps after ``--skip`` (auto decides at step 3 and again
every 10 steps).

``--mode sim``: torchrun on loopback with ``link.profile=<link>`` (the simulated link; the
``unthrottled`` link configures no link model at all). ``--mode real``: two network
namespaces joined by a real ``tc tbf``-shaped veth (``launch/netns.py --rate``; unthrottled:
no qdisc), *no* link model configured: auto measures what it gets.

Targets: unthrottled / 10gbit: auto <= 3% slower than none; 1gbit / 100mbit: auto within 10%
of the best fixed row of that link.
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

from commtrain.config import CONFIG_DIR  # noqa: E402
from commtrain.demo import free_port  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402

NETNS = ROOT / "launch" / "netns.py"
CONFIG = CONFIG_DIR / "demo.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "adaptive.json"
REPORT = ROOT / "benchmarks" / "results" / "adaptive.md"
NOTES = ROOT / "benchmarks" / "results" / "adaptive_notes.md"
SCRATCH = ROOT / "benchmarks" / "out" / "adaptive"
LINKS = ("unthrottled", "10gbit", "1gbit", "100mbit")
FIXED = ("fp16", "quant:bits=8", "quant:bits=4", "powersgd:rank=4")
PREFIX = "cta"


def rows_in_order(link: str, pairs: int = 2) -> list[tuple[str, list[str]]]:
    """(row name, compression sets), in run order. On the fast links (a 3% target) none and auto
    run as ``pairs`` interleaved pairs (first and last around the fixed rows: none auto ...
    auto#2 none#2, then none#3 auto#3 ...); their figure is the median of the per-pair ratios."""
    fixed = [(c, [f"compression.grad={c}", "compression.policy=always"]) for c in FIXED]
    none = ("none", ["compression.grad=none"])
    auto = ("auto", ["compression.grad=quant:bits=4", "compression.policy=auto", "compression.redecide_every=10"])
    if link in ("unthrottled", "10gbit"):
        more = []
        for k in range(3, pairs + 1):
            a, b = (none, auto) if k % 2 else (auto, none)
            more += [(f"{a[0]}#{k}", a[1]), (f"{b[0]}#{k}", b[1])]
        return [none, auto, *fixed, (auto[0] + "#2", auto[1]), (none[0] + "#2", none[1]), *more]
    return [none, auto, *fixed]


def sets(out_dir: Path, link: str | None, steps: int, extra: list[str]) -> list[str]:
    shutil.rmtree(out_dir, ignore_errors=True)
    s = [f"out_dir={out_dir}", "resume=never", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
         "train.progress=false", "model.preset=gpt-micro", "train.batch_size=8", "train.seq_len=64",
         f"link.profile={link or 'null'}", "compression.warmup_steps=0", "compression.error_feedback=true",
         "timeout_s=300", *extra]
    return [a for x in s for a in ("--set", x)]


def summarize(out_dir: Path, skip: int) -> dict:
    rows = read_metrics(out_dir / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r][skip:]
    decisions = [r for r in rows if r.get("event") == "compression_decision"]
    every = [r for r in rows if "event" not in r]
    return {"step_time_s": statistics.median(r["step_time_s"] for r in steps),
            "whole_run_s": sum(r["step_time_s"] for r in every),  # every step: start-up and decisions included
            "comm_s": statistics.median(r["comm_s"] for r in steps),
            "grad_bytes_per_step": statistics.median(r["wire_bytes"]["grad"] for r in steps),
            "steps": len(steps), "decisions": decisions}


def run(mode: str, link: str, name: str, extra: list[str], steps: int, skip: int) -> dict:
    out_dir = SCRATCH / f"{mode}_{link}_{name}".replace(":", "_").replace("=", "").replace("#", "_")
    sim_link = None if link == "unthrottled" else link
    if mode == "sim":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "commtrain", "train", "--config", str(CONFIG),
               *sets(out_dir, sim_link, steps, extra)]
    else:
        rate = [] if link == "unthrottled" else ["--rate", link]
        cmd = [sys.executable, str(NETNS), "--prefix", PREFIX, "--nproc", "2", *rate, "--timeout", "400", "--",
               sys.executable, "-m", "commtrain", "train", "--config", str(CONFIG), *sets(out_dir, None, steps, extra)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise RuntimeError(f"{mode} {link} {name} failed ({r.returncode}): {r.stderr[-3000:]}")
    return summarize(out_dir, skip) | {"command": " ".join(str(c) for c in cmd[1:])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--link", choices=LINKS)
    ap.add_argument("--mode", choices=("sim", "real"), default="sim")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=6, help="steps left out of the median (start-up, first decision)")
    ap.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    ap.add_argument("--pairs", type=int, default=2, help="unthrottled/10gbit: interleaved none/auto pairs")
    ap.add_argument("--report", action="store_true", help="write results/adaptive.md from the JSON")
    args = ap.parse_args(argv)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.link:
        if args.mode == "real" and os.geteuid() != 0:
            print("adaptive: --mode real needs root (network namespaces, tc)", file=sys.stderr)
            return 2
        only = set(args.only.split(",")) if args.only else None
        invocation = ("sudo " if args.mode == "real" else "") + "flock /tmp/commtrain-cpu.lock python " \
            "benchmarks/adaptive.py " + " ".join(argv if argv is not None else sys.argv[1:])
        for name, extra in rows_in_order(args.link, args.pairs):
            if only and name.split("#")[0] not in only:
                continue
            t0 = time.time()
            res = run(args.mode, args.link, name, extra, args.steps, args.skip)
            data.setdefault(f"{args.mode}|{args.link}", {})[name] = res
            inv = data[f"{args.mode}|{args.link}"].setdefault("_invocations", [])
            if not inv or inv[-1] != invocation:
                inv.append(invocation)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(data, indent=1))
            print(f"{args.mode} {args.link} {name}: {res['step_time_s'] * 1e3:.1f} ms/step "
                  f"({time.time() - t0:.0f} s)", flush=True)
    if args.report or not args.link:
        REPORT.write_text(report(data))
        print(f"wrote {REPORT}")
    return 0


def _repeats(runs: dict, name: str) -> list[str]:
    return [k for k in runs if k == name or k.startswith(name + "#")]


def _fig(runs: dict, name: str) -> float | None:
    vals = [runs[k]["step_time_s"] for k in _repeats(runs, name)]
    return statistics.median(vals) if vals else None


def _paired(runs: dict) -> list[float]:
    """auto / none of each interleaved pair (same suffix)."""
    return [runs[a]["step_time_s"] / runs["none" + a[4:]]["step_time_s"]
            for a in _repeats(runs, "auto") if "none" + a[4:] in runs]


def verdicts(data: dict) -> list[dict]:
    out = []
    for key, runs in data.items():
        mode, link = key.split("|")
        auto, none = _fig(runs, "auto"), _fig(runs, "none")
        if auto is None or none is None:
            continue
        fixed = {n: runs[n]["step_time_s"] for n in FIXED if n in runs} | {"none": none}
        best = min(fixed, key=fixed.get)
        pr = _paired(runs)
        if link in ("unthrottled", "10gbit") and len(pr) >= 2:
            ratio, target, vs = statistics.median(pr), 1.03, f"none (median of {len(pr)} paired ratios, " \
                f"{min(pr):.3f}..{max(pr):.3f})"
        elif link in ("unthrottled", "10gbit"):
            ratio, target, vs = auto / none, 1.03, "none"
        else:
            ratio, target, vs = auto / fixed[best], 1.10, f"best fixed ({best})"
        pair = [runs[k]["step_time_s"] for k in _repeats(runs, "none")]
        spread = (max(pair) - min(pair)) / statistics.median(pair) if len(pair) >= 2 else None
        out.append({"mode": mode, "link": link, "auto_ms": auto * 1e3, "vs": vs, "ratio": ratio, "target": target,
                    "met": ratio <= target, "none_spread": spread})
    return out


def report(data: dict) -> str:
    lines = ["# Adaptive compression (`compression.policy=auto`, issue 11)", "",
             "Median step time (ms) of gpt-micro, 2 ranks, batch 8 x 64, steps after the first 6 of 30; "
             "on unthrottled / 10gbit `none` and `auto` ran as interleaved pairs (`--pairs`; the first pair first, "
             "the second last, the rest after) and each cell is the median of their runs; their target is judged on "
             "the median of the per-pair ratios auto/none (pairing cancels the box's drift). "
             "`auto` = `compression.grad=quant:bits=4 compression.policy=auto` (default candidates: none, fp16, "
             "quant:bits=8, quant:bits=4, powersgd:rank=4); the fixed rows pin a codec with "
             "`compression.policy=always`. *sim*: loopback + the simulated link (`link.profile`; unthrottled = no "
             "link model); *real*: two network namespaces over a `tc tbf`-shaped veth (`launch/netns.py`), no link "
             "model configured.", "",
             "| mode | link | none | auto | fp16 | quant:bits=8 | quant:bits=4 | powersgd:rank=4 | auto chose |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, runs in data.items():
        mode, link = key.split("|")
        cells = []
        for n in ("none", "auto", *FIXED):
            v = _fig(runs, n) if n in ("none", "auto") else (runs[n]["step_time_s"] if n in runs else None)
            cells.append("-" if v is None else f"{v * 1e3:.1f}")
        dec = (runs.get("auto") or {}).get("decisions") or []
        chose = dec[-1]["summary"] if dec else "-"
        lines.append(f"| {mode} | {link} | " + " | ".join(cells) + f" | {chose} |")
    lines += ["", "## Targets", "", "`none` spread: (max - min) / median of the `none` runs "
              "(run-to-run noise of this shared box, for scale).", "",
              "| mode | link | target | auto ms | ratio | met? | none spread |", "|---|---|---|---:|---:|---|---:|"]
    for v in verdicts(data):
        sp = "-" if v["none_spread"] is None else f"{100 * v['none_spread']:.1f}%"
        lines.append(f"| {v['mode']} | {v['link']} | auto <= {v['target']:.2f} x {v['vs']} | {v['auto_ms']:.1f} | "
                     f"{v['ratio']:.3f} | {'met' if v['met'] else '**missed**'} | {sp} |")
    lines += ["", "## Whole run", "", "Sum of all 30 step times (s): the first steps, the probe and every decision's "
              "rehearsals included (auto re-decides every 10 steps here; the default is 25). Medians over the repeats.", "",
              "| mode | link | none | auto | auto / none | best fixed | auto / best fixed |", "|---|---|---:|---:|---:|---|---:|"]
    for key, runs in data.items():
        mode, link = key.split("|")
        whole = {n: statistics.median(runs[k]["whole_run_s"] for k in _repeats(runs, n) if "whole_run_s" in runs[k])
                 for n in ("none", "auto", *FIXED) if any("whole_run_s" in runs[k] for k in _repeats(runs, n))}
        if "none" not in whole or "auto" not in whole:
            continue
        fixed = {n: v for n, v in whole.items() if n != "auto"}
        best = min(fixed, key=fixed.get)
        lines.append(f"| {mode} | {link} | {whole['none']:.2f} | {whole['auto']:.2f} | {whole['auto'] / whole['none']:.3f} | "
                     f"{best} {fixed[best]:.2f} | {whole['auto'] / fixed[best]:.3f} |")
    lines += ["", "## Decision tables (auto, last decision of the first auto run)", "",
              "Per bucket: slack = how long before the end of backward its reduction started (EMA, the group's "
              "least); per candidate `codec+link=exposed` ms: measured codec time on this CPU, link time on the "
              "measured link, and the step's exposed communication with this bucket on that codec.", ""]
    from commtrain.parallel.policy import format_table

    for key, runs in data.items():
        dec = (runs.get("auto") or {}).get("decisions") or []
        if not dec:
            continue
        d = dec[-1]
        link = d["link"]
        bw = link.get("bandwidth_bps")
        lines += [f"**{key}** (decision at step {d['step']}, measured link "
                  f"{'inf' if bw is None else f'{bw / 1e6:.0f} Mbit/s'}, "
                  f"{link['latency_s'] * 1e6:.0f} us/round, {link['observed']} ops observed; exposed "
                  f"{d['exposed_ms']:.1f} ms vs all raw {d['exposed_raw_ms']:.1f} ms)", "", "```",
                  format_table(_rows(d["table"])), "```", ""]
    lines += ["Commands (one invocation per link and mode, each under `flock /tmp/commtrain-cpu.lock`):", "", "```"]
    for key, runs in data.items():
        mode, link = key.split("|")
        lines += runs.get("_invocations") or [
            f"{'sudo ' if mode == 'real' else ''}flock /tmp/commtrain-cpu.lock python benchmarks/adaptive.py "
            f"--mode {mode} --link {link} --steps 30 --skip 6"]
    lines += ["python benchmarks/adaptive.py --report", "```", ""]
    if NOTES.exists():  # the reading of these numbers, written by hand beside the generated table
        lines += [NOTES.read_text()]
    return "\n".join(lines)


def _rows(table: list[dict]) -> list[dict]:
    """Public (JSON) rows back into the shape policy.format_table reads."""
    out = []
    for r in table:
        out.append({"bucket": r["bucket"], "numel": r["numel"], "slack_s": r["slack_ms"] / 1e3,
                    "times": {s: (c["codec_ms"] / 1e3, c["link_ms"] / 1e3) for s, c in r["candidates"].items()},
                    "exposed_ms": {s: c["exposed_ms"] for s, c in r["candidates"].items()},
                    "chosen": r["chosen"], "why": r["why"]})
    return out


if __name__ == "__main__":
    sys.exit(main())
