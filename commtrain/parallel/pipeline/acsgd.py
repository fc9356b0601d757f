"""AC-SGD forward-activation channel (Wang et al., NeurIPS 2022, "Fine-tuning Language Models
over Slow Networks using Activation Compression with Guarantees").

Activations of the same training sample change slowly between epochs, so instead of
quantizing the activation ``a`` itself (direct mode), the sender quantizes its *change*
since the sample was last seen. Both ends of the boundary keep a buffer row ``m[id]`` per
sample and run the same update::

    sender:   pkt = Q(a - m[id]);  m[id] += deQ(pkt)   (send pkt)
    receiver:                      m[id] += deQ(pkt)   (use m[id] as the activation)

``deQ(pkt)`` is a deterministic function of the bytes on the wire, and the buffers start
equal, so the two copies stay bit-identical (also for stochastic codecs: the randomness is
drawn once, by the sender, before the bytes exist). The error the receiver sees is the
quantization error of a *delta* that shrinks as training converges, which is why 2-4 bit
AC-SGD keeps fp32 quality where 2-bit direct quantization does not.

Each microbatch goes one of four ways, decided identically on both ends from state they
share (the step counter and the buffers' ``seen`` flags), so no header is needed:

* ``full``: uncompressed (codec ``none``) while ``step < warmup_steps``; in delta mode both
  ends then set ``m[id] = a``;
* ``first``: in delta mode, when any sample of the microbatch has no row yet (its first
  visit, e.g. the whole first epoch): ``pkt = Q1(a)`` with the first-visit codec ``Q1``
  (``compression.act_first``, default 8-bit ``quant``), and both ends set
  ``m[id] = deQ1(pkt)`` -- the *decoded* value, a function of the bytes on the wire, so the
  buffers stay bit-identical although the sender's ``a`` never crossed the link.
  ``act_first="none"`` sends fp32 and stores ``a`` (the behaviour before the option);
* ``delta``: as above;
* ``direct``: ``Q(a)`` with no buffers (``delta=False``), the baseline AC-SGD improves on.

A microbatch mixing seen and unseen samples goes ``first`` as a whole (its seen rows are
re-initialised from the decoded value); with the sampler's epoch permutation this happens
only to the few samples an epoch drops and the next one deals.

Every buffer update happens here, called by the pipeline executor on threads the pipeline
owns (the compute thread encodes, the pipeline's decode worker decodes): the comm layer only
moves the packets' bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from commtrain.compress import Codec, Packet, build_codec

from ..compression import DEFAULT_ACT_FIRST, CompressionConfig
from .buffers import ActivationBuffer

MODES = ("full", "first", "delta", "direct")


class ActivationChannel:
    """One end (sender or receiver) of a forward-activation stage boundary.

    ``codec``: any registry codec (spec or Codec), the ``compression.act`` setting.
    ``first_codec``: the codec of a sample's first visit in delta mode (``compression.act_first``).
    ``buffer``: the per-sample rows, required when ``delta`` (else ignored).
    The executor fixes each microbatch's :meth:`mode` when the step starts, sizes a receive
    with :meth:`payload_nbytes`, then calls :meth:`encode` (sender) or :meth:`decode`
    (receiver), and :meth:`end_step` once per optimizer step.
    """

    def __init__(self, codec: str | Codec, delta: bool = True, warmup_steps: int = 0,
                 buffer: ActivationBuffer | None = None, first_codec: str | Codec = DEFAULT_ACT_FIRST):
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"act_warmup_steps={warmup_steps!r} is invalid; allowed: an integer >= 0")
        if delta and buffer is None:
            raise ValueError("act_delta=True needs an ActivationBuffer (the per-sample m[id] rows)")
        self.codec = build_codec(codec)
        self.full_codec = build_codec("none")
        self.first_codec = build_codec(first_codec)
        self.delta, self.warmup_steps, self.buffer = bool(delta), warmup_steps, buffer if delta else None
        self.step = 0

    # -- the decision both ends make identically --------------------------------------------
    def mode(self, ids: torch.Tensor) -> str:
        if self.step < self.warmup_steps:
            return "full"
        if not self.delta:
            return "direct"
        return "delta" if bool(self.buffer.seen(ids).all()) else "first"

    def codec_for(self, mode: str) -> Codec:
        """The codec whose packet carries a microbatch of this mode."""
        if mode == "full":
            return self.full_codec
        return self.first_codec if mode == "first" else self.codec

    def payload_nbytes(self, mode: str, numel: int, dtype: torch.dtype) -> int:
        """Bytes of the packet of a microbatch of this mode (both ends know it in advance)."""
        return self.codec_for(mode).payload_nbytes(numel, dtype)

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start loading the rows a later encode/decode of ``ids`` will read."""
        if self.buffer is not None:
            self.buffer.prefetch(ids)

    @classmethod
    def from_config(cls, cc: CompressionConfig, row_shape: tuple[int, ...], device, n_samples: int | None,
                    path: str | None) -> "ActivationChannel":
        """One end of a forward boundary from the ``compression`` section (sender and
        receiver are built the same way)."""
        buffer = None
        if cc.act_delta:
            if n_samples is None:
                raise ValueError("compression.act_delta=true needs n_samples (the dataset size: one buffer row per sample)")
            if cc.act_buffer == "mmap" and path is None:
                raise ValueError("compression.act_buffer='mmap' needs out_dir (the buffer files live there)")
            buffer = ActivationBuffer(n_samples, row_shape, cc.act_buffer, cc.act_buffer_dtype, device,
                                      path=path, prefetch=cc.act_prefetch)
        return cls(cc.act, cc.act_delta, cc.warmup_steps, buffer, first_codec=cc.act_first)

    # -- sender ----------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, a: torch.Tensor, mode: str | None = None) -> Packet:
        """Sender: the packet for activation ``a`` (mb, *row_shape) of samples ``ids``."""
        a = a.detach()
        mode = self.mode(ids) if mode is None else mode
        if mode in ("full", "first"):
            codec = self.codec_for(mode)
            pkt = codec.compress(a)
            if self.delta:
                # What the receiver will hold: the decoded packet (``a`` itself when lossless).
                self.buffer.write(ids, (a if codec.lossless else codec.decompress(pkt)).float())
            return pkt
        if mode == "direct":
            return self.codec.compress(a)
        m = self.buffer.read(ids)
        # the delta in ``a``'s dtype (the wire dtype both ends size packets with)
        pkt = self.codec.compress((a.float() - m).to(a.dtype))
        self.buffer.write(ids, m + self.codec.decompress(pkt).float())
        return pkt

    # -- receiver --------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor, pkt: Packet, mode: str | None = None) -> torch.Tensor:
        """Receiver: the activation to feed the next stage (the updated m[id] in delta mode)."""
        mode = self.mode(ids) if mode is None else mode
        if mode in ("full", "first"):
            a = self.codec_for(mode).decompress(pkt)
            if self.delta:
                self.buffer.write(ids, a.float())
            return a
        if mode == "direct":
            return self.codec.decompress(pkt)
        m = self.buffer.read(ids)
        return self.buffer.write(ids, m + self.codec.decompress(pkt).float()).to(pkt.dtype)

    def end_step(self) -> None:
        self.step += 1

    # -- checkpoint ----------------------------------------------------------------------
    def state_dict(self, snapshot: str | None = None) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "codec": self.codec.state_dict(),
                                 "first_codec": self.first_codec.state_dict()}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict(snapshot=snapshot)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.codec.load_state_dict(state["codec"])
        if "first_codec" in state:  # absent in checkpoints from before compression.act_first
            self.first_codec.load_state_dict(state["first_codec"])
        if self.buffer is not None:
            if "buffer" not in state:
                raise ValueError("checkpoint has no AC-SGD buffer but this run uses act_delta=True")
            self.buffer.load_state_dict(state["buffer"])
