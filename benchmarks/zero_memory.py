"""ZeRO memory per rank: optimizer state, gradients, fp32 master shard, for stages 0/1/2.

    python benchmarks/zero_memory.py                          # gpt-micro and gpt-mini, 2 ranks
    python benchmarks/zero_memory.py --models gpt-micro --nproc 4

Each rank builds the model, wraps AdamW in :class:`ZeroOptimizer` at each stage, runs two
real training steps (forward, backward, reduce, update, gather) on random tokens, and
reads ``ZeroOptimizer.memory_report()`` right after ``step()`` -- before ``zero_grad()``,
i.e. while the gradients are still held, which is the peak of the step. Also reported:
the bytes this rank put on the wire in the last step (``grad`` and ``param`` channels).
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
from commtrain.parallel.zero import ZeroOptimizer  # noqa: E402


def _worker(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    rows = []
    for preset in args.models:
        for stage in (0, 1, 2):
            torch.manual_seed(0)  # identical replicas
            model = build_model(ModelConfig(preset=preset))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            comm = Communicator(timeout_s=300)
            zero = ZeroOptimizer(named, lambda ps: torch.optim.AdamW(ps, lr=1e-3), comm, stage=stage,
                                 grad_codec=args.grad, error_feedback=True)
            g = torch.Generator().manual_seed(rank)
            for step in range(2):
                x = torch.randint(0, model.vocab_size, (args.batch, args.seq_len), generator=g)
                zero.begin_step(step)
                before = dict(comm.meter.bytes)
                _, loss = model(x, targets=x)
                loss.backward()
                zero.step(max_grad_norm=1.0)
                report = zero.memory_report()  # gradients still held: the step's peak
                zero.zero_grad()
            wire = {k: comm.meter.bytes[k] - before.get(k, 0) for k in ("grad", "param")}
            n_params = sum(p.numel() for _, p in named)
            rows.append(dict(model=preset, rank=rank, world=world, n_params=n_params,
                             **report, wire_bytes_last_step=wire))
            comm.close()
            del zero, model
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        Path(out_path).write_text(json.dumps([r for rs in gathered for r in rs], indent=1))
    dist.destroy_process_group()


def format_table(rows: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:8.2f}"  # noqa: E731
    lines = [f"| model (params)        | stage | optimizer state MiB | gradients MiB | fp32 master MiB | "
             f"params MiB | opt state vs stage 0 | grads vs stage 0 | wire MB/step (grad+param) |",
             "|" + "|".join("-" * w for w in (23, 7, 21, 15, 17, 12, 22, 18, 27)) + "|"]
    base = {(r["model"], r["rank"]): r for r in rows if r["stage"] == 0}
    for r in rows:
        if r["rank"] != 0:
            continue
        b = base[(r["model"], 0)]
        wire = sum(r["wire_bytes_last_step"].values())
        lines.append(
            f"| {r['model']:<10} ({r['n_params'] / 1e6:4.1f}M) | {r['stage']:>5} | {mb(r['optimizer_state_bytes']):>19} "
            f"| {mb(r['grad_bytes']):>13} | {mb(r['master_bytes']):>15} | {mb(r['param_bytes']):>10} "
            f"| {r['optimizer_state_bytes'] / b['optimizer_state_bytes']:>19.2f}x "
            f"| {r['grad_bytes'] / b['grad_bytes']:>15.2f}x | {wire / 1e6:>25.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["gpt-micro", "gpt-mini"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--grad", default="none", help="gradient codec for the reduce (memory does not depend on it)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "zero_memory.json"))
    args = ap.parse_args()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(args.nproc, free_port(), args, args.json), nprocs=args.nproc, join=True)
    rows = json.loads(Path(args.json).read_text())
    print(f"ZeRO memory per rank ({args.nproc} ranks, AdamW, rank 0 shown; all ranks in {args.json})\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
