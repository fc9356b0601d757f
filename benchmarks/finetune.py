"""Fine-tuning fidelity: a cached base model fine-tuned on a different text, per codec row and seed.

    python benchmarks/finetune.py pretrain                      # build (or reuse) the cached base model
    python benchmarks/finetune.py finetune --rows fp32 "quant 4-bit + EF" --seeds 0 1 2
    python benchmarks/finetune.py report                        # table + PNG from the JSON only

This is the mission's own case: quality *while fine-tuning* over a slow network.

1. ``pretrain``: the built-in GPT (``--preset``, default gpt-micro 3.3M params) is trained on
   the stdlib corpus (Python source, byte tokenizer) by one uncompressed ``commtrain train``
   process. Its final checkpoint is converted into the ``model.init_from`` format
   (``config.json`` + ``model.safetensors``, :mod:`commtrain.models.pretrained`) and cached under
   ``--cache/base-<key>/``, ``key`` = hash of every pretraining setting, the corpus fingerprint
   (the stdlib differs across Python versions) and the torch version. Every later row reuses it;
   ``--force`` rebuilds it. The conversion is checked: the saved model's eval loss on the
   stdlib held-out split must equal the run's own final eval.
2. ``finetune``: for each row (a named set of ``--set`` overrides, table ``ROWS`` below) and
   each seed, ``commtrain train`` with ``model.init_from=<base>`` on the vendored
   ``data.source=shakespeare`` (Early Modern English verse, a different distribution), 2 ranks.
   Every row sees the same tokens: global batch ``--global-batch`` sequences of ``--seq-len``
   per step for ``--steps`` steps (a row's per-replica batch is global_batch / dp). The seed
   changes the data order only (the weights all come from the base). The held-out set is the
   same fixed ``--eval-batches`` x global-batch windows for every row; the base model's loss on
   it (before fine-tuning) is measured in-process.
3. The table: per row the mean final eval loss over seeds, its spread (std, min..max), the
   difference to fp32 in % of fp32's mean with the paired per-seed differences beside it (seed s
   of a row and seed s of fp32 see the same batches), and the target verdict. Loss curves (mean
   over seeds) go to ``benchmarks/plots/finetune.png``, everything to ``benchmarks/results/finetune.json``.

Adding rows: append to ``ROWS`` (one line each) and run ``finetune --rows <name>``; results
merge into the JSON as long as the shared settings are unchanged (else ``--fresh``). Hooks:
codec rows are ``compression.grad=...``; pipeline rows set ``pp=2`` (the harness then uses dp = 1
and doubles the per-replica batch, so tokens stay equal) plus ``compression.act``/``act_grad``;
outer-sync rows (``sync.strategy=diloco``, another issue) are plain ``--set`` lists too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from commtrain.demo import torchrun  # noqa: E402
from commtrain.metrics import read_metrics  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One fine-tuning configuration: ``sets`` are ``commtrain train --set`` overrides applied
    after the shared ones; ``target`` is the allowed final-eval-loss increase over the ``ref``
    row (0.01 = 1%), None for no target; ``pp`` > 1 makes a pipeline row (dp = nproc / pp),
    whose natural ``ref`` is an uncompressed pipeline row."""

    sets: tuple[str, ...]
    target: float | None = None
    pp: int = 1
    note: str = ""
    ref: str = "fp32"


