"""``commtrain`` command line: train, demo, compare, schedule, ray, export, generate, plot.

``torchrun --nproc_per_node=N -m commtrain train --config my_run.yaml --set a.b=c`` (or ``--config tiny``:
a packaged example config, ``commtrain/configs/<name>.yaml``)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _train(args) -> int:
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        # One clear line, before any process group exists.
        print(f"commtrain: config error: {e}", file=sys.stderr)
        return 2
    from .train import train

    train(cfg)
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def _compare(argv) -> int:
    from .perfmodel import compare_main

    return compare_main(argv)


def _schedule(args) -> int:
    from .parallel.pipeline.schedules import build_schedule, dry_run

    run = dry_run(build_schedule(args.schedule, args.pp, args.microbatches), check=False)
    print(run.report())
    print(f"bubble: {run.bubble_fraction():.1%} of stage-steps idle (unit-time actions)")
    return 0 if run.ok else 1


def _ray(argv) -> int:
    from .launch_ray import main as ray_main

    return ray_main(argv)


def _export(args) -> int:
    from .export import export_main

    return export_main(args)


def _generate(args) -> int:
    from .generate import generate_main

    return generate_main(args)


def _plot(args) -> int:
    from .plot import plot_main

    return plot_main(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("COMMTRAIN_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "compare":  # its own argparse, owned by the perf model
        return _compare(argv[1:])
    if argv and argv[0] == "ray":  # its own argparse (the launcher's)
        return _ray(argv[1:])
    parser = argparse.ArgumentParser(prog="commtrain", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train / fine-tune (launch with torchrun for several ranks)")
    p.add_argument("--config", help="YAML config (sections: model, data, train, parallel, compression, zero, link): "
                                     "a path, or a packaged example: tiny, pipeline, demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=20")
    p.set_defaults(fn=_train)

    p = sub.add_parser("demo", help="2-rank fine-tuning on a simulated slow link: fp32 vs 4-bit + error feedback")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--link", default="100mbit", help="link profile: a packaged name (100mbit, 1gbit, ...) or a YAML path")
    p.add_argument("--codec", default="quant:bits=4,group=128", help="gradient codec to compare with fp32")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.set_defaults(fn=_demo)

    sub.add_parser("compare", help="predict throughput of hardware setups and codecs (see compare --help)")
    sub.add_parser("ray", help="run `train` on a Ray cluster, one actor per rank (see ray --help)")

    p = sub.add_parser("schedule", help="print a pipeline schedule's step x rank grid (dry run)")
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.set_defaults(fn=_schedule)

    p = sub.add_parser("export", help="write a run's trained model as a Hugging Face or commtrain GPT directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's out_dir (config.yaml + checkpoints/)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    p.add_argument("--lora", choices=("merge", "adapter"), default=None,
                   help="LoRA adapters: merge into the weights, or save as an adapter")
    p.add_argument("--config", default=None, help="the run's config, for runs without RUN_DIR/config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (with --config)")
    p.set_defaults(fn=_export)

    p = sub.add_parser("generate", help="sample text from an exported model directory")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a `commtrain export` output (HF or commtrain GPT)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.set_defaults(fn=_generate)

    p = sub.add_parser("plot", help="draw loss, step time and wire bytes per channel of runs into one PNG")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/metrics.png, or compare.png for several)")
    p.set_defaults(fn=_plot)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
