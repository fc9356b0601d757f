"""The Trainer: composes model, data, mesh, communicators, reducer/ZeRO/pipeline from one config.

Read :meth:`Trainer.fit` and :meth:`Trainer.train_step` first; everything else is set-up.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
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
from .parallel.pipeline import ActCompression, PipelineEngine
from .parallel.reducer import GradReducer, ReduceConfig
from .parallel.zero import ZeroOptimizer

log = logging.getLogger(__name__)


# -- process group ------------------------------------------------------------------------
@contextlib.contextmanager
def distributed(cfg: Config):
    """Initialise torch.distributed from torchrun's environment (or a 1-rank group), then tear down."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device(f"cuda:{local_rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    tmp = None
    if created:
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, store=_restart_scoped_store(timeout), rank=int(os.environ["RANK"]),
                                    world_size=world_size, timeout=timeout)
        else:  # a plain `python -m commtrain train`: a group of one
            tmp = tempfile.mkdtemp(prefix="commtrain-pg-")
            dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=world_size, timeout=timeout)
    try:
        yield device
    finally:
        if created:
            dist.destroy_process_group()
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def _restart_scoped_store(timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys scoped to this torchrun restart attempt.

    After ``torchrun --max-restarts`` restarts a failed group, the store still holds the
    previous attempt's keys, and gloo would connect to the dead workers' addresses
    (pytorch/pytorch#135712). A prefix per attempt keeps the attempts apart.
    """
    rank = int(os.environ["RANK"])
    # Under torchrun the agent hosts the store; otherwise (Ray, hand-set env) rank 0 does.
    is_master = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") != "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
        is_master=is_master, timeout=timeout, wait_for_workers=False,
    )
    return dist.PrefixStore(f"commtrain/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def train(cfg: Config) -> dict[str, Any]:
    cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    with distributed(cfg) as device:
        return Trainer(cfg, device).fit()


# -- RNG state (part of every checkpoint) ---------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _maybe_inject_fault(step: int, rank: int) -> None:
    """Fault injection for recovery tests: ``COMMTRAIN_FAULT_STEP=k`` kills rank
    ``COMMTRAIN_FAULT_RANK`` (default 0) right after step k, on torchrun's first attempt only."""
    at = os.environ.get("COMMTRAIN_FAULT_STEP")
    if at is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    if step == int(at) and rank == int(os.environ.get("COMMTRAIN_FAULT_RANK", "0")):
        log.error("COMMTRAIN_FAULT_STEP=%s: killing rank %d after step %d", at, rank, step)
        os._exit(17)


class Trainer:
    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        tc, pc, cc = cfg.train, cfg.parallel, cfg.compression
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.mesh = Mesh(pp=pc.pp, dp=pc.dp)
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

        # Same seed on every rank: DP replicas start identical without a broadcast.
        seed_everything(tc.seed)
        if cfg.data.tokenizer == "bpe" and cfg.model.vocab_size is None:
            cfg.model.vocab_size = cfg.data.bpe_vocab_size  # size the embedding for the trained BPE
        model = build_model(cfg.model)
        cfg.data.seq_len = tc.seq_len  # train.seq_len is the one knob; the data section follows it
        self.train_ds, self.eval_ds, self.tokenizer = build_data(
            cfg.data, model.vocab_size, hf_tokenizer=getattr(model, "tokenizer", None), block_size=model.block_size
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
        self.dp_comm = Communicator(self.mesh.dp_group, link=link, meter=self.meter, timeout_s=cfg.timeout_s)

        self.pipeline = None
        if pc.pp > 1:
            self.pp_comm = Communicator(self.mesh.pp_group, link=link, meter=self.meter, timeout_s=cfg.timeout_s)
            self.module = model.stage_modules(pc.pp)[self.mesh.stage].to(device)
            self.pipeline = PipelineEngine(
                self.module, self.mesh, self.pp_comm, schedule=pc.schedule, n_micro=pc.microbatches,
                loss_fn=model.loss, hidden_size=model.hidden_size, n_samples=len(self.train_ds),
                out_dir=str(self.out_dir), device=device,
                act=ActCompression(
                    act=cc.act, act_grad=cc.act_grad, act_delta=cc.act_delta, act_warmup_steps=cc.warmup_steps,
                    act_buffer=cc.act_buffer, act_buffer_dtype=cc.act_buffer_dtype,
                ),
            )
        else:
            self.module = model.to(device)

        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        optim_factory = lambda params: torch.optim.AdamW(  # noqa: E731
            params, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95)
        )
        self.reducer = None
        if cfg.zero.stage:
            self.optimizer = ZeroOptimizer(
                named, optim_factory, self.dp_comm, stage=cfg.zero.stage,
                grad_codec=cc.grad, param_codec=cc.param, error_feedback=cc.error_feedback,
                warmup_steps=cc.warmup_steps, min_numel=cc.min_numel, bucket_mb=pc.bucket_mb,
            )
        else:
            self.optimizer = optim_factory([p for _, p in named])
            self.reducer = GradReducer(
                named, self.dp_comm,
                ReduceConfig(
                    codec=cc.grad, error_feedback=cc.error_feedback, warmup_steps=cc.warmup_steps,
                    min_numel=cc.min_numel, bucket_mb=pc.bucket_mb, policy=cc.policy,
                    # Pipelines accumulate over microbatches: reduce once, after the last one.
                    overlap=pc.overlap and self.pipeline is None,
                ),
            )
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
            _maybe_inject_fault(done, self.rank)
        if bar is not None:
            bar.close()
        summary = {"event": "eval", "step": tc.steps, "eval_loss": self.evaluate(), "final": True}
        self.metrics.log(summary)
        self.metrics.close()
        if self.rank == 0:  # one line: steps, tokens/s, bytes/step by channel, final eval loss, weights
            print(summary_line(read_metrics(self.metrics.path), self.out_dir), flush=True)
        return {**last, **summary}

    def train_step(self, step: int) -> dict[str, Any]:
        tc = self.cfg.train
        self._set_lr(step)
        ids, x, y = self._batch(step)
        self.meter.snapshot(reset=True)
        t0 = time.perf_counter()
        waits0 = self._comm_wait_s()

        if self.reducer is not None:
            # Overlap: the reducer's hooks start each bucket's compressed all-reduce during
            # backward. A pipeline accumulates over microbatches, so it reduces once at the end.
            self.reducer.begin_step(step, overlap=None if self.pipeline is None else False)
        else:
            self.optimizer.begin_step(step)  # ZeRO reduce-scatters inside step()

        if self.pipeline is not None:
            # The schedule runs forward/backward over microbatches and the stage-boundary sends.
            loss = self.pipeline.train_step(ids, x, y)
        else:
            _, loss = self.module(x, targets=y)
            loss.backward()
            loss = loss.item()

        if self.reducer is not None:
            self.reducer.finish()  # wait for the buckets still in flight; .grad is now the mean
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), tc.grad_clip)
            self.optimizer.step()
        else:
            self.optimizer.step(max_grad_norm=tc.grad_clip)
        self.optimizer.zero_grad()

        step_time = time.perf_counter() - t0
        comm_s = self._comm_wait_s() - waits0
        wire = self.meter.snapshot(reset=True)
        return {
            "step": step + 1,
            "loss": self._mean_loss(loss),
            "lr": self.optimizer.param_groups[0]["lr"],
            "step_time_s": step_time,
            "tokens_per_s": self.tokens_per_step / step_time,
            "wire_bytes": wire["bytes"],
            "modeled_comm_s": wire.get("modeled_s"),
            "compute_s": max(step_time - comm_s, 0.0),
            "comm_s": comm_s,
        }

    # -- pieces -----------------------------------------------------------------------------
    def _comm_wait_s(self) -> float:
        """Seconds this rank spent blocked on communication (exposed, not overlapped)."""
        comms = [self.dp_comm] + ([self.pp_comm] if self.pipeline is not None else [])
        return sum(c.wait_s for c in comms)

    def _set_lr(self, step: int) -> None:
        tc = self.cfg.train
        # Linear warm-up then cosine decay to 10%: the usual fine-tuning schedule.
        if step < tc.lr_warmup_steps:
            lr = tc.lr * (step + 1) / tc.lr_warmup_steps
        else:
            progress = (step - tc.lr_warmup_steps) / max(1, tc.steps - tc.lr_warmup_steps)
            lr = tc.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in self.optimizer.param_groups:
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
            x, y = x.to(self.device), y.to(self.device)
            if self.pipeline is not None:
                loss = self.pipeline.eval_loss(x, y)
            else:
                self.module.eval()
                loss = self.module(x, targets=y)[1]
                self.module.train()
            total += torch.tensor([float(loss) * len(chunk), len(chunk)], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        state = {
            "step": step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
        }
        if self.reducer is not None:
            state["reducer"] = self.reducer.state_dict()
        if self.pipeline is not None:
            state["pipeline"] = self.pipeline.state_dict()
        return state

    def maybe_resume(self) -> int:
        if not self.cfg.resume:
            return 0
        found = self.checkpointer.load_latest()
        if found is None:
            return 0
        step, state = found
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        if self.reducer is not None:
            self.reducer.load_state_dict(state["reducer"])
        if self.pipeline is not None:
            self.pipeline.load_state_dict(state["pipeline"])
        set_rng_state(state["rng"])
        if self.rank == 0:
            log.warning("resumed from %s (step %d)", self.checkpointer.root / f"step_{step:08d}", step)
        return step
