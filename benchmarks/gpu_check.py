"""The Python pieces of ``benchmarks/gpu_check.sh`` (each also runs on CPU: ``--device cpu``).

    python benchmarks/gpu_check.py env      [--device cuda|cpu] [--json F]
    python benchmarks/gpu_check.py codecs   [--device ...] [--sizes 64M] [--runs 20] [--json F]
    python benchmarks/gpu_check.py streams  [--device ...] [--n 32M] [--runs 10] [--json F]
    python benchmarks/gpu_check.py train-report RUN_DIR [--json F]
    python benchmarks/gpu_check.py precision-flag      # prints train.precision=bf16 if the config takes it
    python benchmarks/gpu_check.py summary OUT_DIR     # the compact summary of the files above

``codecs``: effective bandwidth = (bytes read + bytes written) / time, median over ``runs``
after warm-up, against a device-to-device copy of the same fp32 tensor (``copy_``: reads
and writes 4n bytes). Target (issue 14): the fused 4-bit quantize+pack and
unpack+dequantize kernels at >= 60% of the copy bandwidth. Rows for the codec API
(``compress``/``decompress``, what the trainer calls) follow for context.

``streams``: can codec work overlap compute? A compute proxy (square matmuls, sized to take
about as long as one 4-bit encode+decode of an ``n``-element gradient) and the codec, timed
alone and together in three arrangements: both on the default stream (serial), the codec in
a second thread on the default stream (how ``Communicator``'s worker thread runs today), and
the codec in a second thread on its own CUDA stream. ``overlap = (t_compute + t_codec -
t_both) / min(t_compute, t_codec)``: 0 is serial, 1 is fully hidden.

On CPU the numbers are not GPU measurements; the mode exists so every code path runs
without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_PCT = 60.0
FUSED = ("quant4 quantize+pack (fused)", "quant4 unpack+dequantize (fused)")


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(s[:-1] if s[-1] in "KMG" else s) * mult


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, runs: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wall(fn, device: torch.device, runs: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn()`` including a device synchronize (for multi-thread work)."""
    for _ in range(warmup):
        fn()
        _sync(device)
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: --device cuda but no CUDA GPU is visible (use --device cpu for a dry run)")
    return torch.device(name)


def _write(obj, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1) + "\n")


