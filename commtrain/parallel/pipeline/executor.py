"""PipelineEngine: runs this rank's list of schedule actions for one training step.

One step of a pipeline of ``S`` stages over ``M`` microbatches, on stage s::

    post every receive of the step (activations from s-1, gradients from s+1) on the
        Communicator's receive worker, in the order the peers send them
    for action in schedule[s]:
        F(m): input = x[m] (stage 0) or wait(recv act m); out = stage(input)
              last stage: loss[m] = loss_fn(out, y[m]);  else: async send out -> s+1
        B(m): last stage: backward(loss[m] / M);  else: backward(out, wait(recv grad m))
              stage > 0: async send input.grad -> s-1;  free m's saved tensors
              every B but the stage's last runs inside ``no_sync()`` (the DP sync accumulates;
              the last backward's hooks launch the gradient reduction, overlapped with it)
    wait for the sends, loss broadcast over the pipeline

Why it cannot deadlock where the dry run says it does not: sends are asynchronous (a
stage never waits for its consumer); each peer->peer direction carries one channel whose
messages arrive in the sender's order, and the receives are posted in a merge of the
peers' send orders that follows this stage's consumption order, so the receive worker
never waits on a message that is not needed before (or together with) the one the
compute thread waits for. The waits are then exactly :func:`schedules.dependencies`.

Microbatch losses are means over their tokens and microbatches are equal-sized, so
backward of ``loss[m] / M`` accumulates exactly the gradient of the full batch's mean loss.
Forward activations go through an AC-SGD :class:`ActivationChannel` (delta, direct or
uncompressed), activation gradients through a plain codec (``compression.act_grad``).

The comm layer moves packets of known size (``send_packet`` / ``recv_packet``); the executor
encodes activations itself on the compute thread and decodes them on its own decode worker
(in the order the receives are posted), so every AC-SGD buffer update happens in this
package, on threads it owns.
"""
from __future__ import annotations

import dataclasses
import logging

import contextlib
import os
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from commtrain.comm.handle import Handle, Worker
from commtrain.compress import Packet, build_codec

from ..compression import CompressionConfig
from .acsgd import ActivationChannel
from .schedules import Action, build_schedule

log = logging.getLogger(__name__)


