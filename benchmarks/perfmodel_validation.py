"""Validate the throughput model against real throttled training runs.

    python benchmarks/perfmodel_validation.py --calibrate                # once per machine
    python benchmarks/perfmodel_validation.py --links 100mbit            # runs; appends to the JSON
    python benchmarks/perfmodel_validation.py --links 1gbit
    python benchmarks/perfmodel_validation.py --report                   # table -> benchmarks/results/perfmodel.md

Every run is the built-in trainer (the packaged ``demo`` config: gpt-micro, 2 data-parallel ranks
under torchrun on loopback, batch 8 x 64 tokens per rank) on a simulated link, with one
gradient codec. Its measured median step time is compared with
:func:`commtrain.perfmodel.predict_step` fed only numbers measured once on this machine
(``--calibrate``), never per configuration:

* ``compute_s_measured``: median step time of an *unthrottled* fp32 run of the same config;
* ``optimizer_s``: gradient clipping + AdamW step + zero_grad on the model, timed here on one
  thread (torchrun runs each rank with ``OMP_NUM_THREADS=1``);
* ``codec_speed``: every codec's compress (with error feedback, as the reducer wraps it) and
  decompress speed on a chunk-sized tensor, one thread;
* ``codec_shares_compute``: True when the ranks' main and reducer threads outnumber the cores
  (then codec work and backward share a core).

Raw results: benchmarks/out/perfmodel_validation.json (merged across invocations).
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

import torch  # noqa: E402

from commtrain.comm import resolve_link  # noqa: E402
from commtrain.compress import build_codec  # noqa: E402
from commtrain.config import CONFIG_DIR  # noqa: E402
from commtrain.demo import free_port  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402
from commtrain.perfmodel import CodecSpeed, measure_codec_speed, predict_step  # noqa: E402

CONFIG = CONFIG_DIR / "demo.yaml"  # the packaged example config
OUT = ROOT / "benchmarks" / "out" / "perfmodel_validation.json"
RESULTS = ROOT / "benchmarks" / "results"
CODECS = ["none", "fp16", "quant:bits=4,group=128", "topk:ratio=0.01"]
NPROC, BATCH, SEQ, PRESET = 2, 8, 64, "gpt-micro"


def policy_supported() -> bool:
    from commtrain.config import CompressionConfig

    return "policy" in CompressionConfig.__dataclass_fields__


def train_run(name: str, link: str | None, codec: str, steps: int) -> dict:
    """One torchrun training run; returns the medians of rank 0's per-step metrics."""
    out_dir = ROOT / "benchmarks" / "out" / "pv" / name
    shutil.rmtree(out_dir, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = [
        f"out_dir={out_dir}", "resume=false", f"train.steps={steps}", "train.eval_every=0", "train.eval_batches=1",
        "train.progress=false", f"train.batch_size={BATCH}", f"train.seq_len={SEQ}", f"model.preset={PRESET}",
        f"link.profile={link if link else 'null'}", f"compression.grad={codec}", "compression.error_feedback=true",
        "compression.warmup_steps=0",
    ]
    if policy_supported():
        sets.append("compression.policy=always")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NPROC}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "commtrain", "train", "--config", str(CONFIG),
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if "event" not in r]
    return summarize(rows) | {"command": " ".join(cmd[1:]), "wall_s": time.time() - t0}


def summarize(rows: list[dict], skip: int = 3) -> dict:
    timed = rows[skip:]
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    return {
        "steps_timed": len(timed),
        "step_time_s": med("step_time_s"),
        "step_time_s_all": [r["step_time_s"] for r in timed],
        "compute_s": med("compute_s"),
        "comm_s": med("comm_s"),
        "grad_bytes": statistics.median(r["wire_bytes"].get("grad", 0) for r in timed),
        "modeled_comm_s": statistics.median((r.get("modeled_comm_s") or {}).get("grad", 0.0) for r in timed),
    }


