"""The Trainer: composes model, data, mesh, communicators, the gradient sync and the pipeline
from one config, then runs the loop.

Read :meth:`Trainer.fit` and :meth:`Trainer.train_step` first; everything else is set-up.
The strategy (plain DP, ZeRO, a pipeline) is chosen once, in ``__init__``: the loop talks to
one :class:`~commtrain.parallel.sync.GradSync` and one ``forward_backward`` and never
branches on it.

A run never loses or mixes up its work: ``out_dir`` is claimed by run identity first
(:mod:`commtrain.rundir`: resume ``auto``/``never``/``must``); every step's update is vetoed
on every rank when any rank sees a non-finite loss or gradient norm (:mod:`commtrain.guard`,
``train.nonfinite``); SIGTERM/SIGINT stop at the next step boundary with a checkpoint; a
checkpoint is written at the end of every run; and problems found at start-up (the eval
split too small for the pipeline) end the run before the first step.
"""
from __future__ import annotations

import logging
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
from .guard import StepGuard
from .lr_schedule import WarmupCosine
from .metrics import MetricsLogger, read_metrics, summary_line
from .models import build_model
from .parallel.mesh import Mesh
from .parallel.pipeline import PipelineEngine
from .parallel.sync import build_sync
from .precision import Precision
from .rundir import Plan, fingerprint, plan
from .runtime import (
    RNGState, RunError, StopSignals, claim_run_dir, distributed, inject_nonfinite_grads, maybe_inject_fault,
    seed_everything,
)

log = logging.getLogger(__name__)


def train(cfg: Config, overwrite: bool = False) -> dict[str, Any]:
    """Run ``cfg`` in this process (one rank of torchrun's group, or a group of one).
    ``overwrite``: move a previous run in ``out_dir`` aside and start fresh (``--overwrite``)."""
    import os

    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    claim_run_dir(None)
    with distributed(cfg) as device:
        trainer = Trainer(cfg, device, overwrite=overwrite)
        try:
            return trainer.fit()
        finally:
            trainer.close()