# -- env ------------------------------------------------------------------------------------
def cmd_env(args) -> int:
    from commtrain.compress.kernels import cupy_available

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device, "dry_run": args.device == "cpu"}
    if args.device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    nccl=".".join(map(str, torch.cuda.nccl.version())), bf16=torch.cuda.is_bf16_supported())
    else:
        import platform

        info.update(name=f"CPU ({platform.processor() or platform.machine()}) - dry run, no GPU")
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception as e:  # noqa: BLE001 -- not installed, or a CUDA mismatch
        info["cupy"] = None
        info["cupy_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    info["cupy_kernels"] = cupy_available()
    print(json.dumps(info))
    _write(info, args.json)
    return 0


# -- codecs ---------------------------------------------------------------------------------
def codec_rows(device: torch.device, n: int, runs: int) -> dict:
    from commtrain.compress import build_codec
    from commtrain.compress.kernels import resolve

    ops = resolve("auto", device)
    backend = getattr(ops, "name", None) or ops.__name__.rsplit(".", 1)[-1]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=g)
    copy_s = timed(lambda: torch.empty_like(x).copy_(x), device, runs)
    copy_gbs = 8 * n / copy_s / 1e9
    q4 = ops.quantize_pack(x, 4, 128, "minmax", False, None)
    rows = [
        (FUSED[0], lambda: ops.quantize_pack(x, 4, 128, "minmax", False, None), 4 * n + q4.numel()),
        (FUSED[1], lambda: ops.unpack_dequantize(q4, n, 4, 128, "minmax"), q4.numel() + 4 * n),
    ]
    for spec in ("quant:bits=4,group=128", "quant:bits=8,group=128", "fp8", "qsgd", "natural", "topk:ratio=0.01"):
        codec = build_codec(spec)
        pkt = codec.compress(x)
        nb = pkt.payload.numel()
        rows.append((f"{spec} compress", lambda c=codec: c.compress(x), 4 * n + nb))
        rows.append((f"{spec} decompress", lambda c=codec, p=pkt: c.decompress(p), nb + 4 * n))
    out = []
    for name, fn, nbytes in rows:
        s = timed(fn, device, runs)
        gbs = nbytes / s / 1e9
        out.append({"kernel": name, "ms": s * 1e3, "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs, "bytes": nbytes})
    return {"n": n, "backend": backend, "copy_ms": copy_s * 1e3, "copy_gbs": copy_gbs, "rows": out}


def cmd_codecs(args) -> int:
    device = _device(args.device)
    tables = [codec_rows(device, parse_size(s), args.runs) for s in args.sizes.split(",")]
    lines = []
    for t in tables:
        lines.append(f"n = {t['n']:,} fp32 elements on {device} (kernels: {t['backend']}); "
                     f"copy {t['copy_ms']:.3f} ms = {t['copy_gbs']:.1f} GB/s")
        lines.append(f"{'kernel':36s} {'ms':>9s} {'GB/s':>8s} {'% copy':>7s}")
        for r in t["rows"]:
            flag = "  <- target >= 60%" if r["kernel"] in FUSED else ""
            lines.append(f"{r['kernel']:36s} {r['ms']:9.3f} {r['gbs']:8.1f} {r['pct_copy']:6.0f}%{flag}")
    big = tables[-1]
    fused = {r["kernel"]: r["pct_copy"] for r in big["rows"] if r["kernel"] in FUSED}
    ok = all(v >= TARGET_PCT for v in fused.values()) and big["backend"] == "cupy"
    verdict = ("PASS" if ok else "MISS") + ("" if device.type == "cuda" else " (dry run on CPU: not a GPU figure)")
    lines.append(f"target: fused 4-bit encode {fused[FUSED[0]]:.0f}%, decode {fused[FUSED[1]]:.0f}% of copy "
                 f"(>= {TARGET_PCT:.0f}%, CuPy kernels) -> {verdict}")
    print("\n".join(lines))
    _write({"device": str(device), "tables": tables, "fused_pct": fused, "target_pct": TARGET_PCT, "pass": ok,
            "dry_run": device.type != "cuda"}, args.json)
    return 0


# -- streams --------------------------------------------------------------------------------
def cmd_streams(args) -> int:
    from commtrain.compress import build_codec

    device = _device(args.device)
    n = parse_size(args.n)
    codec = build_codec("quant:bits=4,group=128")
    g = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(n, device=device, generator=g)
    m = 4096 if device.type == "cuda" else 256
    a = torch.randn(m, m, device=device, generator=g)

    def codec_work():
        codec.decompress(codec.compress(grad))

    t_codec = timed(codec_work, device, args.runs)
    k = max(1, round(t_codec / timed(lambda: a @ a, device, args.runs)))

    def compute():
        for _ in range(k):
            a @ a

    # compute proxy ~ as long as the codec work (a second pass corrects the one-matmul estimate)
    k = max(1, round(k * t_codec / timed(compute, device, args.runs)))
    t_compute = timed(compute, device, args.runs)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def serial():
        compute()
        codec_work()

    def threaded(stream):
        def job():
            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                codec_work()
            if stream is not None:
                stream.synchronize()

        def both():
            t = threading.Thread(target=job)
            t.start()
            compute()
            t.join()

        return both

    result = {"device": str(device), "n": n, "matmul": m, "matmuls": k, "t_codec_ms": t_codec * 1e3,
              "t_compute_ms": t_compute * 1e3, "dry_run": device.type != "cuda"}
    arrangements = [("serial (one stream)", serial), ("thread, default stream (Communicator today)", threaded(None))]
    if side is not None:
        arrangements.append(("thread, own CUDA stream", threaded(side)))
    print(f"streams on {device}: codec quant4 encode+decode of {n:,} elements {t_codec * 1e3:.2f} ms, "
          f"compute {k} x matmul {m}^2 {t_compute * 1e3:.2f} ms")
    result["arrangements"] = []
    for name, fn in arrangements:
        t = wall(fn, device, args.runs)
        overlap = (t_compute + t_codec - t) / min(t_compute, t_codec)
        result["arrangements"].append({"name": name, "ms": t * 1e3, "overlap": overlap})
        print(f"  {name:44s} {t * 1e3:9.2f} ms  overlap {overlap:5.2f}")
    _write(result, args.json)
    return 0


# -- training run report --------------------------------------------------------------------
def cmd_train_report(args) -> int:
    from commtrain.metrics import read_metrics

    run = Path(args.run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    if not steps:
        print(f"train-report: no steps in {run}/metrics.jsonl", file=sys.stderr)
        return 2
    timed_steps = steps[min(3, len(steps) - 1):]  # the first steps include warm-up (allocator, kernels)
    med = lambda k: statistics.median(r[k] for r in timed_steps)  # noqa: E731
    cfg = {}
    if (run / "config.yaml").is_file():
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text())
    evals = [r["eval_loss"] for r in rows if r.get("event") == "eval"]
    rep = {"steps": len(steps), "step_time_s": med("step_time_s"), "tokens_per_s": med("tokens_per_s"),
           "compute_s": med("compute_s"), "comm_s": med("comm_s"), "comm_frac": med("comm_s") / med("step_time_s"),
           "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"], "final_eval_loss": evals[-1] if evals else None,
           "backend": cfg.get("backend"), "precision": (cfg.get("train") or {}).get("precision", "fp32"),
           "grad_codec": (cfg.get("compression") or {}).get("grad"), "world_size": 1}
    print(f"train: {rep['steps']} steps, backend {rep['backend']}, precision {rep['precision']}, "
          f"grad {rep['grad_codec']}: median step {rep['step_time_s'] * 1e3:.1f} ms, {rep['tokens_per_s']:,.0f} tokens/s, "
          f"comm {rep['comm_frac']:.1%} of the step; loss {rep['first_loss']:.3f} -> {rep['last_loss']:.3f}")
    _write(rep, args.json)
    return 0


# -- bf16 if the config takes it --------------------------------------------------------------
def cmd_precision_flag(args) -> int:
    from commtrain.config import ConfigError, load_config

    try:
        load_config(None, ["train.precision=bf16"]).validate(1)
    except (ConfigError, ValueError):
        return 0  # this version has no mixed precision yet: no flag
    print("train.precision=bf16")
    return 0


# -- summary --------------------------------------------------------------------------------
def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cmd_summary(args) -> int:
    out = Path(args.out_dir)
    lines = []
    env = _load(out / "env.json") or {}
    lines.append(f"gpu_check on {env.get('name', '?')} | torch {env.get('torch')} cuda {env.get('cuda')} | "
                 f"cupy {env.get('cupy')} (kernels {'on' if env.get('cupy_kernels') else 'off'})")
    status = {}
    if (out / "status.tsv").is_file():
        for line in (out / "status.tsv").read_text().splitlines():
            step, rc, secs = (line.split("\t") + ["", ""])[:3]
            status[step] = (rc, secs)

    def mark(step):
        rc, secs = status.get(step, ("-", ""))
        tag = {"0": "ok", "-": "not run", "124": "TIMEOUT", "skip": "skipped"}.get(rc, f"FAIL rc={rc}")
        if step == "cupy_tests" and rc == "5":  # pytest: nothing ran (no GPU or no CuPy)
            tag = "SKIPPED: dry run" if env.get("dry_run") else "FAIL: no CuPy kernel test ran"
        return f"[{tag}{', ' + secs + ' s' if secs else ''}]"

    tail = (out / "cupy_tests.log").read_text().strip().splitlines()[-1:] if (out / "cupy_tests.log").is_file() else []
    lines.append(f"{mark('cupy_tests')} CuPy kernel tests: {tail[0] if tail else 'no log'}")
    c = _load(out / "codecs.json")
    if c:
        f = c["fused_pct"]
        lines.append(f"{mark('codecs')} codecs vs copy {c['tables'][-1]['copy_gbs']:.0f} GB/s: fused 4-bit encode "
                     f"{f[FUSED[0]]:.0f}%, decode {f[FUSED[1]]:.0f}% (target >= {c['target_pct']:.0f}%): "
                     f"{'PASS' if c['pass'] else 'MISS'}{' (dry run)' if c.get('dry_run') else ''}")
    else:
        lines.append(f"{mark('codecs')} codecs: no result")
    t = _load(out / "train_report.json")
    if t:
        lines.append(f"{mark('train')} 1-rank train ({t['backend']}, {t['precision']}, grad {t['grad_codec']}): "
                     f"{t['steps']} steps, {t['step_time_s'] * 1e3:.1f} ms/step, {t['tokens_per_s']:,.0f} tokens/s, "
                     f"loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}, comm {t['comm_frac']:.1%} of the step "
                     "(1 rank: no link)")
    else:
        lines.append(f"{mark('train')} train: no result")
    s = _load(out / "streams.json")
    if s:
        parts = ", ".join(f"{a['name']} {a['overlap']:.2f}" for a in s["arrangements"])
        lines.append(f"{mark('streams')} codec/compute overlap (0 serial .. 1 hidden): {parts}")
    else:
        lines.append(f"{mark('streams')} streams: no result")
    text = "\n".join(lines)
    print(text)
    (out / "summary.txt").write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "codecs", "streams"):
        p = sub.add_parser(name)
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        p.add_argument("--json", default=None)
        if name == "codecs":
            p.add_argument("--sizes", default="64M")
            p.add_argument("--runs", type=int, default=20)
        if name == "streams":
            p.add_argument("--n", default="32M")
            p.add_argument("--runs", type=int, default=10)
    p = sub.add_parser("train-report")
    p.add_argument("run_dir")
    p.add_argument("--json", default=None)
    sub.add_parser("precision-flag")
    p = sub.add_parser("summary")
    p.add_argument("out_dir")
    args = ap.parse_args(argv)
    return {"env": cmd_env, "codecs": cmd_codecs, "streams": cmd_streams, "train-report": cmd_train_report,
            "precision-flag": cmd_precision_flag, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
