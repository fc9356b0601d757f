"""``commtrain compare``: predicted tokens/s and tokens/$ of hardware setups x gradient codecs,
as a table (:func:`format_table`) and a two-panel bar chart (:func:`plot_comparison`)."""
from __future__ import annotations

import argparse
import json

from .hardware import available_hardware, load_hardware
from .predict import ACT_DTYPES, ZERO_STAGES, Prediction, predict_step


def split_codec_list(text: str) -> list[str]:
    """``"none,quant:bits=4,group=128,fp16"`` -> ``["none", "quant:bits=4,group=128", "fp16"]``.

    A comma starts a new spec unless the next item is ``key=value`` (a parameter of the spec
    before it): codec names never contain ``=``.
    """
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and specs:
            specs[-1] += "," + item
        else:
            specs.append(item)
    if not specs:
        raise ValueError(f"--codecs {text!r} is invalid; expected e.g. 'none,quant:bits=4,group=128'")
    return specs


def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def codec_label(r: Prediction) -> str:
    """The row's gradient codec, or for the outer loop its pseudo-gradient codec and H."""
    if "sync" in r.extra:
        return f"diloco H={r.extra['sync'].split('H=')[1].split()[0]}: {r.extra['sync'].split('codec=')[1].split()[0]}"
    return r.codecs["grad"]


