"""``commtrain`` command line: train, demo, compare, schedule, ray, export, generate, plot.

``torchrun --nproc_per_node=N -m commtrain train --config my_run.yaml --set a.b=c`` (or ``--config tiny``:
a packaged example config, ``commtrain/configs/<name>.yaml``)
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


def _train(args) -> int:
    """One rank of a training run (or, with ``--nproc``, the launcher of N local ranks).

    Errors: an error that ends the run prints *one line* on rank 0 -- ``commtrain: error:``
    and what is wrong / allowed / to do -- and every rank exits 2; the other ranks print
    nothing. Config errors and :class:`~commtrain.runtime.RunError` (a refused out_dir,
    non-finite stop, unverifiable checkpoints, ...) are raised by all ranks alike and carry
    a complete message; any other exception is shown as ``ExceptionType: message`` with
    where the tracebacks are. The full traceback goes to ``out_dir/error.log`` (rank r > 0:
    ``error_rank<r>.log``) once the run owns its out_dir, else to ``commtrain-error*.log``
    in the temp directory; ``--debug`` prints it to stderr as well.
    """
    if args.nproc:
        if "LOCAL_RANK" in os.environ:
            print("commtrain: error: --nproc inside a launched rank (torchrun/Ray already started the ranks); "
                  "drop --nproc", file=sys.stderr)
            return 2
        return _launch(args)
    from .config import ConfigError, load_config

    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.set)
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
        from .train import train

        train(cfg, overwrite=args.overwrite)
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops at the next step boundary)
        if rank == 0:
            print("commtrain: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 -- every error that ends the run: one line, exit 2
        from .runtime import RunError

        kind = "config error" if isinstance(e, ConfigError) else "error"
        return _report_error(e, rank, debug=args.debug, agreed=isinstance(e, (ConfigError, RunError)), kind=kind)


def _report_error(e: BaseException, rank: int, debug: bool, agreed: bool, kind: str = "error") -> int:
    """Write the traceback to the run's error log, print one line (rank 0 only), return 2."""
    import traceback

    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    where = None if kind == "config error" else _write_error_log(text, rank)  # a config error's line is all
    if debug:
        print(text, file=sys.stderr, end="", flush=True)
    if rank != 0:
        return 2
    message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held
    if not agreed:  # not one of ours: name the exception, and where every rank's traceback is
        message = f"{type(e).__name__}: {message}" + (f" (tracebacks: {where}, error_rank<r>.log beside it)"
                                                      if where else "")
    print(f"commtrain: {kind}: {message}", file=sys.stderr, flush=True)
    return 2


def _write_error_log(text: str, rank: int):
    """Append ``text`` to ``error.log`` (rank r > 0: ``error_rank<r>.log``) in the run's
    directory once the run owns it, else in the temp directory; the path, or None."""
    import datetime
    import tempfile
    from pathlib import Path

    from .runtime import claimed_run_dir

    run_dir = claimed_run_dir()
    name = "error.log" if rank == 0 else f"error_rank{rank}.log"
    path = Path(run_dir) / name if run_dir is not None else Path(tempfile.gettempdir()) / f"commtrain-{name}"
    try:
        with open(path, "a") as f:
            f.write(f"== {datetime.datetime.now().isoformat(timespec='seconds')} rank {rank}: {' '.join(sys.argv)}\n"
                    f"{text}\n")
    except OSError:
        return None
    return path


def _launch(args) -> int:
    """``commtrain train --nproc N``: torchrun on this machine (loopback rendezvous, a free
    port), in this process, with torchrun's own failure report left out: the ranks already
    printed the one line that says what went wrong. Exit status: the ranks' (2 for a run
    error), 1 when a rank died otherwise."""
    import socket

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its banner
    worker = ["train", *(["--config", args.config] if args.config else []),
              *[a for item in args.set for a in ("--set", item)],
              *(["--overwrite"] if args.overwrite else []), *(["--debug"] if args.debug else [])]
    targs = get_args_parser().parse_args([
        f"--nproc_per_node={args.nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
        f"--max-restarts={args.max_restarts}", "-m", "commtrain", *worker,
    ])
    if not args.debug:  # the agent's own warnings/errors repeat what the ranks said
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        run(targs)
        return 0
    except SignalException as e:  # Ctrl-C / SIGTERM here: the ranks got it too and stop at a step boundary
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode == 2:  # a run error: rank 0 printed its line
            return 2
        how = f"signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else f"status {failure.exitcode}"
        print(f"commtrain: error: rank {rank} exited with {how}", file=sys.stderr, flush=True)
        return 1


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
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh even if out_dir holds a run: the old run is moved aside (renamed, not deleted)")
    p.add_argument("--debug", action="store_true", help="print full tracebacks on stderr (always in out_dir/error.log)")
    p.add_argument("--nproc", type=int, default=0, metavar="N",
                   help="launch N local ranks (torchrun on loopback) and keep errors to one line")
    p.add_argument("--max-restarts", type=int, default=0, help="with --nproc: torchrun's --max-restarts")
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
                   help="a LoRA run's adapters: merge into the weights (the default), or write a peft adapter directory")
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
