"""Simulated link (LinkModel) vs a real tc-shaped link (network namespaces), same training run.

    sudo flock /tmp/commtrain-cpu.lock python benchmarks/link_compare.py --rates 100mbit
    sudo flock /tmp/commtrain-cpu.lock python benchmarks/link_compare.py --rates 1gbit

For each rate: (1) ``launch/netns.py --measure``: achieved TCP bandwidth of one stream over
the shaped veth; (2) the trainer (the packaged demo config with ``--model``, default
gpt-mini: 10.9M parameters, 2 ranks, batch 8 x 64) under torchrun on loopback with the
*simulated* link profile, once per ``--framings`` (``tcp``: the calibrated link model, which
charges TCP/IP/Ethernet headers per segment as the shaper does; ``none``: the model before
calibration); (3) the same trainer in two network namespaces joined by the *real* ``tc tbf``
link, no simulated throttle (``link.profile=null``), ranks rendezvousing over the namespace
addresses. Reports median step times (steps after ``--skip``; per step the fastest of
``--repeats`` interleaved runs, since load from other processes only adds time), the bytes the ranks metered
and the bytes eth0 really transmitted, and per cell whether simulated (tcp framing) and real
agree within ``--tolerance`` (5%). Where benchmarks/out/perfmodel_validation.json holds a
calibration, also the throughput model's prediction for both links.

Needs root (namespaces, tc); exits with a message otherwise. Raw: benchmarks/out/link_compare.json.
"""
from __future__ import annotations

import argparse
import shutil
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from commtrain.config import CONFIG_DIR  # noqa: E402
from commtrain.demo import free_port  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402

NETNS = ROOT / "launch" / "netns.py"
CONFIG = CONFIG_DIR / "demo.yaml"  # the packaged example config
OUT = ROOT / "benchmarks" / "out" / "link_compare.json"
PREFIX = "ctb"


MODEL = "gpt-mini"
BURST: list[str] = []  # ["--burst-ms", X] for launch/netns.py (--burst-ms)
SKIP = 3


def train_sets(out_dir: Path, link: str | None, codec: str, steps: int, framing: str | None = None) -> list[str]:
    shutil.rmtree(out_dir, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = [f"out_dir={out_dir}", "resume=false", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
            "train.progress=false", f"model.preset={MODEL}", "train.batch_size=8", "train.seq_len=64",
            f"link.profile={link or 'null'}", f"compression.grad={codec}", "compression.error_feedback=true",
            "compression.warmup_steps=0", "compression.policy=always", "timeout_s=300"]
    sets += [f"link.framing={framing}"] if framing else []
    return [a for s in sets for a in ("--set", s)]


def summarize(out_dir: Path, skip: int | None = None) -> dict:
    skip = SKIP if skip is None else skip
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "event" not in r][skip:]
    return {"step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "step_times_s": [r["step_time_s"] for r in rows],
            "comm_s": statistics.median(r["comm_s"] for r in rows),
            "compute_s": statistics.median(r["compute_s"] for r in rows),
            "modeled_grad_s": statistics.median((r.get("modeled_comm_s") or {}).get("grad", 0.0) for r in rows),
            "grad_bytes_per_step": statistics.median(r["wire_bytes"]["grad"] for r in rows),
            "steps": len(rows)}