def format_table(rows: list[Prediction]) -> str:
    head = ("hardware", "nodes", "gpus", "grad codec", "step ms", "compute ms", "exposed comm ms",
            "grad MB/step/rank", "tokens/s", "$/h", "tokens/$", "mem GB", "fits")
    lines = [head]
    for r in rows:
        lines.append((
            str(r.extra["hardware"]), str(r.extra["nodes"]), str(r.world_size), codec_label(r),
            f"{r.step_s * 1e3:.1f}", f"{r.compute_s * 1e3:.1f}", f"{r.exposed_comm_s * 1e3:.1f}",
            f"{r.wire_bytes['grad'] / 1e6:.1f}", _fmt_rate(r.tokens_per_s),
            "-" if r.usd_per_hour is None else f"{r.usd_per_hour:.2f}", _fmt_rate(r.tokens_per_usd),
            f"{r.memory_gb:.1f}", "yes" if r.extra["fits_memory"] else "NO",
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot_comparison(rows: list[Prediction], path: str, title: str) -> None:
    """Two panels: tokens/s and tokens per dollar, one bar per (hardware, codec); consumer
    boxes hatched, servers solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hws = list(dict.fromkeys(r.extra["hardware"] for r in rows))
    codecs = list(dict.fromkeys(codec_label(r) for r in rows))
    by = {(r.extra["hardware"], codec_label(r)): r for r in rows}
    width = 0.8 / max(len(codecs), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(hws) * 2), 4.8))
    for ax, metric, label in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "tokens_per_usd", "tokens / $")):
        for j, c in enumerate(codecs):
            xs, ys, hatches = [], [], []
            for i, h in enumerate(hws):
                r = by.get((h, c))
                v = None if r is None else (r.tokens_per_s if metric == "tokens_per_s" else r.tokens_per_usd)
                if v is None:
                    continue
                xs.append(i + (j - (len(codecs) - 1) / 2) * width)
                ys.append(v)
                hatches.append("//" if r.extra["category"] == "consumer" else "")
            bars = ax.bar(xs, ys, width, label=c, color=colors[j % len(colors)], edgecolor="black", linewidth=0.5)
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
        ax.set_xticks(range(len(hws)))
        cats = {r.extra["hardware"]: r.extra["category"] for r in rows}
        ax.set_xticklabels([f"{h}\n({cats[h]})" for h in hws], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="gradient codec (hatched: consumer)", fontsize=7, title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_main(argv: list[str] | None = None) -> int:
    """``commtrain compare``: predict tokens/s and tokens/$ for hardware x gradient codec."""
    ap = argparse.ArgumentParser(prog="commtrain compare", description=compare_main.__doc__)
    ap.add_argument("--model", default="gpt2-124m", help="built-in preset (default gpt2-124m)")
    ap.add_argument("--hardware", default=None,
                    help=f"comma-separated hardware profiles, names or YAML paths (default: all: {','.join(available_hardware())})")
    ap.add_argument("--nodes", type=int, default=1, help="nodes per setup (all GPUs of each node are used)")
    ap.add_argument("--interconnect", default=None, help="override the inter-node NIC profile (an interconnect name or YAML path)")
    ap.add_argument("--codecs", default="none,fp16,quant:bits=8,group=128,quant:bits=4,group=128",
                    help="gradient codecs to compare, comma-separated specs")
    ap.add_argument("--batch", type=int, default=64, help="global batch in sequences (same for every setup)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0, choices=ZERO_STAGES)
    ap.add_argument("--act-codec", default="none")
    ap.add_argument("--act-grad-codec", default="none")
    ap.add_argument("--param-codec", default="none")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of dense peak FLOP/s (default 0.4)")
    ap.add_argument("--no-overlap", action="store_true", help="do not overlap gradient reduction with backward")
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    ap.add_argument("--sync", default="step", choices=("step", "diloco"),
                    help="step: reduce gradients every step (the --codecs rows); diloco: the outer loop (sync.*)")
    ap.add_argument("--inner-steps", type=int, default=32, help="diloco: H")
    ap.add_argument("--sync-codecs", default="none,topk:ratio=0.01,chunk=4096,value_bits=2",
                    help="diloco: pseudo-gradient codecs to compare (the rows), comma-separated specs")
    ap.add_argument("--fragments", type=int, default=1, help="diloco: F (Streaming DiLoCo)")
    ap.add_argument("--no-sync-overlap", action="store_true", help="diloco: wait for each outer sync")
    ap.add_argument("--out", default="compare.png", help="PNG plot path ('' to skip)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write all predictions as JSON")
    args = ap.parse_args(argv)
    try:
        hws = split_list(args.hardware) if args.hardware else available_hardware()
        diloco = args.sync == "diloco"
        codecs = split_codec_list(args.sync_codecs if diloco else args.codecs)
        rows = []
        for h in hws:
            hw = load_hardware(h)
            world = args.nodes * hw.gpus_per_node
            if world % args.pp:
                raise ValueError(f"--pp {args.pp} does not divide the {world} GPUs of {args.nodes} x {h}")
            for c in codecs:
                sync = (dict(strategy="diloco", inner_steps=args.inner_steps, codec=c, fragments=args.fragments,
                             overlap=not args.no_sync_overlap) if diloco else None)
                rows.append(predict_step(
                    args.model, global_batch=args.batch, seq_len=args.seq_len, pp=args.pp, dp=world // args.pp,
                    microbatches=args.microbatches, zero_stage=args.zero, sync=sync,
                    codecs={"grad": "none" if diloco else c, "act": args.act_codec, "act_grad": args.act_grad_codec,
                            "param": args.param_codec},
                    hardware=hw, nodes=args.nodes, interconnect=args.interconnect, precision=args.precision,
                    mfu=args.mfu, overlap=not args.no_overlap, bucket_mb=args.bucket_mb,
                    # Mixed precision: activations (memory, pipeline sends) in the compute dtype;
                    # gradients stay fp32 (fp32 master parameters).
                    act_dtype=ACT_DTYPES[args.precision],
                ))
    except ValueError as e:
        print(f"commtrain compare: {e}")
        return 2
    title = (f"{args.model}, global batch {args.batch} x {args.seq_len} tokens, {args.nodes} node(s), pp={args.pp}, "
             f"mfu={args.mfu}, {'no overlap' if args.no_overlap else 'overlap'}")
    if args.sync == "diloco":
        title += (f"; DiLoCo H={args.inner_steps}, F={args.fragments}, "
                  f"{'no sync overlap' if args.no_sync_overlap else 'sync overlapped'} (codec column = sync.codec)")
    print(title)
    print(format_table(rows))
    if args.out:
        plot_comparison(rows, args.out, title)
        print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "predictions": [r.to_dict() for r in rows]}, f, indent=1)
        print(f"json: {args.json}")
    return 0


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]
