"""Codec throughput: encode/decode GB/s (fp32 input bytes / median time) and exact compression
ratio per codec and tensor size, with two baselines measured in the same run: a plain torch
cast to fp16 and a clone (memory bandwidth).

    python benchmarks/codec_throughput.py                       # defaults
    python benchmarks/codec_throughput.py --quick               # 1M,4M, 3 repeats
    python benchmarks/codec_throughput.py --sizes 1M --codecs quant:bits=4,topk:ratio=0.01
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from commtrain.compress import build_codec  # noqa: E402
from commtrain.compress.kernels import backend_name  # noqa: E402

DEFAULT_CODECS = [
    "fp16", "bf16",
    "quant:bits=8", "quant:bits=4", "quant:bits=4,rounding=nearest", "quant:bits=2,scheme=absmax",
    "qsgd", "natural", "natural_dither",
    "fp8", "fp8:rounding=stochastic",
    "topk:ratio=0.01", "randomk:ratio=0.01",
]


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


def split_specs(s: str) -> list[str]:
    """Codec specs separated by ';' (or by ',' before a name, since specs contain ',')."""
    if ";" in s:
        return [p for p in s.split(";") if p]
    out: list[str] = []
    for part in s.split(","):
        if "=" in part and ":" not in part and out:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_time(fn, repeats, device, budget_s):
    """Median of ``repeats`` timed calls after one warm-up call. When a call is slow (large
    tensors on a small CPU), fewer calls fit in ``budget_s``; then the warm-up call counts as
    a sample too (its one-time costs are negligible against a call that long)."""
    first = _timed(fn, device)
    if first * (repeats + 1) <= budget_s:
        return statistics.median(_timed(fn, device) for _ in range(repeats))
    extra = max(0, min(repeats, int(budget_s / first)) - 1)
    return statistics.median([first] + [_timed(fn, device) for _ in range(extra)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None,
                    help="comma-separated element counts (K/M/G suffixes); default 1M,4M,16M,64M on CUDA, "
                         "1M,4M,16M on CPU (64M single calls take ~10 s each on a 2-core CPU)")
    ap.add_argument("--codecs", default=";".join(DEFAULT_CODECS), help="codec specs, ';'-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default="benchmarks/out/codec_throughput.json")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per measurement before repeats are cut")
    ap.add_argument("--quick", action="store_true", help="sizes 1M,4M and 3 repeats")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.sizes is None:
        args.sizes = "1M,4M,16M,64M" if device.type == "cuda" else "1M,4M,16M"
    if args.quick:
        args.sizes, args.repeats = "1M,4M", 3
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    codecs = [(s, build_codec(s)) for s in split_specs(args.codecs)]  # fail fast on a bad spec

    rows = []
    header = f"{'codec':34s} {'size':>6s} {'enc GB/s':>9s} {'dec GB/s':>9s} {'ratio':>8s}  kernel"
    print(f"# device={device} threads={torch.get_num_threads()} torch={torch.__version__} repeats={args.repeats}")
    print(header)
    print("-" * len(header))
    for n in sizes:
        x = torch.randn(n, device=device)
        gb = 4 * n / 1e9
        label = f"{n >> 20}M" if n % (1 << 20) == 0 else str(n)
        baselines = [
            ("baseline: clone", lambda: x.clone(), None),
            ("baseline: .to(fp16)", lambda: x.to(torch.float16), lambda: h.float()),
        ]
        h = x.to(torch.float16)
        for name, enc, dec in baselines:
            te = median_time(enc, args.repeats, device, args.budget)
            td = median_time(dec, args.repeats, device, args.budget) if dec else float("nan")
            ratio = 1.0 if dec is None else 2.0
            rows.append(dict(codec=name, numel=n, encode_gbps=gb / te, decode_gbps=gb / td, ratio=ratio,
                             nbytes=int(4 * n / ratio), kernel="torch"))
            print(f"{name:34s} {label:>6s} {gb / te:9.2f} {gb / td:9.2f} {ratio:8.2f}  torch")
        for spec, c in codecs:
            pkt = c.compress(x)  # also the first warm-up
            te = median_time(lambda: c.compress(x), args.repeats, device, args.budget)
            td = median_time(lambda: c.decompress(pkt), args.repeats, device, args.budget)
            ratio = 4 * n / pkt.nbytes
            kern = backend_name(c.kernel, device)
            rows.append(dict(codec=spec, canonical_spec=c.spec, numel=n, encode_gbps=gb / te, decode_gbps=gb / td, ratio=ratio,
                             nbytes=pkt.nbytes, kernel=kern))
            print(f"{spec:34s} {label:>6s} {gb / te:9.2f} {gb / td:9.2f} {ratio:8.2f}  {kern}", flush=True)
        del x, h

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = dict(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                    machine=platform.machine(), processor=platform.processor(), repeats=args.repeats,
                    command=" ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