class Trainer:
    def __init__(self, cfg: Config, device: torch.device, overwrite: bool = False):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Every derived value (dp degree, tokenizer, vocab, seq_len) written out once, on a copy.
        self.cfg = cfg = cfg.resolved(self.world_size)
        self.device = device
        self.sync = self.pipeline = None
        self.comms: list[Communicator] = []
        self.signals = StopSignals()
        try:
            self._build(overwrite)
        except BaseException:
            self.close()  # stop any thread already started, so that the error can end the process
            raise

    def _build(self, overwrite: bool) -> None:
        cfg = self.cfg
        tc, pc, cc = cfg.train, cfg.parallel, cfg.compression
        self.mesh = Mesh(pc.pp, pc.dp)
        self.out_dir = Path(cfg.out_dir)
        # Which run out_dir holds and what to do with it: decided before anything is written.
        self.plan = self._plan_run_dir(overwrite)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        claim_run_dir(self.out_dir)

        # Same seed on every rank: DP replicas start identical without a broadcast.
        seed_everything(tc.seed)
        model = build_model(cfg.model)
        self.train_ds, self.eval_ds, self.tokenizer = build_data(
            cfg.data, model.vocab_size, hf_tokenizer=getattr(model, "tokenizer", None), block_size=model.block_size,
        )
        self._check_same_data()
        self.eval_ids = self._eval_ids()  # None: no eval (data.eval_fraction=0); checked now, not at the end
        # AC-SGD keeps per-sample buffers per replica, so with delta compression each sample
        # stays on one replica across epochs (else it would be "unseen": a first visit, not a delta).
        acsgd = pc.pp > 1 and cc.act_delta and cc.act != "none"
        self.sampler = ShardedSampler(
            self.train_ds, tc.batch_size, self.mesh.dp_rank, self.mesh.dp_size, seed=tc.seed, sticky=acsgd
        )

        # One meter and one link per process: DP and PP traffic share the NIC.
        self.meter = ByteMeter()
        link = cfg.link.build()
        self.comms = [Communicator(self.mesh.dp_group, link=link, meter=self.meter, timeout_s=cfg.timeout_s)]
        self.module = (model.stage_modules(pc.pp)[self.mesh.stage] if pc.pp > 1 else model).to(self.device)
        # train.precision: autocast around forward + loss; fp32 master weights; fp16 loss scaling.
        self.precision = Precision(tc.precision, self.device)
        # COMMTRAIN_NONFINITE_STEPS (tests): NaN gradients at given steps, before the sync's hooks see them.
        self._step = 0
        self._fault_hooks = inject_nonfinite_grads(self.module.parameters(), self.rank, lambda: self._step + 1)

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
        # fp16: the gradient compression unscales each bucket and notes local overflows before
        # any codec sees it (DiLoCo is refused with fp16 at config time: its inner steps reduce nothing).
        self.precision.attach(getattr(self.sync, "compression", None))

        # forward + backward of one batch: the module's own, or the pipeline schedule's.
        self.schedule = WarmupCosine(tc.lr, tc.lr_warmup_steps, tc.steps)
        self.stateful: dict[str, Any] = {"model": self.module, "sync": self.sync, "sampler": self.sampler,
                                         "rng": RNGState(), "schedule": self.schedule, "precision": self.precision}
        self.forward_backward: Callable = self._forward_backward
        self.eval_batch_loss: Callable = self._eval_loss
        if pc.pp > 1:
            self.comms.append(Communicator(self.mesh.pp_group, link=link, meter=self.meter, timeout_s=cfg.timeout_s))
            self.pipeline = PipelineEngine(
                self.module, self.mesh, self.comms[1], schedule=pc.schedule, n_micro=pc.microbatches,
                loss_fn=model.loss, hidden_size=model.hidden_size, n_samples=len(self.train_ds),
                out_dir=str(self.out_dir), device=self.device, act=cc, no_sync=self.sync.no_sync,
                act_dtype=self.precision.act_dtype, autocast=self.precision.autocast,
                loss_scale=lambda: self.precision.loss_scale,
            )
            self.forward_backward = lambda ids, x, y: self.pipeline.train_step(ids, x, y)
            self.eval_batch_loss = self.pipeline.eval_loss
            self.stateful["pipeline"] = self.pipeline
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", keep=tc.keep_checkpoints,
                                         fingerprint=fingerprint(cfg.to_dict()),
                                         also_accept=tuple(filter(None, [self.plan.recorded_fingerprint])))
        self.tokens_per_step = tc.batch_size * tc.seq_len * self.mesh.dp_size
        # One tiny all-reduce per step: mean loss, non-finite veto, stop request (SIGTERM/SIGINT).
        self.guard = StepGuard(self.device, lambda: self.signals.received is not None)
        self.last_saved: int | None = None

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from the start (or the resumed step) to ``train.steps``; SIGTERM/SIGINT stop
        at a step boundary meanwhile (handlers installed for the loop only)."""
        self.signals.install()
        try:
            return self._fit()
        finally:
            self.signals.close()

    def _fit(self) -> dict[str, Any]:
        tc = self.cfg.train
        start = self.maybe_resume()
        if self.rank == 0:  # the run's record: the resolved config, for resume and `commtrain export`
            write_run_config(self.cfg, self.out_dir)
        self.metrics = MetricsLogger(self.out_dir, self.rank, resume_step=start if start else None)
        bar = None
        if self.rank == 0 and tc.progress:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        last: dict[str, Any] = {}
        stop, done = None, start
        self.skipped_in_row, self.skipped_total = 0, 0
        for step in range(start, tc.steps):
            last = self.train_step(step)
            done = step + 1
            stop = self._after_step(last, done)
            self._log_decision()
            self.metrics.log(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            if stop:
                break
            if self.eval_ids is not None and tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                self.metrics.log({"event": "eval", "step": done, "eval_loss": self.evaluate()})
            if tc.checkpoint_every and done % tc.checkpoint_every == 0:
                self.save(done)
            maybe_inject_fault(done, self.rank)
        if bar is not None:
            bar.close()
        return self._finish(stop, done, last)

    def _finish(self, stop: str | None, done: int, last: dict[str, Any]) -> dict[str, Any]:
        """End of the loop, completed or ``stop``ped ("signal", "nonfinite") after step ``done``."""
        tc = self.cfg.train
        if stop is None:  # completed: e.g. DiLoCo's last outer sync, every replica holds the final model
            final_sync = self.sync.finalize()
            if final_sync:
                self.metrics.log({"event": "final_sync", "step": done, **final_sync})
                self.last_saved = None  # the weights changed after any checkpoint of this step
        # Weights are never lost: a checkpoint at the end of every run -- completed, stopped by
        # a signal or by the non-finite guard (the skipped steps left the weights untouched).
        if self.last_saved != done:
            self.save(done)
        saved = self.checkpointer.root / f"step_{done:08d}"
        if stop == "nonfinite":
            self.metrics.close()
            n = self.skipped_in_row
            why = ("at this step" if tc.nonfinite == "stop" else
                   f"at {n} consecutive steps ({done - n + 1}-{done}; limit train.max_nonfinite_steps="
                   f"{tc.max_nonfinite_steps})")
            raise RunError(
                f"train.nonfinite={tc.nonfinite}: stopped after step {done}: the loss or gradient norm was non-finite "
                f"{why}; those updates were skipped and the weights from before them are saved in {saved}; lower "
                f"train.lr, set train.grad_clip, or check the data"
            )
        if stop == "signal":
            self.metrics.close()
            if self.rank == 0:
                print(f"commtrain: stopped by {self.signals.name or 'a signal on another rank'} after step {done} of "
                      f"{tc.steps}; weights saved in {saved}; run the same command to continue", flush=True)
            return {**last, "stopped": True}
        summary: dict[str, Any] = {}
        if self.eval_ids is not None:
            summary = {"event": "eval", "step": tc.steps, "eval_loss": self.evaluate(), "final": True}
            self.metrics.log(summary)
        self.metrics.close()
        if self.rank == 0:  # one line: steps, tokens/s, bytes/step by channel, final eval loss, weights
            print(summary_line(read_metrics(self.metrics.path), self.out_dir), flush=True)
        return {**last, **summary}

    def train_step(self, step: int) -> dict[str, Any]:
        self._step = step
        self._set_lr(step)
        ids, x, y = self._batch(step)
        # No meter reset here: bytes still crossing from the last step (an overlapped outer sync)
        # belong to the step during which they cross. Evaluation resets after itself.
        t0 = time.perf_counter()
        waits0 = self._comm_wait_s()

        self.precision.begin_step()  # fp16: this step's loss scale, divided out of every bucket before compression
        self.sync.begin_step(step)  # arms the backward hooks: buckets reduce as they fill
        loss = self.forward_backward(ids, x, y)  # one batch (a pipeline: its whole schedule)
        # finish reducing, then every rank agrees (one tiny all-reduce): a non-finite loss or
        # gradient norm anywhere (or, fp16, a non-finite local gradient) vetoes the update
        # everywhere; else clip and update.
        veto = self.guard.veto(loss, self.precision.local_nonfinite)
        stats = self.sync.step(max_grad_norm=self.cfg.train.grad_clip, veto=veto)
        self.sync.zero_grad()
        agreed = self.guard.outcome()
        scaling = self.precision.end_step(agreed.nonfinite, agreed.loss)  # agreed: the same scale on every rank

        step_time = time.perf_counter() - t0
        comm_s = self._comm_wait_s() - waits0
        wire = self.meter.snapshot(reset=True)
        return {
            "step": step + 1,
            "loss": agreed.loss,
            "lr": self.sync.param_groups[0]["lr"],
            "step_time_s": step_time,
            "tokens_per_s": self.tokens_per_step / step_time,
            "wire_bytes": wire["bytes"],
            "modeled_comm_s": wire.get("modeled_s"),
            "compute_s": max(step_time - comm_s, 0.0),
            "comm_s": comm_s,
            **stats,
            "skipped": agreed.nonfinite,  # the update was vetoed (non-finite loss/grad norm on some rank)
            **scaling,  # fp16: loss_scale, overflow
        }

    def _after_step(self, record: dict[str, Any], done: int) -> str | None:
        """Book-keeping after a step, alike on every rank (it reads agreed values): adds
        ``skipped_total`` to ``record``; returns ``"nonfinite"`` (stop: too many skipped
        steps), ``"signal"`` (some rank was asked to stop) or None."""
        tc = self.cfg.train
        self.skipped_total += bool(record["skipped"])
        record["skipped_total"] = self.skipped_total
        if record.get("overflow"):  # fp16 loss-scale overflow: the scaler backed off; not a divergence
            if self.rank == 0:
                log.info("step %d skipped: fp16 gradient overflow; loss scale now %g", done, self.precision.loss_scale)
            return "signal" if self.guard.outcome().stop else None
        self.skipped_in_row = self.skipped_in_row + 1 if record["skipped"] else 0
        if record["skipped"]:
            if self.rank == 0:
                log.warning("step %d skipped: non-finite loss or gradient norm (loss %s, grad norm %s); %d in a row",
                            done, record["loss"], record["grad_norm"], self.skipped_in_row)
            if tc.nonfinite == "stop" or self.skipped_in_row >= tc.max_nonfinite_steps:
                return "nonfinite"
        return "signal" if self.guard.outcome().stop else None

    # -- pieces -----------------------------------------------------------------------------
    def _log_decision(self) -> None:
        """compression.policy=auto: write a new decision table to the metrics file (event
        ``compression_decision``; rank 0 also logged it when it was taken)."""
        gc = getattr(self.sync, "compression", None)
        count = getattr(gc, "decision_count", 0)
        if count and count != getattr(self, "_decisions_logged", 0):
            self._decisions_logged = count
            self.metrics.log({"event": "compression_decision", "channel": "grad", **gc.decision_record()})

    def _forward_backward(self, ids, x, y) -> float:
        with self.precision.autocast():
            _, loss = self.module(x, targets=y)
        self.precision.scale(loss).backward()
        return loss.item()

    def _eval_loss(self, x, y) -> float:
        self.module.eval()
        try:
            with self.precision.autocast():
                return float(self.module(x, targets=y)[1])
        finally:
            self.module.train()

    def _comm_wait_s(self) -> float:
        """Seconds this rank spent blocked on communication (exposed, not overlapped)."""
        return sum(c.wait_s for c in self.comms)

    def _set_lr(self, step: int) -> None:
        # Linear warm-up then cosine decay to 10% (commtrain.lr_schedule; part of checkpoints).
        lr = self.schedule(step)
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

    def _plan_run_dir(self, overwrite: bool) -> Plan:
        """Rank 0 decides what to do with out_dir (commtrain.rundir.plan), every rank follows."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = plan(self.out_dir, self.cfg.to_dict(), self.cfg.resume, overwrite)
                if box[0].moved_to:
                    log.warning("moved the previous run in %s aside to %s", self.out_dir, box[0].moved_to)
            except Exception as e:  # noqa: BLE001 -- every rank must hear of it, or they wait forever
                box[0] = e if isinstance(e, RunError) else RunError(f"out_dir={str(self.out_dir)!r}: {e}")
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], BaseException):
            raise RunError(str(box[0]))
        return box[0]

    def _eval_ids(self) -> list[int] | None:
        """This replica's held-out sample positions for :meth:`evaluate`, checked at start-up
        on every rank alike: a pipeline needs whole microbatches on every replica. None:
        ``data.eval_fraction=0`` (no eval at all)."""
        tc, pc, d = self.cfg.train, self.cfg.parallel, self.cfg.data
        if d.eval_fraction == 0:
            return None
        dp = self.mesh.dp_size
        n = min(len(self.eval_ds), tc.eval_batches * tc.batch_size * dp)
        per_replica = [list(range(r, n, dp)) for r in range(dp)]
        if pc.pp > 1:  # every eval batch must split into the microbatches
            per_replica = [ids[: len(ids) - len(ids) % pc.microbatches] for ids in per_replica]
        if not all(per_replica) if pc.pp > 1 else n == 0:
            need = (pc.microbatches if pc.pp > 1 else 1) * dp
            raise RunError(
                f"data.eval_fraction={d.eval_fraction} gives a held-out split of {len(self.eval_ds)} sequence(s); "
                f"allowed: at least {need} (parallel.microbatches={pc.microbatches} on each of {dp} data-parallel "
                f"replica(s)); raise data.eval_fraction or data.max_bytes, or set data.eval_fraction=0 for no eval"
            )
        return per_replica[self.mesh.dp_rank]

    @torch.no_grad()
    def evaluate(self) -> float:
        tc = self.cfg.train
        mine = self.eval_ids
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

    def save(self, step: int) -> None:
        """Checkpoint ``step`` (collective; refused, writing nothing, if any state is non-finite)."""
        self.checkpointer.save(step, self.state_dict(step))
        self.last_saved = step

    def maybe_resume(self) -> int:
        """The step to start from: 0, or the newest checkpoint every rank can verify when the
        run-dir plan says this is the same run. Checkpoints that exist but fail verification
        end the run (they are never overwritten by a fresh start)."""
        tc = self.cfg.train
        if not self.plan.resume:
            return 0
        found = self.checkpointer.load_latest()
        if found is None:
            if self.cfg.resume == "must":
                raise RunError(f"resume=must: {self.checkpointer.root} holds no checkpoint to resume from; allowed: "
                               f"resume=auto (starts this run fresh)")
            return 0
        step, state = found
        missing = [name for name in self.stateful if name not in state and name not in ("schedule", "precision")]
        if missing:
            raise RunError(f"checkpoint step {step} in {self.checkpointer.root} lacks {missing} (written by another "
                           f"version or layout of commtrain); use a fresh out_dir or resume=never --overwrite")
        if step > tc.steps:
            raise RunError(f"train.steps={tc.steps} is below the step of the checkpoint to resume ({step}, in "
                           f"{self.checkpointer.root}); allowed: train.steps >= {step}")
        for name, part in self.stateful.items():
            if name in state:
                part.load_state_dict(state[name])
        if "schedule" not in state:  # a checkpoint from before the schedule was saved: as then planned
            self.schedule.total = self.plan.recorded_steps or tc.steps
        retargeted = self.schedule.retarget(step, tc.steps)
        if self.rank == 0:
            log.warning("resumed from %s (step %d)", self.checkpointer.root / f"step_{step:08d}", step)
            if self.plan.changed:
                log.warning("settings changed since the checkpoint (allowed on resume): %s", ", ".join(self.plan.changed))
            if retargeted:
                log.warning("train.steps is now %d: the lr decays from %.3g (step %d) to %.3g over the remaining steps",
                            tc.steps, self.schedule.peak, step, self.schedule(tc.steps))
        self.last_saved = step
        return step

    def close(self) -> None:
        """Stop the threads this trainer started (hooks, comm workers, pipeline decoder) and
        restore the signal handlers."""
        self.signals.close()
        for h in getattr(self, "_fault_hooks", []):
            h.remove()
        if self.sync is not None:
            self.sync.close()
        if self.pipeline is not None:
            self.pipeline.close()
        for c in self.comms:
            c.close()
