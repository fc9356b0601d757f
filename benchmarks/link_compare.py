"""Simulated link (LinkModel) vs a real tc-shaped link (network namespaces), same training run.

    sudo python benchmarks/link_compare.py                     # 100mbit and 1gbit, codecs none and quant 4-bit
    sudo python benchmarks/link_compare.py --rates 100mbit --codecs none

For each rate: (1) ``launch/netns.py --measure``: achieved TCP bandwidth of one stream over
the shaped veth; (2) the trainer (the packaged demo config: gpt-micro, 2 ranks, batch 8 x 64) under
torchrun on loopback with the *simulated* link profile; (3) the same trainer in two network
namespaces joined by the *real* ``tc tbf`` link, no simulated throttle (``link.profile=null``),
ranks rendezvousing over the namespace addresses. Reports median step times, the bytes the
ranks metered and the bytes eth0 really transmitted (TCP/IP headers included), and where
benchmarks/out/perfmodel_validation.json holds a calibration, the throughput model's
prediction for both links (the real one with the link's rate and no added latency).

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


def train_sets(out_dir: Path, link: str | None, codec: str, steps: int) -> list[str]:
    shutil.rmtree(out_dir, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = [f"out_dir={out_dir}", "resume=false", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
            "train.progress=false", "model.preset=gpt-micro", "train.batch_size=8", "train.seq_len=64",
            f"link.profile={link or 'null'}", f"compression.grad={codec}", "compression.error_feedback=true",
            "compression.warmup_steps=0", "timeout_s=120"]
    return [a for s in sets for a in ("--set", s)]


def summarize(out_dir: Path, skip: int = 3) -> dict:
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "event" not in r][skip:]
    return {"step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "comm_s": statistics.median(r["comm_s"] for r in rows),
            "grad_bytes_per_step": statistics.median(r["wire_bytes"]["grad"] for r in rows),
            "steps": len(rows)}


def run_simulated(rate: str, codec: str, steps: int, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "commtrain", "train", "--config", str(CONFIG),
           *train_sets(out_dir, rate, codec, steps)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return summarize(out_dir) | {"command": " ".join(cmd[1:])}


def run_real(rate: str, codec: str, steps: int, out_dir: Path) -> dict:
    cmd = [sys.executable, str(NETNS), "--prefix", PREFIX, "--nproc", "2", "--rate", rate, "--timeout", "300", "--",
           sys.executable, "-m", "commtrain", "train", "--config", str(CONFIG), *train_sets(out_dir, None, codec, steps)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if r.returncode:
        raise RuntimeError(f"netns run failed ({r.returncode}): {r.stderr[-2000:]}")
    stats = json.loads(r.stderr.split("netns-stats ")[1].splitlines()[0])
    all_steps = len([x for x in read_metrics(out_dir / "metrics.jsonl") if "event" not in x])
    return summarize(out_dir) | {"command": " ".join(cmd[1:]), "tx_bytes_rank0": stats["tx_bytes"]["0"],
                                 "tx_bytes_per_step": stats["tx_bytes"]["0"] / all_steps}


def measure(rate: str, seconds: float) -> dict:
    r = subprocess.run([sys.executable, str(NETNS), "--prefix", PREFIX, "--nproc", "2", "--rate", rate, "--measure",
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="100mbit,1gbit")
    ap.add_argument("--codecs", default="none;quant:bits=4,group=128", help="';'-separated gradient codecs")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each bandwidth measurement")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("link_compare: needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    data = json.loads(OUT.read_text()) if OUT.exists() else {"measure": {}, "runs": {}}
    for rate in filter(None, args.rates.split(",")):
        data["measure"][rate] = measure(rate, args.seconds)
        print(f"{rate}: achieved {data['measure'][rate]['mbit_s']:.1f} Mbit/s", flush=True)
        for codec in filter(None, args.codecs.split(";")):
            tag = f"{rate}_{codec}".replace(":", "_").replace(",", "_").replace("=", "")
            t0 = time.time()
            sim = run_simulated(rate, codec, args.steps, ROOT / "benchmarks" / "out" / "lc" / f"sim_{tag}")
            real = run_real(rate, codec, args.steps, ROOT / "benchmarks" / "out" / "lc" / f"real_{tag}")
            data["runs"][f"{rate}|{codec}"] = {"rate": rate, "codec": codec, "simulated": sim, "real": real,
                                                "predicted": predictions(rate, codec)}
            print(f"  {codec}: simulated {sim['step_time_s'] * 1e3:.0f} ms, real {real['step_time_s'] * 1e3:.0f} ms "
                  f"({time.time() - t0:.0f} s)", flush=True)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(data, indent=1))
    print(table(data))
    return 0


def table(data: dict) -> str:
    lines = ["| rate | tc measured Mbit/s (TCP, 1 stream) | grad codec | simulated step ms | real tc step ms | real/sim | "
             "predicted sim / real ms | grad MB/step metered | eth0 MB/step (rank 0) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["runs"].values():
        m = data["measure"].get(r["rate"], {})
        s, t, p = r["simulated"], r["real"], r.get("predicted")
        pred = "-" if not p else f"{p['simulated'] * 1e3:.0f} / {p['real'] * 1e3:.0f}"
        lines.append(f"| {r['rate']} | {m.get('mbit_s', float('nan')):.1f} | {r['codec']} | {s['step_time_s'] * 1e3:.0f} | "
                     f"{t['step_time_s'] * 1e3:.0f} | {t['step_time_s'] / s['step_time_s']:.2f} | {pred} | "
                     f"{s['grad_bytes_per_step'] / 1e6:.2f} | {t['tx_bytes_per_step'] / 1e6:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