class PipelineEngine:
    """Executes one pipeline stage of a model under a schedule.

    Args:
        stage_module: this rank's stage (stage 0 maps token ids (B, T) to hidden states,
            middle stages hidden -> hidden, the last hidden -> logits).
        mesh: a :class:`commtrain.parallel.mesh.Mesh` (``stage``, ``pp``, ``pp_group``,
            ``dp_rank``, ``is_first``/``is_last``).
        comm: a Communicator on ``mesh.pp_group`` (its group ranks are the stages).
        schedule: registered schedule name (``parallel.schedule``: "gpipe", "1f1b").
        n_micro: microbatches per step (``parallel.microbatches``); the batch must divide.
        loss_fn: ``loss_fn(logits, targets) -> scalar mean loss`` (used on the last stage).
        hidden_size: C of the (mb, T, C) activations crossing stage boundaries.
        act: the ``compression`` section (its ``act*`` keys and ``warmup_steps``); default uncompressed.
        n_samples: dataset size (rows of the AC-SGD buffers; needed with ``act_delta``).
        out_dir: where ``act_buffer="mmap"`` files go (``{out_dir}/acsgd/``).
        act_dtype: dtype of boundary activations and gradients on the wire (mixed precision:
            the compute dtype; the receiver feeds the stage its parameters' dtype, as the
            unsplit model's residual stream has, and casts gradients back likewise).
        autocast: a context factory around every forward + loss (``train.precision``).
        loss_scale: ``() -> float``, the fp16 loss scale the last stage multiplies its loss by
            (the gradient compression divides it out again).
        eval_codec: codec for activations in :meth:`eval_loss` (default ``none``: the eval
            loss measures the trained weights, not the link).
        no_sync: a context factory (the DP sync's ``no_sync``) wrapped around every backward of
            the step but this stage's last, so that the gradient reduction launches from the
            last backward's hooks only, once every microbatch has accumulated.
        device: compute device (default: the stage's parameters' device).
    """

    def __init__(
        self,
        stage_module: nn.Module,
        mesh,
        comm,
        schedule: str = "1f1b",
        n_micro: int = 1,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        hidden_size: int | None = None,
        act: CompressionConfig | None = None,
        n_samples: int | None = None,
        out_dir: str | None = None,
        act_dtype: torch.dtype = torch.float32,
        eval_codec: str = "none",
        no_sync: Callable[[], ContextManager[None]] | None = None,
        device: str | torch.device | None = None,
        autocast: Callable[[], ContextManager[None]] | None = None,
        loss_scale: Callable[[], float] | None = None,
    ):
        self.module, self.mesh, self.comm = stage_module, mesh, comm
        self.stage, self.n_stages = int(mesh.stage), int(mesh.pp)
        if comm.world_size != self.n_stages or comm.rank != self.stage:
            raise ValueError(
                f"comm must span this pipeline (group rank == stage): comm has rank {comm.rank} of "
                f"{comm.world_size}, mesh has stage {self.stage} of pp={self.n_stages}; build it with group=mesh.pp_group"
            )
        self.is_first, self.is_last = self.stage == 0, self.stage == self.n_stages - 1
        self.n_micro = n_micro
        self.schedule_name = schedule
        self.schedule = build_schedule(schedule, self.n_stages, n_micro)
        self.actions: list[Action] = self.schedule[self.stage]
        if self.is_last and loss_fn is None:
            raise ValueError("loss_fn is required on the last pipeline stage")
        if self.n_stages > 1 and (not isinstance(hidden_size, int) or hidden_size < 1):
            raise ValueError(f"hidden_size={hidden_size!r} is invalid; allowed: the model width C (an integer >= 1)")
        self.loss_fn, self.hidden_size, self.act_dtype = loss_fn, hidden_size, act_dtype
        self.act = act if act is not None else CompressionConfig(act_delta=False)
        self.act_grad_codec = build_codec(self.act.act_grad)
        self.eval_codec = build_codec(eval_codec)
        self.no_sync = no_sync if no_sync is not None else contextlib.nullcontext
        self.autocast = autocast if autocast is not None else contextlib.nullcontext
        self.loss_scale = loss_scale if loss_scale is not None else (lambda: 1.0)
        p0 = next((p for p in stage_module.parameters() if p.is_floating_point()), None)
        self.compute_dtype = p0.dtype if p0 is not None else torch.float32  # what the stage's inputs are fed as
        self._last_backward = max(i for i, a in enumerate(self.actions) if a.kind == "B")
        self._decoder = Worker(f"commtrain-pp-decode-s{self.stage}")  # AC-SGD receiver updates run here
        if device is None:
            p = next(iter(stage_module.parameters()), None)
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        self.n_samples, self.out_dir = n_samples, out_dir
        self.send_channel = self.recv_channel = None  # built at the first step, when T is known
        self._recv_order = self._merged_recv_order()

    # -- set-up ----------------------------------------------------------------------------
    def _merged_recv_order(self) -> list[tuple[str, int]]:
        """(kind, microbatch) of every message this stage receives, in posting order: walk our
        actions; before an action needing a message, post the sender's messages up to it."""
        acts_in = [a.microbatch for a in self.schedule[self.stage - 1] if a.kind == "F"] if not self.is_first else []
        grads_in = [a.microbatch for a in self.schedule[self.stage + 1] if a.kind == "B"] if not self.is_last else []
        order: list[tuple[str, int]] = []
        queues = {"F": acts_in, "B": grads_in}
        posted = {"F": 0, "B": 0}
        for a in self.actions:
            q = queues[a.kind]
            if a.microbatch in q[posted[a.kind]:]:
                stop = q.index(a.microbatch, posted[a.kind]) + 1
                order += [(a.kind, m) for m in q[posted[a.kind]:stop]]
                posted[a.kind] = stop
        return order

    def _buffer_path(self, role: str) -> str | None:
        if self.out_dir is None:
            return None
        return os.path.join(self.out_dir, "acsgd", f"dp{self.mesh.dp_rank}_stage{self.stage}_{role}.bin")

    def _ensure_channels(self, seq_len: int, mb_rows: int = 1) -> None:
        if self.send_channel is not None or self.recv_channel is not None:
            if seq_len != self._seq_len:
                raise ValueError(f"sequence length changed from {self._seq_len} to {seq_len}; pipeline shapes are static")
            return
        self._seq_len = seq_len
        row = (seq_len, self.hidden_size)
        if self.act.act == "auto":
            self._choose_act_codec((mb_rows, *row))
        if not self.is_last:
            self.send_channel = ActivationChannel.from_config(self.act, row, self.device, self.n_samples,
                                                              self._buffer_path("send"))
        if not self.is_first:
            self.recv_channel = ActivationChannel.from_config(self.act, row, self.device, self.n_samples,
                                                              self._buffer_path("recv"))

    def _choose_act_codec(self, shape) -> None:
        """``compression.act=auto``: every stage of the pipeline measures its link and the
        candidates' encode/decode time on one microbatch's activation (a collective over the
        pipeline group), and all take the codec with the least transfer time."""
        from .. import policy

        specs = list(dict.fromkeys(build_codec(s).spec for s in
                                   ["none", *(self.act.candidates or policy.DEFAULT_CANDIDATES)]))
        spec, rows, link = policy.choose_act_codec(self.comm, specs, shape, self.act_dtype, self.device)
        self.act = dataclasses.replace(self.act, act=spec)
        self.act_decision = {"codec": spec, "shape": list(shape), "rows": rows,
                             "link": link.as_dict() if link is not None else None}
        if self.comm.rank == 0:
            table = "; ".join(f"{r['codec']}: codec {r['codec_ms']:.2f} + link {r['link_ms']:.2f} = "
                              f"{r['total_ms']:.2f} ms" for r in rows)
            log.warning("compression.act=auto on the %s: %s per microbatch boundary transfer (%s)",
                        link.describe() if link is not None else "single-stage pipeline", spec, table)

    def _split(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        if t.shape[0] % self.n_micro:
            raise ValueError(
                f"{what} has batch size {t.shape[0]}, not divisible by parallel.microbatches={self.n_micro}"
            )
        return list(t.split(t.shape[0] // self.n_micro))

    # -- one training step -----------------------------------------------------------------
    def train_step(self, sample_ids: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward of one batch; gradients accumulate into the stage's ``.grad``
        (zero them before, step the optimizer after). Every rank passes the same batch
        (stage 0 reads ``x``, the last stage ``y``, all use ``sample_ids`` and the shape).
        Returns the batch's mean loss on every rank of the pipeline (broadcast from the
        last stage over ``pp_group``)."""
        sample_ids = sample_ids.to("cpu", torch.int64).reshape(-1)
        if sample_ids.numel() != x.shape[0]:
            raise ValueError(f"sample_ids has {sample_ids.numel()} entries for a batch of {x.shape[0]}")
        if self.act.act_delta and sample_ids.unique().numel() != sample_ids.numel():
            raise ValueError("sample_ids repeat within a batch; AC-SGD needs distinct samples per step")
        self._ensure_channels(x.shape[1], max(x.shape[0] // self.n_micro, 1))
        ids, xs, ys = self._split(sample_ids, "sample_ids"), self._split(x, "x"), self._split(y, "y")
        mb_shape = (xs[0].shape[0], x.shape[1], self.hidden_size)

        # Fix every microbatch's AC-SGD mode now, identically on both ends (ids are distinct
        # within a step, so no microbatch of the step changes another one's ``seen`` flags).
        send_modes = [self.send_channel.mode(i) for i in ids] if self.send_channel else None
        recv_modes = [self.recv_channel.mode(i) for i in ids] if self.recv_channel else None
        # Start reading the buffer rows of every delta-mode microbatch, in the order they are
        # used, so encode/decode find them loaded (the rows of one step are distinct).
        for ch, modes, order in ((self.send_channel, send_modes, self._forward_order()),
                                 (self.recv_channel, recv_modes, [m for k, m in self._recv_order if k == "F"])):
            for m in order if ch is not None else ():
                if modes[m] == "delta":
                    ch.prefetch(ids[m])
        # Prefetches are queued before the receives that consume them are posted.
        pending = self._post_recvs(mb_shape, ids, recv_modes)

        inputs: dict[int, torch.Tensor] = {}
        outputs: dict[int, torch.Tensor] = {}
        losses: list[torch.Tensor] = []
        sends = []
        for i, a in enumerate(self.actions):
            m = a.microbatch
            if a.kind == "F":
                if self.is_first:
                    inp = xs[m].to(self.device)
                else:
                    inp = pending.pop(("F", m)).wait().to(self.device, self.compute_dtype).requires_grad_(True)
                    inputs[m] = inp
                with self.autocast():
                    out = self.module(inp)
                    loss = self.loss_fn(out, ys[m].to(self.device)) if self.is_last else None
                if self.is_last:
                    losses.append(loss.detach())
                    scale = self.loss_scale()
                    outputs[m] = (loss * scale if scale != 1.0 else loss) / self.n_micro
                else:
                    # in the wire dtype (mixed precision: the compute dtype, half of fp32's bytes)
                    act = out.detach().to(self.act_dtype)
                    pkt = self.send_channel.encode(ids[m], act, send_modes[m])  # updates m[id] here
                    sends.append(self.comm.send_packet(pkt.payload, self.stage + 1, channel="act", async_op=True))
                    outputs[m] = out
            else:
                out = outputs.pop(m)
                grad = None if self.is_last else pending.pop(("B", m)).wait().to(self.device, out.dtype)
                # Accumulate quietly; the stage's last backward launches the DP reduction.
                with self.no_sync() if i < self._last_backward else contextlib.nullcontext():
                    if self.is_last:
                        out.backward()
                    else:
                        torch.autograd.backward(out, grad)
                if not self.is_first:
                    inp = inputs.pop(m)
                    sends.append(self.comm.send(inp.grad.to(self.act_dtype), self.stage - 1, self.act_grad_codec,
                                                channel="act_grad", async_op=True))
        assert not pending and not outputs and not inputs, "schedule left work undone"
        for h in sends:
            h.wait()
        for ch in (self.send_channel, self.recv_channel):
            if ch is not None:
                ch.end_step()
        return self._broadcast_loss(torch.stack(losses).mean() if self.is_last else None)

    def _post_recvs(self, mb_shape, ids, recv_modes) -> dict[tuple[str, int], Any]:
        """Post every receive of the step; an activation's packet is decoded (and the AC-SGD
        receiver buffer updated) on the pipeline's decode worker, in posting order."""
        pending = {}
        numel = mb_shape[0] * mb_shape[1] * mb_shape[2]
        for kind, m in self._recv_order:
            if kind == "F":
                ch, mode = self.recv_channel, recv_modes[m]
                raw = self.comm.recv_packet(ch.payload_nbytes(mode, numel, self.act_dtype), self.stage - 1,
                                            channel="act", device=self.device, async_op=True)

                def decode(raw=raw, ch=ch, mode=mode, m=m):  # the compute thread's wait is the exposed one
                    return ch.decode(ids[m], Packet(raw.wait(exposed=False), mb_shape, self.act_dtype), mode)

                pending[(kind, m)] = Handle(self._decoder.submit(decode), f"recv+decode[act] mb {m}",
                                            self.comm.timeout_s, on_wait=self.comm.add_wait)
            else:
                pending[(kind, m)] = self.comm.recv(mb_shape, self.act_dtype, self.stage + 1, self.act_grad_codec,
                                                    channel="act_grad", device=self.device, async_op=True)
        return pending

    def _forward_order(self) -> list[int]:
        return [a.microbatch for a in self.actions if a.kind == "F"]

    def _broadcast_loss(self, loss: torch.Tensor | None) -> float:
        """The last stage's mean loss on every stage: one 4-byte broadcast over pp_group
        (bookkeeping, not model traffic, so not metered; all p2p of the step has completed)."""
        if self.n_stages == 1:
            return float(loss)
        buf = loss.reshape(1).float().cpu() if loss is not None else torch.zeros(1)
        src = self.mesh.global_rank(self.n_stages - 1, self.mesh.dp_rank)
        dist.broadcast(buf, src=src, group=self.mesh.pp_group)
        return float(buf)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward-only mean loss of a batch (GPipe order, no buffers touched), on every stage."""
        xs, ys = self._split(x, "x"), self._split(y, "y")
        shape = (xs[0].shape[0], x.shape[1], self.hidden_size)
        recvs = [] if self.is_first else [
            self.comm.recv(shape, self.act_dtype, self.stage - 1, self.eval_codec, channel="act",
                           device=self.device, async_op=True) for _ in xs]
        losses, sends = [], []
        was_training = self.module.training
        self.module.eval()
        try:
            for m in range(self.n_micro):
                inp = xs[m].to(self.device) if self.is_first else \
                    recvs[m].wait().to(self.device, self.compute_dtype)
                with self.autocast():
                    out = self.module(inp)
                    if self.is_last:
                        losses.append(self.loss_fn(out, ys[m].to(self.device)).float())
                if not self.is_last:
                    sends.append(self.comm.send(out.to(self.act_dtype), self.stage + 1, self.eval_codec, channel="act", async_op=True))
            for h in sends:
                h.wait()
        finally:
            self.module.train(was_training)
        return self._broadcast_loss(torch.stack(losses).mean() if self.is_last else None)

    # -- checkpoint -------------------------------------------------------------------------
    def state_dict(self, snapshot: str | None = None) -> dict[str, Any]:
        """AC-SGD channel state (buffers, step counters, codec RNG) of this rank's boundaries.
        ``snapshot=TAG``: mmap buffers are copied to ``{file}.{TAG}`` instead of into the state."""
        state: dict[str, Any] = {"act_grad_codec": self.act_grad_codec.state_dict()}
        for name in ("send_channel", "recv_channel"):
            ch = getattr(self, name)
            if ch is not None:
                state[name] = ch.state_dict(snapshot=snapshot)
                state["seq_len"] = self._seq_len
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.act_grad_codec.load_state_dict(state["act_grad_codec"])
        if "seq_len" in state:
            self._ensure_channels(int(state["seq_len"]))
        for name in ("send_channel", "recv_channel"):
            ch = getattr(self, name)
            if (ch is None) != (name not in state):
                raise ValueError(f"checkpoint {'lacks' if ch is not None else 'has'} {name} state for stage {self.stage}")
            if ch is not None:
                ch.load_state_dict(state[name])

    def close(self) -> None:
        self._decoder.close(timeout=self.comm.timeout_s)
        for ch in (self.send_channel, self.recv_channel):
            if ch is not None and ch.buffer is not None:
                ch.buffer.close()