REFERENCE = "fp32"
_DILOCO = ("sync.strategy=diloco", "sync.outer_optimizer=sgd", "sync.outer_lr=1.0")
# -- the rows: one table, selectable with --rows ---------------------------------------------
ROWS: dict[str, Row] = {
    "fp32": Row(("compression.grad=none",), note="uncompressed reference"),
    "quant 4-bit + EF": Row(("compression.grad=quant:bits=4,group=128", "compression.error_feedback=true"),
                            target=0.01),
    # Every DP gradient codec (issue 12, item 2). Unbiased codecs (fp16, natural, natural_dither)
    # run as plain codecs; biased ones (quant, top-k) behind error feedback.
    "fp16": Row(("compression.grad=fp16", "compression.error_feedback=false")),
    "quant 8-bit + EF": Row(("compression.grad=quant:bits=8,group=128", "compression.error_feedback=true")),
    "quant 2-bit + EF": Row(("compression.grad=quant:bits=2,group=128", "compression.error_feedback=true")),
    "natural": Row(("compression.grad=natural", "compression.error_feedback=false")),
    "natural_dither": Row(("compression.grad=natural_dither", "compression.error_feedback=false")),
    "top-k 1% + EF": Row(("compression.grad=topk:ratio=0.01", "compression.error_feedback=true"), target=0.03),
    # Pipeline rows (pp=2, dp=1; the fp32 pipeline is their reference):
    "pp2 fp32": Row(("compression.grad=none",), pp=2, note="uncompressed pipeline reference"),
    "pp2 AC-SGD 2/4": Row(("compression.act=quant:bits=2,group=128", "compression.act_grad=quant:bits=4,group=128",
                           "compression.act_delta=true"), target=0.02, pp=2, ref="pp2 fp32",
                          note="no warm-up; first visits per compression.act_first"),
    "pp2 direct 2-bit": Row(("compression.act=quant:bits=2,group=128", "compression.act_grad=quant:bits=4,group=128",
                             "compression.act_delta=false"), pp=2, ref="pp2 fp32", note="no per-sample buffers"),
    "pp2 rotated 4-bit": Row(("compression.act=quant:bits=4,group=128,rotate=hadamard",
                              "compression.act_grad=quant:bits=4,group=128,rotate=hadamard",
                              "compression.act_delta=false"), pp=2, ref="pp2 fp32",
                             note="TAH-Quant-style: Hadamard-rotated groups, no buffers"),
    "PowerSGD rank 4": Row(("compression.grad=powersgd:rank=4", "compression.error_feedback=true"), target=0.02),
    # Outer-sync rows (issue 10): no per-step traffic; every H inner steps a pseudo-gradient sync.
    # Plain averaging (outer SGD, lr 1): in this 150-step fine-tune DiLoCo's Nesterov 0.7/0.9
    # (the defaults, tuned for long pre-training) overshot (see benchmarks/results/outer_sync.md).
    "DiLoCo H=32 fp32": Row(_DILOCO + ("sync.inner_steps=32", "sync.codec=none"), note="the outer loop alone"),
    "DiLoCo H=32 2-bit + EF": Row(_DILOCO + ("sync.inner_steps=32", "sync.codec=quant:bits=2,group=128,rounding=nearest")),
    "DiLoCo H=32 top-k 1% 2-bit + EF": Row(
        _DILOCO + ("sync.inner_steps=32", "sync.codec=topk:ratio=0.01,chunk=4096,value_bits=2"),
        target=0.01, note="SparseLoCo-grade pseudo-gradient: the >= 1000x row"),
}


# -- shared settings ------------------------------------------------------------------------
def pretrain_settings(args) -> dict:
    return dict(preset=args.preset, source="stdlib", tokenizer="byte", max_bytes=args.pretrain_max_bytes,
                steps=args.pretrain_steps, lr=args.pretrain_lr, lr_warmup=args.pretrain_warmup,
                batch_size=args.pretrain_batch, seq_len=args.seq_len, seed=0, eval_batches=args.eval_batches)


def finetune_settings(args, base_key: str) -> dict:
    return dict(base=base_key, source="shakespeare", steps=args.steps, lr=args.lr, lr_warmup=args.lr_warmup,
                global_batch=args.global_batch, seq_len=args.seq_len, nproc=args.nproc, eval_every=args.eval_every,
                eval_batches=args.eval_batches, set=list(args.set))


def _sets(pairs: list[str]) -> list[str]:
    return [a for s in pairs for a in ("--set", s)]


def _yaml_float(x: float) -> str:
    """A float YAML reads back as a float ("1e-05" is a string in YAML 1.1; "1.0e-05" is not)."""
    text = repr(float(x))
    mant, e, exp = text.partition("e")
    return f"{mant}.0e{exp}" if e and "." not in mant else text


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


