"""GPU kernel benchmark: CuPy kernels vs the torch reference vs a device-to-device copy.

For each size (16M, 64M, 256M fp32 elements) and kernel: median time over many runs (CUDA
events, after warm-up) and effective bandwidth = (bytes read + bytes written) / time, next
to the measured bandwidth of ``torch.empty_like(x).copy_(x)`` and the torch reference's
time for the same call. Prints a table and writes JSON.

    python benchmarks/gpu_kernels.py [--sizes 16M,64M,256M] [--runs 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, runs: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def cases(T, n: int):
    """(name, call(ops) -> closure, bytes read + written). Payloads for decodes come from T."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, device="cuda", generator=g)
    acc = torch.zeros(n, device="cuda")
    q4 = T.quantize_pack(x, 4, 128, "minmax", False, None)
    q8 = T.quantize_pack(x, 8, 128, "absmax", False, None)
    q3 = T.quantize_pack(x, 3, 128, "minmax", False, None)
    lv = T.level_encode(x, 7, 512, "2", "uniform", g)
    nat = T.natural_encode(x, g)
    f8 = T.fp8_encode(x, "e4m3", 128, False, None)
    r = 4 * n  # fp32 input bytes read by an encode
    return [
        ("quant4 minmax nearest encode", lambda o: lambda: o.quantize_pack(x, 4, 128, "minmax", False, None), r + q4.numel()),
        ("quant4 minmax stochastic encode", lambda o: lambda: o.quantize_pack(x, 4, 128, "minmax", True, g), r + q4.numel()),
        ("quant3 minmax nearest encode", lambda o: lambda: o.quantize_pack(x, 3, 128, "minmax", False, None), r + q3.numel()),
        ("quant8 absmax nearest encode", lambda o: lambda: o.quantize_pack(x, 8, 128, "absmax", False, None), r + q8.numel()),
        ("quant4 decode", lambda o: lambda: o.unpack_dequantize(q4, n, 4, 128, "minmax"), q4.numel() + 4 * n),
        ("quant4 decode+add", lambda o: lambda: o.unpack_dequantize_add(q4, n, 4, 128, "minmax", acc), q4.numel() + 8 * n),
        ("quant3 decode", lambda o: lambda: o.unpack_dequantize(q3, n, 3, 128, "minmax"), q3.numel() + 4 * n),
        ("qsgd s=7 encode", lambda o: lambda: o.level_encode(x, 7, 512, "2", "uniform", g), r + lv.numel()),
        ("qsgd s=7 decode", lambda o: lambda: o.level_decode(lv, n, 7, 512, "uniform"), lv.numel() + 4 * n),
        ("natural encode", lambda o: lambda: o.natural_encode(x, g), r + nat.numel()),
        ("natural decode", lambda o: lambda: o.natural_decode(nat, n), nat.numel() + 4 * n),
        ("fp8 e4m3 encode", lambda o: lambda: o.fp8_encode(x, "e4m3", 128, False, None), r + f8.numel()),
        ("fp8 e4m3 stochastic encode", lambda o: lambda: o.fp8_encode(x, "e4m3", 128, True, g), r + f8.numel()),
        ("fp8 e4m3 decode", lambda o: lambda: o.fp8_decode(f8, n, "e4m3", 128), f8.numel() + 4 * n),
    ], x


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(s[:-1] if s[-1] in "KMG" else s) * mult


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16M,64M,256M")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--json", default="benchmarks/gpu_kernels.json")
    ap.add_argument("--no-torch", action="store_true", help="skip the (slow) torch reference timings")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels.py: no CUDA GPU found; this benchmark needs one (nothing measured).", file=sys.stderr)
        return 2
    try:
        from commtrain.compress.kernels import cupy_ops as C
    except Exception as e:
        print(f"gpu_kernels.py: CuPy kernels unavailable ({type(e).__name__}: {e}).", file=sys.stderr)
        return 2
    from commtrain.compress.kernels import torch_ops as T

    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; cupy {__import__('cupy').__version__}; "
          f"median of {args.runs} runs after warm-up, CUDA events")
    rows = []
    for n in map(parse_size, args.sizes.split(",")):
        all_cases, x = cases(T, n)
        copy_ms = timed(lambda: torch.empty_like(x).copy_(x), args.runs)
        copy_gbs = 8 * n / copy_ms / 1e6
        print(f"\nn = {n:,} fp32 elements; device-to-device copy: {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s")
        print(f"{'kernel':34s} {'cupy ms':>9s} {'GB/s':>7s} {'% copy':>7s} {'torch ms':>9s} {'speed-up':>8s}")
        for name, make, nbytes in all_cases:
            ms = timed(make(C), args.runs)
            t_ms = None if args.no_torch else timed(make(T), max(5, args.runs // 5))
            gbs = nbytes / ms / 1e6
            row = dict(n=n, kernel=name, cupy_ms=ms, cupy_gbs=gbs, pct_copy=100 * gbs / copy_gbs,
                       torch_ms=t_ms, speedup=(t_ms / ms if t_ms else None), bytes=nbytes,
                       copy_ms=copy_ms, copy_gbs=copy_gbs)
            rows.append(row)
            ts = f"{t_ms:9.3f} {t_ms / ms:7.1f}x" if t_ms else f"{'-':>9s} {'-':>8s}"
            print(f"{name:34s} {ms:9.3f} {gbs:7.0f} {row['pct_copy']:6.0f}% {ts}")
        del all_cases, x
        torch.cuda.empty_cache()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=dev, torch=torch.__version__, runs=args.runs, rows=rows), indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
