"""ZeRO memory per rank: optimizer state, gradients (peak during the step), fp32 master shard.

    python benchmarks/zero_memory.py                          # gpt-micro and gpt-mini, 2 ranks
    python benchmarks/zero_memory.py --models gpt-micro --nproc 4 --bucket-mb 1

Each rank builds the model and the gradient sync the trainer builds for ``zero.stage``
(stage 0: plain data parallelism; stage 2 with 1 and with 2 buckets in flight), runs three
real training steps (forward, backward with the sync's hooks armed, reduce, update, gather)
on random tokens, and reads ``memory_report()``: ``peak_grad_bytes`` is the most gradient
memory held at any moment of the steps (gradients, the reduction's bucket buffers, the
shard), ``grad_bytes`` what is still held after ``step()``. Also reported: the bytes this
rank put on the wire in the last step (``grad`` and ``param`` channels), and for stage 2 the
bound 1/p of the gradients + ``buckets_in_flight`` x the largest bucket.
Writes benchmarks/out/zero_memory.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commtrain.comm import Communicator  # noqa: E402
from commtrain.demo import free_port  # noqa: E402
from commtrain.models import ModelConfig, build_model  # noqa: E402
from commtrain.parallel.compression import CompressionConfig  # noqa: E402
from commtrain.parallel.sync import build_sync  # noqa: E402

# (label, stage, buckets in flight)
SETTINGS = (("0", 0, None), ("1", 1, None), ("2 (in flight 2)", 2, 2), ("2 (in flight 1)", 2, 1))


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    for preset in args.models:
        for label, stage, inflight in SETTINGS:
            torch.manual_seed(0)  # identical replicas
            model = build_model(ModelConfig(preset=preset))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            comm = Communicator(timeout_s=300)
            cc = CompressionConfig(grad=args.grad, policy="always")
            kw = {} if stage == 0 else dict(stage=stage, buckets_in_flight=inflight or 2)
            sync = build_sync("zero" if stage else "data_parallel", named, lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                              comm, compression=cc, bucket_mb=args.bucket_mb, **kw)
            g = torch.Generator().manual_seed(rank)
            for step in range(3):
                x = torch.randint(0, model.vocab_size, (args.batch, args.seq_len), generator=g)
                sync.begin_step(step)
                before = dict(comm.meter.bytes)
                _, loss = model(x, targets=x)
                loss.backward()
                sync.step(max_grad_norm=1.0)
                report = sync.memory_report()  # before zero_grad: what the step leaves held
                sync.zero_grad()
            wire = {k: comm.meter.bytes[k] - before.get(k, 0) for k in ("grad", "param")}
            n_params = sum(p.numel() for _, p in named)
            bucket = max(b.numel * 4 for b in sync.buckets)
            small = sum(b.numel * 4 for b in sync.buckets if not b.compress)
            largest = max(p.numel() * 4 for _, p in named)
            rows.append(dict(model=preset, setting=label, rank=rank, world=world, n_params=n_params,
                             bucket_bytes=bucket, small_bucket_bytes=small, largest_grad_bytes=largest,
                             buckets_in_flight=inflight, **report, wire_bytes_last_step=wire))
            sync.close()
            comm.close()
            del sync, model
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out_path).write_text(json.dumps([r for rs in gathered for r in rs], indent=1))
    dist.destroy_process_group()


def format_table(rows: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    lines = ["| model (params) | stage | optimizer state MiB | peak gradients MiB | gradients after step MiB | "
             "fp32 master MiB | peak grads vs stage 0 | acceptance bound: 1/p + k buckets (+10%) | "
             "full bound: + small-tensor bucket + largest gradient | wire MB/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["rank"]): r for r in rows if r["stage"] == 0}
    for r in rows:
        if r["rank"] != 0:
            continue
        b = base[(r["model"], 0)]
        full = 4 * r["n_params"]
        bound = full_bound = ""
        if r["stage"] == 2:
            limit = full / r["world"] + r["buckets_in_flight"] * r["bucket_bytes"]
            bound = f"{mb(limit)} ({'met' if r['peak_grad_bytes'] <= 1.1 * limit else 'MISSED'})"
            limit2 = limit + r["small_bucket_bytes"] + r["largest_grad_bytes"]
            full_bound = f"{mb(limit2)} ({'met' if r['peak_grad_bytes'] <= limit2 else 'MISSED'})"
        wire = sum(r["wire_bytes_last_step"].values())
        lines.append(
            f"| {r['model']} ({r['n_params'] / 1e6:.1f}M) | {r['setting']} | {mb(r['optimizer_state_bytes'])} "
            f"| {mb(r['peak_grad_bytes'])} | {mb(r['grad_bytes'])} | {mb(r['master_bytes'])} "
            f"| {r['peak_grad_bytes'] / b['peak_grad_bytes']:.2f}x | {bound} | {full_bound} | {wire / 1e6:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["gpt-micro", "gpt-mini"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--grad", default="none", help="gradient codec for the reduce (memory does not depend on it)")
    ap.add_argument("--bucket-mb", type=float, default=4.0, help="gradient bucket size (parallel.bucket_mb)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "zero_memory.json"))
    args = ap.parse_args()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(args.nproc, free_port(), args, args.json), nprocs=args.nproc, join=True)
    rows = json.loads(Path(args.json).read_text())
    print(f"ZeRO memory per rank ({args.nproc} ranks, AdamW, {args.bucket_mb:g} MiB buckets, rank 0 shown; "
          f"all ranks in {args.json})\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