def optimizer_seconds(repeats: int = 7) -> float:
    """Clip + AdamW step + zero_grad on the model's parameters, one thread (as in a rank)."""
    from commtrain.models import ModelConfig, build_model

    model = build_model(ModelConfig(preset=PRESET))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    times = []
    for _ in range(repeats + 1):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def calibrate(steps: int) -> dict:
    torch.set_num_threads(1)
    print("calibration: unthrottled fp32 run ...", flush=True)
    base = train_run("calib_unthrottled_none", None, "none", steps)
    speeds = {}
    for spec in CODECS:
        # The reducer's chunks: a 4 MiB bucket split in 2 -> 2^19 fp32 elements.
        runs = [measure_codec_speed(spec, numel=1 << 19, repeats=5) for _ in range(3)]
        speeds[build_codec(spec).spec] = {
            "encode_gbps": statistics.median(r.encode_gbps for r in runs),
            "decode_gbps": statistics.median(r.decode_gbps for r in runs),
        }
        print(f"  {spec:<26} encode {speeds[build_codec(spec).spec]['encode_gbps']:.3f} GB/s  "
              f"decode {speeds[build_codec(spec).spec]['decode_gbps']:.3f} GB/s", flush=True)
    opt_s = optimizer_seconds()
    cal = {
        "compute_s_measured": base["step_time_s"], "optimizer_s": opt_s, "codec_speed": speeds,
        "codec_shares_compute": (os.cpu_count() or 1) < 2 * NPROC, "cpu_count": os.cpu_count(),
        "unthrottled_run": base, "torch_threads": 1,
    }
    print(f"  compute_s_measured {cal['compute_s_measured']:.4f} s, optimizer_s {opt_s:.4f} s, "
          f"codec_shares_compute {cal['codec_shares_compute']}", flush=True)
    return cal


def predict(cal: dict, link: str, codec: str):
    return predict_step(
        PRESET, global_batch=BATCH * NPROC, seq_len=SEQ, dp=NPROC, codecs={"grad": codec}, link=resolve_link(link),
        compute_s_measured=cal["compute_s_measured"], optimizer_s=cal["optimizer_s"],
        codec_speed={k: CodecSpeed(**v) for k, v in cal["codec_speed"].items()},
        codec_shares_compute=cal["codec_shares_compute"], min_numel=4096, bucket_mb=4.0,
    )


def load() -> dict:
    return json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}


def save(data: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1))


def table(data: dict) -> tuple[str, int, int]:
    cal = data["calibration"]
    lines = ["| link | grad codec (+EF) | predicted ms | measured ms | error | within 15% | grad MB/step predicted / measured | "
             "measured exposed comm ms |",
             "|---|---|---:|---:|---:|:-:|---:|---:|"]
    ok = n = 0
    for key, r in data["runs"].items():
        p = predict(cal, r["link"], r["codec"])
        err = (p.step_s - r["step_time_s"]) / r["step_time_s"] * 100
        within = abs(err) <= 15
        ok += within
        n += 1
        r["predicted_step_s"], r["error_pct"] = p.step_s, err
        lines.append(f"| {r['link']} | {r['codec']} | {p.step_s * 1e3:.0f} | {r['step_time_s'] * 1e3:.0f} | {err:+.1f}% | "
                     f"{'yes' if within else 'NO'} | {p.wire_bytes['grad'] / 1e6:.3f} / {r['grad_bytes'] / 1e6:.3f} | "
                     f"{r['comm_s'] * 1e3:.0f} |")
    return "\n".join(lines), ok, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrate", action="store_true", help="measure this machine's compute/codec/optimizer speed")
    ap.add_argument("--links", default="", help="comma-separated link profiles to run (e.g. 100mbit,1gbit)")
    ap.add_argument("--codecs", default=";".join(CODECS), help="';'-separated gradient codec specs")
    ap.add_argument("--steps", type=int, default=12, help="training steps per run (the first 3 are not timed)")
    ap.add_argument("--report", action="store_true", help="print the table and write benchmarks/results/perfmodel.*")
    args = ap.parse_args(argv)
    data = load()
    if args.calibrate:
        data["calibration"] = calibrate(args.steps)
        save(data)
    if args.links and "calibration" not in data:
        ap.error("no calibration yet: run with --calibrate first")
    for link in filter(None, args.links.split(",")):
        for codec in filter(None, args.codecs.split(";")):
            key = f"{link}|{codec}"
            print(f"run {key} ...", flush=True)
            r = train_run(f"{link}_{codec}".replace(":", "_").replace(",", "_").replace("=", ""), link, codec, args.steps)
            p = predict(data["calibration"], link, codec)
            data["runs"][key] = {"link": link, "codec": codec, **r}
            print(f"  measured {r['step_time_s'] * 1e3:.0f} ms, predicted {p.step_s * 1e3:.0f} ms "
                  f"({(p.step_s / r['step_time_s'] - 1) * 100:+.1f}%)", flush=True)
            save(data)
    if args.report:
        text, ok, n = table(data)
        save(data)
        print(text)
        print(f"{ok}/{n} within +-15%")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "perfmodel_validation.json").write_text(json.dumps(data, indent=1))
        (RESULTS / "perfmodel_table.md").write_text(text + f"\n\n{ok}/{n} configurations within +-15%.\n")  # pasted into perfmodel.md
    return 0


if __name__ == "__main__":
    sys.exit(main())