# -- stage 1: the cached base model -----------------------------------------------------------
def base_key(settings: dict) -> str:
    import torch

    from commtrain.data import fingerprint, load_text

    corpus = fingerprint(load_text(settings["source"], max_bytes=settings["max_bytes"]))
    blob = json.dumps({**settings, "corpus": corpus, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load_final_state(run: Path, step: int) -> dict:
    """The model state_dict of the run's checkpoint at ``step`` (rank 0's shard, checksum verified)."""
    import torch

    from commtrain.checkpoint import sha256_file

    ckpt = run / "checkpoints" / f"step_{step:08d}"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    entry = next(e for e in manifest["shards"] if e["file"] == "rank0.pt")
    shard = ckpt / "rank0.pt"
    if shard.stat().st_size != entry["bytes"] or sha256_file(shard) != entry["sha256"]:
        raise RuntimeError(f"{shard} fails its manifest check; rebuild with --force")
    return torch.load(shard, map_location="cpu", weights_only=True)["model"]


def eval_loss(model, source: str, seq_len: int, n_windows: int, max_bytes: int = 2_000_000) -> float:
    """Mean token loss over the first ``n_windows`` held-out windows of ``source`` -- the set
    ``Trainer.evaluate`` uses (eval_batches x global batch; every window has seq_len targets,
    so the mean over windows is the mean over tokens)."""
    import torch

    from commtrain.data import DataConfig, build_data

    _, ev, _ = build_data(DataConfig(source=source, seq_len=seq_len, max_bytes=max_bytes), model.vocab_size)
    ids = list(ev.ids)[:n_windows]
    if len(ids) < n_windows:
        raise ValueError(f"--eval-batches: the held-out split has {len(ev)} windows, fewer than {n_windows}")
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(ids), 16):
            _, x, y = ev.batch(ids[i : i + 16])
            total += model(x, targets=y)[1].item() * len(x)
    return total / len(ids)


def pretrain(args) -> dict:
    """Build or reuse the base; returns its record (``model_dir``, key, losses, wall time)."""
    import torch

    from commtrain.data import DataConfig
    from commtrain.models import GPT, load_gpt_dir, preset_config, save_gpt_dir, tokenizer_info

    s = pretrain_settings(args)
    key = base_key(s)
    home = Path(args.cache) / f"base-{key}"
    record_path = home / "base.json"
    if record_path.exists() and not args.force:
        rec = {**json.loads(record_path.read_text()), "model_dir": str(home / "model")}  # the cache may have moved
        print(f"base model: cached {home} (pretrained in {rec['wall_s']:.0f}s; --force rebuilds)")
        return rec
    run = home / "run"
    shutil.rmtree(run, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = [
        f"model.preset={s['preset']}", f"data.source={s['source']}", f"data.tokenizer={s['tokenizer']}",
        f"data.max_bytes={s['max_bytes']}", f"train.steps={s['steps']}", f"train.lr={_yaml_float(s['lr'])}",
        f"train.lr_warmup_steps={s['lr_warmup']}", f"train.batch_size={s['batch_size']}",
        f"train.seq_len={s['seq_len']}", f"train.seed={s['seed']}", f"train.eval_every={max(1, s['steps'] // 4)}",
        f"train.eval_batches={s['eval_batches']}", f"train.checkpoint_every={s['steps']}", "train.keep_checkpoints=1",
        "train.progress=false", "resume=false", "compression.grad=none", "link.profile=null", f"out_dir={run}",
    ]
    print(f"base model: pretraining {s['preset']} for {s['steps']} steps on the stdlib corpus -> {home}", flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "commtrain", "train", *_sets(sets)], check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    rows = read_metrics(run / "metrics.jsonl")
    final = [r for r in rows if r.get("final")][-1]["eval_loss"]

    model = GPT(preset_config(s["preset"]))
    model.load_state_dict(_load_final_state(run, s["steps"]))
    tok = tokenizer_info(DataConfig(source=s["source"], tokenizer=s["tokenizer"], max_bytes=s["max_bytes"]))
    model_dir = save_gpt_dir(model, tok, home / "model")
    # The conversion must reproduce the run's own final eval (same windows: eval_batches x batch).
    loaded, _ = load_gpt_dir(model_dir)
    check = eval_loss(loaded, s["source"], s["seq_len"], s["eval_batches"] * s["batch_size"], s["max_bytes"])
    if abs(check - final) > 1e-4:
        raise RuntimeError(f"saved base evaluates to {check:.5f} but the run ended at {final:.5f}")
    rec = dict(key=key, settings=s, model_dir=str(model_dir), wall_s=wall, torch=torch.__version__,
               pretrain_final_eval_loss=final,
               pretrain_eval=[(r["step"], r["eval_loss"]) for r in rows if r.get("event") == "eval"],
               pretrain_loss=[r["loss"] for r in rows if "event" not in r])
    record_path.write_text(json.dumps(rec))
    print(f"base model: {wall:.0f}s, final stdlib eval loss {final:.4f}; saved {model_dir}", flush=True)
    return rec


# -- stage 2: fine-tuning rows ----------------------------------------------------------------
def finetune_sets(name: str, seed: int, base: dict, args, out: Path) -> list[str]:
    """The ``--set`` overrides of one fine-tuning run (shared settings, then the row's own)."""
    row = ROWS[name]
    dp = args.nproc // row.pp
    if dp < 1 or dp * row.pp != args.nproc or args.global_batch % dp:
        raise SystemExit(f"row {name!r}: pp={row.pp} with --nproc {args.nproc} and --global-batch {args.global_batch} "
                         "does not give an integer dp and per-replica batch")
    return [
        f"model.init_from={base['model_dir']}", "data.source=shakespeare", "data.tokenizer=byte",
        f"train.steps={args.steps}", f"train.lr={_yaml_float(args.lr)}", f"train.lr_warmup_steps={args.lr_warmup}",
        f"train.batch_size={args.global_batch // dp}", f"train.seq_len={args.seq_len}", f"train.seed={seed}",
        f"train.eval_every={args.eval_every}", f"train.eval_batches={args.eval_batches}", "train.checkpoint_every=0",
        "train.progress=false", "resume=false", "link.profile=null", f"parallel.pp={row.pp}",
        "compression.policy=always", "compression.warmup_steps=0", f"out_dir={out}",
        *args.set, *row.sets,
    ]


def run_finetune(name: str, seed: int, base: dict, args) -> dict:
    out = Path(args.work) / f"{_slug(name)}_s{seed}"
    shutil.rmtree(out, ignore_errors=True)  # scratch: a fresh run (resume=false refuses a used dir)
    sets = finetune_sets(name, seed, base, args, out)
    t0 = time.perf_counter()
    torchrun(args.nproc, ["train", *_sets(sets)])
    wall = time.perf_counter() - t0
    # Rank 0's metrics carry the run's losses (the logged loss and the eval loss are all-reduced
    # over the ranks); wire bytes differ per rank (pipeline stages send different channels), so
    # they are averaged over every rank's file.
    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "event" not in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("event") == "eval"]
    wire = []
    for f in [out / "metrics.jsonl", *sorted(out.glob("metrics_rank*.jsonl"))]:
        st = [r for r in read_metrics(f) if "event" not in r]
        wire.append(statistics.median(sum(r["wire_bytes"].values()) for r in st[1:] or st))
    res = dict(seed=seed, wall_s=wall, final_eval_loss=evals[-1][1], eval=evals, loss=[r["loss"] for r in steps],
               wire_bytes_per_step=statistics.mean(wire),
               step_time_s=statistics.median(r["step_time_s"] for r in steps[3:] or steps))
    print(f"  {name:<20} seed {seed}: final eval loss {res['final_eval_loss']:.4f}  ({wall:.0f}s wall)", flush=True)
    return res


# -- the table ---------------------------------------------------------------------------------
def summarize(data: dict) -> list[dict]:
    """Per row: mean/std/min/max of final eval loss over seeds, relative difference to its
    reference row (fp32 unless the row names another; of the means, and paired per seed over
    the seeds both have), target verdict (met when the mean difference is <= the target)."""
    rows = data["rows"]
    out = []
    for name in [n for n in ROWS if n in rows] + sorted(n for n in rows if n not in ROWS):
        ref_name = rows[name].get("ref", REFERENCE)
        ref = rows.get(ref_name, {}).get("seeds", {}) if ref_name != name else {}
        ref_mean = statistics.mean(r["final_eval_loss"] for r in ref.values()) if ref else None
        seeds = rows[name]["seeds"]
        vals = [seeds[k]["final_eval_loss"] for k in sorted(seeds, key=int)]
        s = dict(name=name, n=len(vals), mean=statistics.mean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                 min=min(vals), max=max(vals), target=rows[name].get("target"), rel=None, paired=[],
                 wire=statistics.mean(seeds[k]["wire_bytes_per_step"] for k in seeds),
                 wall=statistics.mean(seeds[k]["wall_s"] for k in seeds), ref=ref_name)
        if ref_mean:
            s["rel"] = s["mean"] / ref_mean - 1
            s["paired"] = [seeds[k]["final_eval_loss"] / ref[k]["final_eval_loss"] - 1 for k in sorted(seeds, key=int)
                           if k in ref]
        t = s["target"]
        s["verdict"] = "" if t is None or s["rel"] is None else ("met" if s["rel"] <= t else "MISSED")
        out.append(s)
    return out


def format_table(data: dict) -> str:
    lines = ["| row | seeds | final eval loss, mean | std | min..max | vs fp32 (means) | paired per seed: mean ± std, "
             "min..max | target | wire MB/step/rank | wall s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summarize(data):
        rel = "" if s["rel"] is None else f"{100 * s['rel']:+.2f}%" + ("" if s["ref"] == REFERENCE else f" (vs {s['ref']})")
        if s["name"] == REFERENCE:
            rel = "(reference)"
        if s["paired"]:
            p = s["paired"]
            sd = statistics.stdev(p) if len(p) > 1 else 0.0
            paired = f"{100 * statistics.mean(p):+.2f}% ± {100 * sd:.2f}, {100 * min(p):+.2f}..{100 * max(p):+.2f}%"
        else:
            paired = ""
        tgt = "" if s["target"] is None else f"<= +{100 * s['target']:.0f}%: {s['verdict']}"
        lines.append(f"| {s['name']} | {s['n']} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f}..{s['max']:.4f} "
                     f"| {rel} | {paired} | {tgt} | {s['wire'] / 1e6:.2f} | {s['wall']:.0f} |")
    base = data.get("base", {})
    if "ft_eval_before" in base:
        lines.append("")
        lines.append(f"Base model ({base['settings']['preset']}, pretrained {base['settings']['steps']} steps on stdlib "
                     f"in {base['wall_s']:.0f}s): eval loss {base['pretrain_final_eval_loss']:.4f} on stdlib, "
                     f"{base['ft_eval_before']:.4f} on the fine-tuning corpus before fine-tuning.")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    before = data.get("base", {}).get("ft_eval_before")
    for name in [n for n in ROWS if n in data["rows"]] + sorted(n for n in data["rows"] if n not in ROWS):
        seeds = list(data["rows"][name]["seeds"].values())
        style = dict(lw=2.2, color="black") if name == REFERENCE else dict(lw=1.2)
        loss = np.mean([s["loss"] for s in seeds], axis=0)
        w = min(10, len(loss))
        ax.plot(np.arange(w, len(loss) + 1), np.convolve(loss, np.ones(w) / w, mode="valid"),
                label=f"{name} (mean of {len(seeds)} seeds)", **style)
        steps = [st for st, _ in seeds[0]["eval"]]
        ev = np.array([[v for _, v in s["eval"]] for s in seeds])
        if before is not None:
            steps, ev = [0, *steps], np.hstack([np.full((len(seeds), 1), before), ev])
        line, = ax2.plot(steps, ev.mean(0), marker="o", ms=3, label=name, **style)
        ax2.fill_between(steps, ev.min(0), ev.max(0), color=line.get_color(), alpha=0.15)
    st = data["settings"]
    ax.set_title(f"fine-tuning train loss ({w}-step moving mean), {st['nproc']} ranks")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    ax2.set_title("held-out eval loss: mean over seeds, band min..max; step 0 = base")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# -- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command line; also the shared settings other benchmarks reuse (outer_sync.py)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["pretrain", "finetune", "report"])
    ap.add_argument("--rows", nargs="*", default=[REFERENCE, "quant 4-bit + EF"],
                    help="rows to fine-tune, from: " + ", ".join(ROWS).replace("%", "%%"))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    # Pretraining (cached by a hash of these, the corpus and torch).
    ap.add_argument("--preset", default="gpt-micro")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--pretrain-warmup", type=int, default=40)
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--pretrain-max-bytes", type=int, default=2_000_000)
    ap.add_argument("--force", action="store_true", help="rebuild the cached base model")
    # Fine-tuning (equal for every row).
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-warmup", type=int, default=10)
    ap.add_argument("--global-batch", type=int, default=16, help="sequences per step over all replicas")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--eval-batches", type=int, default=16, help="held-out windows = eval_batches x global batch")
    ap.add_argument("--set", action="append", default=[], help="extra override for every fine-tuning run")
    ap.add_argument("--cache", default=str(ROOT / "benchmarks" / "out" / "finetune_cache"))
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "out" / "finetune_runs"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    ap.add_argument("--png", default=str(ROOT / "benchmarks" / "plots" / "finetune.png"))
    ap.add_argument("--fresh", action="store_true", help="discard the rows already in --json")
    ap.add_argument("--row", action="append", default=[], metavar="NAME|SET;SET;...",
                    help="an ad-hoc row (e.g. a sweep point): 'H8 avg|sync.strategy=diloco;sync.inner_steps=8'")
    return ap


def add_adhoc_rows(specs: list[str]) -> list[str]:
    """Register ``--row 'NAME|a.b=1;c.d=2'`` rows; returns their names."""
    names = []
    for spec in specs:
        name, bar, sets = spec.partition("|")
        if not bar or not name.strip() or not sets.strip():
            raise SystemExit(f"--row {spec!r}: expected 'NAME|key=value;key=value'")
        ROWS[name.strip()] = Row(tuple(x.strip() for x in sets.split(";") if x.strip()))
        names.append(name.strip())
    return names


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.rows = list(args.rows) + [n for n in add_adhoc_rows(args.row) if n not in args.rows]
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; allowed: {list(ROWS)}")

    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() and not args.fresh else {"rows": {}}
    if args.stage == "report":
        if not data["rows"]:
            ap.error(f"{path} holds no rows yet; run the finetune stage first")
        print(format_table(data))
        plot(data, Path(args.png))
        return 0

    base = pretrain(args)
    if args.stage == "pretrain":
        return 0

    from commtrain.models import load_gpt_dir

    settings = finetune_settings(args, base["key"])
    if data.get("settings") not in (None, settings) and data["rows"]:
        ap.error(f"{path} holds rows measured with other settings ({data['settings']}); "
                 "use the same settings, another --json, or --fresh")
    n_eval = args.eval_batches * args.global_batch
    base = {**base, "ft_eval_before": eval_loss(load_gpt_dir(base["model_dir"])[0], "shakespeare", args.seq_len, n_eval)}
    print(f"base model on the fine-tuning corpus (held-out, {n_eval} windows): eval loss {base['ft_eval_before']:.4f}")
    shown = Path(base["model_dir"])
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    data.update(settings=settings, base={**{k: v for k, v in base.items() if k != "pretrain_loss"}, "model_dir": str(shown)})
    t0 = time.perf_counter()
    for name in args.rows:
        row = ROWS[name]
        entry = data["rows"].setdefault(name, {})
        entry.update(sets=list(row.sets), target=row.target, pp=row.pp, note=row.note, ref=row.ref)
        entry.setdefault("seeds", {})
        for seed in args.seeds:
            entry["seeds"][str(seed)] = run_finetune(name, seed, base, args)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data))
    print(f"fine-tuning: {len(args.rows)} rows x {len(args.seeds)} seeds in {time.perf_counter() - t0:.0f}s")
    print(format_table(data))
    plot(data, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
