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

Each microbatch goes one of three ways, decided identically on both ends from state they
share (the step counter and the buffers' ``seen`` flags), so no header is needed:

* ``full``: uncompressed (codec ``none``) while ``step < warmup_steps``, or in delta mode
  when any sample of the microbatch has no row yet (so the first epoch is always a warm-up);
  in delta mode both ends then set ``m[id] = a``;
* ``delta``: as above;
* ``direct``: ``Q(a)`` with no buffers (``delta=False``), the baseline AC-SGD improves on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from commtrain.compress import Codec, Packet, build_codec

from .buffers import PRECISIONS, ActivationBuffer, available_storages

MODES = ("full", "delta", "direct")


class ActivationChannel:
    """One end (sender or receiver) of a forward-activation stage boundary.

    ``codec``: any registry codec (spec or Codec), the ``compression.act`` setting.
    ``buffer``: the per-sample rows, required when ``delta`` (else ignored).
    The executor calls :meth:`codec_for` to size a receive, then :meth:`encode` (sender)
    or :meth:`decode` (receiver), and :meth:`end_step` once per optimizer step.
    """

    def __init__(self, codec: str | Codec, delta: bool = True, warmup_steps: int = 0,
                 buffer: ActivationBuffer | None = None):
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"act_warmup_steps={warmup_steps!r} is invalid; allowed: an integer >= 0")
        if delta and buffer is None:
            raise ValueError("act_delta=True needs an ActivationBuffer (the per-sample m[id] rows)")
        self.codec = build_codec(codec)
        self.full_codec = build_codec("none")
        self.delta, self.warmup_steps, self.buffer = bool(delta), warmup_steps, buffer if delta else None
        self.step = 0

    # -- the decision both ends make identically --------------------------------------------
    def mode(self, ids: torch.Tensor) -> str:
        if self.step < self.warmup_steps:
            return "full"
        if not self.delta:
            return "direct"
        return "delta" if bool(self.buffer.seen(ids).all()) else "full"

    def codec_for(self, ids: torch.Tensor) -> Codec:
        """The codec whose packet carries this microbatch (sizes the receive)."""
        return self.full_codec if self.mode(ids) == "full" else self.codec

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start loading the rows a later encode/decode of ``ids`` will read."""
        if self.buffer is not None:
            self.buffer.prefetch(ids)

    def bind(self, ids: torch.Tensor) -> "BoundActivation":
        """A codec-like object for one microbatch, with its mode fixed now (see BoundActivation)."""
        return BoundActivation(self, ids, self.mode(ids))

    # -- sender ----------------------------------------------------------------------------
    def encode(self, ids: torch.Tensor, a: torch.Tensor, mode: str | None = None) -> Packet:
        """Sender: the packet for activation ``a`` (mb, *row_shape) of samples ``ids``."""
        a = a.detach()
        mode = self.mode(ids) if mode is None else mode
        if mode == "full":
            pkt = self.full_codec.compress(a)
            if self.delta:
                self.buffer.write(ids, a.float())
            return pkt
        if mode == "direct":
            return self.codec.compress(a)
        m = self.buffer.read(ids)
        pkt = self.codec.compress(a.float() - m)
        self.buffer.write(ids, m + self.codec.decompress(pkt).float())
        return pkt

    # -- receiver --------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor, pkt: Packet, mode: str | None = None) -> torch.Tensor:
        """Receiver: the activation to feed the next stage (the updated m[id] in delta mode)."""
        mode = self.mode(ids) if mode is None else mode
        if mode == "full":
            a = self.full_codec.decompress(pkt)
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
        state: dict[str, Any] = {"step": self.step, "codec": self.codec.state_dict()}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict(snapshot=snapshot)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.codec.load_state_dict(state["codec"])
        if self.buffer is not None:
            if "buffer" not in state:
                raise ValueError("checkpoint has no AC-SGD buffer but this run uses act_delta=True")
            self.buffer.load_state_dict(state["buffer"])


class BoundActivation:
    """The channel bound to one microbatch's sample ids: duck-types a codec for the
    Communicator (``compress``/``decompress``/``payload_nbytes``), so the AC-SGD packet goes
    through the one metered, throttled p2p path like any other codec's.

    The sender must compress exactly once -- it adds deQ of the very bytes it sends to its
    own buffer -- which is what the Communicator's ``send(t, dst, codec)`` does with it.
    The mode is decided at bind time (the executor binds every microbatch of a step when
    the step starts; ids are distinct within a step, so no other microbatch of the step can
    change this one's ``seen`` flags and both ends decide the same).
    """

    def __init__(self, channel: ActivationChannel, ids: torch.Tensor, mode: str):
        self.channel, self.ids, self.mode = channel, ids, mode
        self.wire_codec = channel.full_codec if mode == "full" else channel.codec

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return self.wire_codec.payload_nbytes(numel, dtype)

    def compress(self, x: torch.Tensor) -> Packet:
        return self.channel.encode(self.ids, x, self.mode)

    def decompress(self, pkt: Packet) -> torch.Tensor:
        return self.channel.decode(self.ids, pkt, self.mode)

    def __repr__(self) -> str:
        return f"BoundActivation(mode={self.mode}, codec={self.wire_codec.spec}, n={self.ids.numel()})"


@dataclass
class ActCompression:
    """The ``compression.act*`` settings of a pipeline boundary.

    ``act``: codec spec for forward activations; ``act_grad``: codec spec for backward
    activation gradients (always direct); ``act_delta``: AC-SGD delta mode (else direct
    ``Q(a)``); ``act_warmup_steps``: steps sent uncompressed (in delta mode the first epoch
    is a warm-up anyway: a microbatch holding an unseen sample goes uncompressed);
    ``act_buffer`` / ``act_buffer_dtype``: where and at which precision m[id] lives;
    ``act_prefetch``: read the next microbatch's rows in the background.
    """

    act: str = "none"
    act_grad: str = "none"
    act_delta: bool = False
    act_warmup_steps: int = 0
    act_buffer: str = "cpu"
    act_buffer_dtype: str = "fp32"
    act_prefetch: bool = True

    def __post_init__(self):
        build_codec(self.act), build_codec(self.act_grad)  # fail now, naming the bad spec
        if not isinstance(self.act_delta, bool):
            raise ValueError(f"compression.act_delta={self.act_delta!r} is invalid; allowed: true, false")
        if not isinstance(self.act_warmup_steps, int) or isinstance(self.act_warmup_steps, bool) or self.act_warmup_steps < 0:
            raise ValueError(f"compression.act_warmup_steps={self.act_warmup_steps!r} is invalid; allowed: an integer >= 0")
        if self.act_buffer not in available_storages():
            raise ValueError(f"compression.act_buffer={self.act_buffer!r} is invalid; allowed: {', '.join(available_storages())}")
        if self.act_buffer_dtype not in PRECISIONS:
            raise ValueError(f"compression.act_buffer_dtype={self.act_buffer_dtype!r} is invalid; allowed: {', '.join(PRECISIONS)}")

    def channel(self, row_shape: tuple[int, ...], device, n_samples: int | None, path: str | None) -> ActivationChannel:
        """One end of a forward boundary (sender and receiver are built the same way)."""
        buffer = None
        if self.act_delta:
            if n_samples is None:
                raise ValueError("compression.act_delta=true needs n_samples (the dataset size: one buffer row per sample)")
            if self.act_buffer == "mmap" and path is None:
                raise ValueError("compression.act_buffer='mmap' needs out_dir (the buffer files live there)")
            buffer = ActivationBuffer(n_samples, row_shape, self.act_buffer, self.act_buffer_dtype, device,
                                      path=path, prefetch=self.act_prefetch)
        return ActivationChannel(self.act, self.act_delta, self.act_warmup_steps, buffer)
