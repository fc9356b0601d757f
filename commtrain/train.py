"""The Trainer: composes model, data, mesh, communicators, the gradient sync and the pipeline
from one config, then runs the loop.

Read :meth:`Trainer.fit` and :meth:`Trainer.train_step` first; everything else is set-up.
The strategy (plain DP, ZeRO, a pipeline) is chosen once, in ``__init__``: the loop talks to
one :class:`~commtrain.parallel.sync.GradSync` and one ``forward_backward`` and never
branches on it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from .checkpoint import Checkpointer
from .comm import ByteMeter, Communicator
from .config import Config
from .data import ShardedSampler, build_data
from .export import write_run_config
from .metrics import MetricsLogger, read_metrics, summary_line
from .models import build_model
from .parallel.mesh import Mesh
from .parallel.pipeline import PipelineEngine
from .parallel.sync import build_sync
from .runtime import RNGState, distributed, maybe_inject_fault, seed_everything

log = logging.getLogger(__name__)


def train(cfg: Config) -> dict[str, Any]:
    import os

    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    with distributed(cfg) as device:
        trainer = Trainer(cfg, device)
        try:
            return trainer.fit()
        finally:
            trainer.close()


class Trainer:
    def __init__(self, cfg: Config, device: torch.device):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Every derived value (dp degree, tokenizer, vocab, seq_len) written out once, on a copy.
        self.cfg = cfg = cfg.resolved(self.world_size)
        self.device = device
        tc, pc, cc = cfg.train, cfg.parallel, cfg.compression
        self.mesh = Mesh(pc.pp, pc.dp)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

        # Same seed on every rank: DP replicas start identical without a broadcast.
        seed_everything(tc.seed)
        model = build_model(cfg.model)
        self.train_ds, self.eval_ds, self.tokenizer = build_data(
            cfg.data, model.vocab_size, hf_tokenizer=getattr(model, "tokenizer", None), block_size=model.block_size,
        )
        self._check_same_data()
        if self.rank == 0:  # the resolved config beside the checkpoints, for `commtrain export`
            write_run_config(cfg, self.out_dir)
        # AC-SGD keeps per-sample buffers per replica, so with delta compression each sample
        # stays on one replica across epochs (else it would be "unseen", sent uncompressed).
        acsgd = pc.pp > 1 and cc.act_delta and cc.act != "none"
        self.sampler = ShardedSampler(
            self.train_ds, tc.batch_size, self.mesh.dp_rank, self.mesh.dp_size, seed=tc.seed, sticky=acsgd
        )

        # One meter and one link per process: DP and PP traffic share the NIC.
        self.meter = ByteMeter()
        link = cfg.link.build()
        self.comms = [Communicator(self.mesh.dp_group, link=link, meter=self.meter, timeout_s=cfg.timeout_s)]
        self.module = (model.stage_modules(pc.pp)[self.mesh.stage] if pc.pp > 1 else model).to(device)

        # The gradient sync: the one object the loop reduces and steps through.
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        optim_factory = lambda params: torch.optim.AdamW(  # noqa: E731
            params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95)
        )
        strategy = cfg.sync.strategy_name(cfg.zero.stage)
        extra = {"zero": dict(stage=cfg.zero.stage, buckets_in_flight=cfg.zero.buckets_in_flight),
                 "diloco": dict(config=cfg.sync)}.get(strategy, {})
        self.sync = build_sync(strategy, named, optim_factory, self.comms[0], compression=cc,
                               bucket_mb=pc.bucket_mb, overlap=pc.overlap, **extra)

        # forward + backward of one batch: the module's own, or the pipeline schedule's.
        self.stateful: dict[str, Any] = {"model": self.module, "sync": self.sync, "sampler": self.sampler,
                                         "rng": RNGState()}
        self.pipeline = None
        self.forward_backward: Callable = self._forward_backward
        self.eval_batch_loss: Callable = self._eval_loss
        if pc.pp > 1:
            self.comms.append(Communicator(self.mesh.pp_group, link=link, meter=self.meter, timeout_s=cfg.timeout_s))
            self.pipeline = PipelineEngine(
                self.module, self.mesh, self.comms[1], schedule=pc.schedule, n_micro=pc.microbatches,
                loss_fn=model.loss, hidden_size=model.hidden_size, n_samples=len(self.train_ds),
                out_dir=str(self.out_dir), device=device, act=cc, no_sync=self.sync.no_sync,
            )
            self.forward_backward = lambda ids, x, y: self.pipeline.train_step(ids, x, y)
            self.eval_batch_loss = self.pipeline.eval_loss
            self.stateful["pipeline"] = self.pipeline
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=tc.keep_checkpoints)
        self.tokens_per_step = tc.batch_size * tc.seq_len * self.mesh.dp_size

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        tc = self.cfg.train
        start = self.maybe_resume()
        self.metrics = MetricsLogger(self.out_dir, self.rank, resume_step=start if start else None)
        bar = None
        if self.rank == 0 and tc.progress:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        last = {}
        for step in range(start, tc.steps):
            last = self.train_step(step)
            self.metrics.log(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            done = step + 1
            if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                self.metrics.log({"event": "eval", "step": done, "eval_loss": self.evaluate()})
            if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                self.checkpointer.save(done, self.state_dict(done))
            maybe_inject_fault(done, self.rank)
        if bar is not None:
            bar.close()
        final_sync = self.sync.finalize()  # e.g. DiLoCo: the last outer sync, replicas identical again
        if final_sync:
            self.metrics.log({"event": "final_sync", "step": tc.steps, **final_sync})
        summary = {"event": "eval", "step": tc.steps, "eval_loss": self.evaluate(), "final": True}
        self.metrics.log(summary)
        self.metrics.close()
        if self.rank == 0:  # one line: steps, tokens/s, bytes/step by channel, final eval loss, weights
            print(summary_line(read_metrics(self.metrics.path), self.out_dir), flush=True)
        return {**last, **summary}

    def train_step(self, step: int) -> dict[str, Any]:
        self._set_lr(step)
        ids, x, y = self._batch(step)
        # No meter reset here: bytes still crossing from the last step (an overlapped outer sync)
        # belong to the step during which they cross. Evaluation resets after itself.
        t0 = time.perf_counter()
        waits0 = self._comm_wait_s()

        self.sync.begin_step(step)  # arms the backward hooks: buckets reduce as they fill
        loss = self.forward_backward(ids, x, y)  # one batch (a pipeline: its whole schedule)
        stats = self.sync.step(max_grad_norm=self.cfg.train.grad_clip)  # finish reducing, clip, update
        self.sync.zero_grad()

        step_time = time.perf_counter() - t0
        comm_s = self._comm_wait_s() - waits0
        wire = self.meter.snapshot(reset=True)
        return {
            "step": step + 1,
            "loss": self._mean_loss(loss),
            "lr": self.sync.param_groups[0]["lr"],
            "step_time_s": step_time,
            "tokens_per_s": self.tokens_per_step / step_time,
            "wire_bytes": wire["bytes"],
            "modeled_comm_s": wire.get("modeled_s"),
            "compute_s": max(step_time - comm_s, 0.0),
            "comm_s": comm_s,
            **stats,
        }

    # -- pieces -----------------------------------------------------------------------------
    def _forward_backward(self, ids, x, y) -> float:
        _, loss = self.module(x, targets=y)
        loss.backward()
        return loss.item()

    def _eval_loss(self, x, y) -> float:
        self.module.eval()
        try:
            return float(self.module(x, targets=y)[1])
        finally:
            self.module.train()

    def _comm_wait_s(self) -> float:
        """Seconds this rank spent blocked on communication (exposed, not overlapped)."""
        return sum(c.wait_s for c in self.comms)

    def _set_lr(self, step: int) -> None:
        tc = self.cfg.train
        # Linear warm-up then cosine decay to 10%: the usual fine-tuning schedule.
        if step < tc.lr_warmup_steps:
            lr = tc.lr * (step + 1) / tc.lr_warmup_steps
        else:
            progress = (step - tc.lr_warmup_steps) / max(1, tc.steps - tc.lr_warmup_steps)
            lr = tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in self.sync.param_groups:
            g["lr"] = lr

    def _batch(self, step: int):
        # The batch is a pure function of (seed, step, dp rank): resuming at step k sees
        # exactly the batches the uninterrupted run saw.
        ids, x, y = self.train_ds.batch(self.sampler.rank_batch(step))
        return ids, x.to(self.device), y.to(self.device)

    def _check_same_data(self) -> None:
        """Every rank must tokenize the same corpus (the stdlib corpus differs across Python versions)."""
        prints = [None] * self.world_size
        dist.all_gather_object(prints, self.train_ds.fingerprint())
        if len(set(prints)) != 1:
            raise RuntimeError(f"ranks see different training data (fingerprints {prints}); use the same data and Python")

    def _mean_loss(self, loss) -> float:
        """Mean of the replicas' losses (the last stage's, in a pipeline) -- a tiny control message."""
        t = torch.tensor([float(loss)], device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world_size

    @torch.no_grad()
    def evaluate(self) -> float:
        tc = self.cfg.train
        n = min(len(self.eval_ds), tc.eval_batches * tc.batch_size * self.mesh.dp_size)
        mine = list(range(self.mesh.dp_rank, n, self.mesh.dp_size))
        if self.pipeline is not None:  # every eval batch must split into the microbatches
            mine = mine[: len(mine) - len(mine) % self.cfg.parallel.microbatches]
            if not mine:
                raise ValueError(
                    f"the held-out split ({len(self.eval_ds)} samples) is too small for "
                    f"parallel.microbatches={self.cfg.parallel.microbatches} per replica; raise data.eval_fraction"
                )
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for i in range(0, len(mine), tc.batch_size):
            chunk = mine[i : i + tc.batch_size]
            _, x, y = self.eval_ds.batch([self.eval_ds.first_id + j for j in chunk])
            loss = self.eval_batch_loss(x.to(self.device), y.to(self.device))
            total += torch.tensor([float(loss) * len(chunk), len(chunk)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        self.meter.snapshot(reset=True)  # evaluation traffic (pipeline activations) is no step's
        return (total[0] / total[1]).item()

    # -- checkpoints: one dict of named stateful parts ----------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, **{name: part.state_dict() for name, part in self.stateful.items()}}

    def maybe_resume(self) -> int:
        if not self.cfg.resume:
            return 0
        found = self.checkpointer.load_latest()
        if found is None:
            return 0
        step, state = found
        missing = [name for name in self.stateful if name not in state]
        if missing:
            raise ValueError(f"checkpoint step {step} in {self.checkpointer.root} lacks {missing} (written by another "
                             f"version or layout of commtrain); use a fresh out_dir or resume=false")
        for name, part in self.stateful.items():
            part.load_state_dict(state[name])
        if self.rank == 0:
            log.warning("resumed from %s (step %d)", self.checkpointer.root / f"step_{step:08d}", step)
        return step

    def close(self) -> None:
        """Stop the threads this trainer started (hooks, comm workers, pipeline decoder)."""
        self.sync.close()
        if self.pipeline is not None:
            self.pipeline.close()
        for c in self.comms:
            c.close()