def run_simulated(rate: str, codec: str, steps: int, out_dir: Path, framing: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "commtrain", "train", "--config", str(CONFIG),
           *train_sets(out_dir, rate, codec, steps, framing)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return summarize(out_dir) | {"command": " ".join(cmd[1:])}


def run_real(rate: str, codec: str, steps: int, out_dir: Path) -> dict:
    cmd = [sys.executable, str(NETNS), "--prefix", PREFIX, "--nproc", "2", "--rate", rate, *BURST, "--timeout", "300",
           "--",
           sys.executable, "-m", "commtrain", "train", "--config", str(CONFIG), *train_sets(out_dir, None, codec, steps)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise RuntimeError(f"netns run failed ({r.returncode}): {r.stderr[-2000:]}")
    stats = json.loads(r.stderr.split("netns-stats ")[1].splitlines()[0])
    all_steps = len([x for x in read_metrics(out_dir / "metrics.jsonl") if "event" not in x])
    return summarize(out_dir) | {"command": " ".join(cmd[1:]), "tx_bytes_rank0": stats["tx_bytes"]["0"],
                                 "tx_bytes_per_step": stats["tx_bytes"]["0"] / all_steps}


def combine(results: list[dict]) -> dict:
    """Repeats of one variant: per step, the fastest repeat (load from other processes on the
    shared box only adds time), then the median over steps."""
    n = min(len(r["step_times_s"]) for r in results)
    best = [min(r["step_times_s"][i] for r in results) for i in range(n)]
    return {**results[-1], "step_time_s": statistics.median(best), "step_times_s": best,
            "step_time_s_per_repeat": [r["step_time_s"] for r in results]}


def measure(rate: str, seconds: float) -> dict:
    r = subprocess.run([sys.executable, str(NETNS), "--prefix", PREFIX, "--nproc", "2", "--rate", rate, *BURST, "--measure",
                        "--seconds", str(seconds)], capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"netns --measure failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def predictions(rate: str, codec: str) -> dict | None:
    path = ROOT / "benchmarks" / "out" / "perfmodel_validation.json"
    if not path.exists():
        return None
    import perfmodel_validation as pv

    cal = json.loads(path.read_text()).get("calibration")
    if cal is None:
        return None
    return {"simulated": pv.predict(cal, rate, codec).step_s, "real": pv.predict(cal, f"{rate},0s", codec).step_s}


def main(argv=None) -> int:
    global MODEL, SKIP, BURST
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="100mbit,1gbit")
    ap.add_argument("--codecs", default="none;quant:bits=4,group=128", help="';'-separated gradient codecs")
    ap.add_argument("--framings", default="tcp,none", help="link.framing of the simulated runs (the first is judged)")
    ap.add_argument("--model", default=MODEL, help="model.preset (default gpt-mini, 10.9M parameters)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved; per step the fastest")
    ap.add_argument("--skip", type=int, default=SKIP, help="steps not timed")
    ap.add_argument("--tolerance", type=float, default=0.05, help="target |real / simulated - 1|")
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each bandwidth measurement")
    ap.add_argument("--json", default=str(OUT), help="results file (merged by rate and codec)")
    ap.add_argument("--burst-ms", type=float, default=None, help="the real link's tbf bucket (launch/netns.py --burst-ms)")
    args = ap.parse_args(argv)
    out = Path(args.json)
    MODEL, SKIP = args.model, args.skip
    BURST = [] if args.burst_ms is None else ["--burst-ms", str(args.burst_ms)]
    framings = [f for f in args.framings.split(",") if f]
    if os.geteuid() != 0:
        print("link_compare: needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    data = json.loads(out.read_text()) if out.exists() else {}
    if data.get("model") != args.model:  # results of another model are not comparable: start over
        data = {"model": args.model, "measure": {}, "runs": {}}
    data["tolerance"], data["repeats"], data["steps"], data["skip"] = args.tolerance, args.repeats, args.steps, args.skip
    data["burst_ms"] = args.burst_ms  # None: launch/netns.py's default bucket
    for rate in filter(None, args.rates.split(",")):
        data["measure"][rate] = measure(rate, args.seconds)
        print(f"{rate}: achieved {data['measure'][rate]['mbit_s']:.1f} Mbit/s", flush=True)
        for codec in filter(None, args.codecs.split(";")):
            tag = f"{args.model}_{rate}_{codec}".replace(":", "_").replace(",", "_").replace("=", "")
            t0 = time.time()
            lc = ROOT / "benchmarks" / "out" / "lc"
            reps: dict[str, list[dict]] = {}
            for rep in range(args.repeats):  # interleaved: every variant once, then again
                for f in framings:
                    reps.setdefault(f, []).append(run_simulated(rate, codec, args.steps, lc / f"sim_{f}_{tag}", f))
                reps.setdefault("real", []).append(run_real(rate, codec, args.steps, lc / f"real_{tag}"))
            sims = {f: combine(reps[f]) for f in framings}
            real = combine(reps["real"])
            sim = sims[framings[0]]
            data["runs"][f"{rate}|{codec}"] = {"rate": rate, "codec": codec, "simulated": sim, "framing": framings[0],
                                                "simulated_by_framing": sims, "real": real,
                                                "predicted": predictions(rate, codec),
                                                "met": abs(real["step_time_s"] / sim["step_time_s"] - 1) <= args.tolerance}
            print(f"  {codec}: simulated " + ", ".join(f"{f} {s['step_time_s'] * 1e3:.0f} ms" for f, s in sims.items())
                  + f"; real {real['step_time_s'] * 1e3:.0f} ms ({time.time() - t0:.0f} s)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=1))
    print(table(data))
    return 0


def table(data: dict) -> str:
    tol = data.get("tolerance", 0.05)
    lines = ["| rate | tc measured Mbit/s (TCP, 1 stream) | grad codec | simulated step ms (tcp framing) | "
             "simulated ms (no framing) | real tc step ms | real/sim | within " + f"{100 * tol:.0f}%" + " | "
             "grad MB/step metered | eth0 MB/step (rank 0) |",
             "|---|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in data["runs"].values():
        m = data["measure"].get(r["rate"], {})
        s, t = r["simulated"], r["real"]
        old = r.get("simulated_by_framing", {}).get("none")
        ratio = t["step_time_s"] / s["step_time_s"]
        lines.append(f"| {r['rate']} | {m.get('mbit_s', float('nan')):.1f} | {r['codec']} | {s['step_time_s'] * 1e3:.0f} | "
                     f"{old['step_time_s'] * 1e3:.0f} | " if old else "- | ")
        lines[-1] += (f"{t['step_time_s'] * 1e3:.0f} | {ratio:.3f} | {'met' if abs(ratio - 1) <= tol else 'missed'} | "
                      f"{s['grad_bytes_per_step'] / 1e6:.2f} | {t['tx_bytes_per_step'] / 1e6:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
