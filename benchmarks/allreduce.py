"""All-reduce benchmark: compressed codecs vs `none` over simulated links, 2 gloo ranks.

    python benchmarks/allreduce.py            # 64 MiB fp32 gradient (16Mi elements), 3 timed reps
    python benchmarks/allreduce.py --quick    # 16 MiB, 1 timed rep

Each rank all-reduces (op=mean) the same-shaped random gradient with every codec at every
link. Reported per (link, codec): median wall time of the whole collective (compression
included), time ratio vs `none` on the same link, bytes this rank put on the wire (from
the ByteMeter) and their ratio vs `none`, the link model's seconds for those bytes, and
the relative error ||y - exact|| / ||exact||. Prints a table; writes benchmarks/out/allreduce.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commtrain.comm import Communicator, LinkModel, resolve_link  # noqa: E402
from commtrain.compress import available_codecs, build_codec  # noqa: E402

CODECS = ["none", "fp16", "quant:bits=8", "quant:bits=4", "quant:bits=2", "topk:ratio=0.01"]
LINKS = ["100mbit", "1gbit", "none"]


def _worker(rank, world, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.numel, generator=g)
    exact = x.clone()
    dist.all_reduce(exact)
    exact /= world
    codecs = [c for c in args.codecs if c.split(":")[0] in available_codecs()]
    rows = []
    for link_spec in args.links:
        link = LinkModel(name="unthrottled") if link_spec == "none" else resolve_link(link_spec)
        comm = Communicator(link=link, timeout_s=600)
        for spec in codecs:
            codec = build_codec(spec)
            comm.all_reduce(x[:4096].clone(), codec)  # warm-up: connections, allocator, codec state
            times = []
            for _ in range(args.reps):
                dist.barrier()
                comm.meter.snapshot(reset=True)
                t0 = time.perf_counter()
                y = comm.all_reduce(x, codec, channel="grad", op="mean")
                dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the collective ends when the slowest rank does
                times.append(dt.item())
                snap = comm.meter.snapshot()
            err = ((y - exact).norm() / exact.norm()).item()
            rows.append(dict(link=link_spec, codec=spec, median_s=statistics.median(times), times_s=times,
                             wire_bytes=snap["bytes"]["grad"], modeled_s=snap["modeled_s"]["grad"], rel_err=err))
            if rank == 0:
                print(f"  {link_spec:>8} {spec:<16} {statistics.median(times):8.3f} s", flush=True)
        comm.close()
    if rank == 0:
        for r in rows:
            base = next(b for b in rows if b["link"] == r["link"] and b["codec"] == "none")
            r["time_ratio"] = r["median_s"] / base["median_s"]
            r["byte_ratio"] = r["wire_bytes"] / base["wire_bytes"]
        meta = dict(numel=args.numel, bytes=4 * args.numel, world_size=world, reps=args.reps, threads=args.threads,
                    torch=torch.__version__, backend="gloo (loopback)", command=" ".join(sys.argv))
        Path(out_path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    dist.destroy_process_group()


def print_table(result: dict) -> None:
    m = result["meta"]
    print(f"\nall-reduce (mean) of {m['bytes'] / 2**20:.0f} MiB fp32 over {m['world_size']} gloo ranks, "
          f"median of {m['reps']}; wire bytes = sent per rank")
    hdr = f"{'link':>9} | {'codec':<16} | {'time s':>8} | {'x none':>7} | {'wire MB':>8} | {'bytes x':>8} | {'model s':>8} | {'rel err':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in result["rows"]:
        print(f"{r['link']:>9} | {r['codec']:<16} | {r['median_s']:8.3f} | {r['time_ratio']:7.3f} | "
              f"{r['wire_bytes'] / 1e6:8.2f} | {r['byte_ratio']:8.4f} | {r['modeled_s']:8.3f} | {r['rel_err']:8.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=16 * 2**20, help="gradient elements (default 16Mi = 64 MiB fp32)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--codecs", nargs="+", default=CODECS)
    ap.add_argument("--links", nargs="+", default=LINKS, help="link profiles/specs; 'none' = unthrottled")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--quick", action="store_true", help="16 MiB and 1 timed rep")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "allreduce.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.numel, args.reps = 4 * 2**20, 1
    if "none" not in args.codecs:
        args.codecs = ["none", *args.codecs]  # the baseline every ratio refers to
    for spec in args.codecs:
        build_codec(spec)  # fail fast on a bad spec, before spawning
    for link in args.links:
        if link != "none":
            resolve_link(link)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(2, port, args, str(out)), nprocs=2, join=True)
    result = json.loads(out.read_text())
    print_table(result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
