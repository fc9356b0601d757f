"""Mixed precision: ``train.precision`` = ``fp32`` | ``bf16`` | ``fp16``.

* The forward pass (and the loss) runs under ``torch.autocast`` in the compute dtype; the
  parameters -- the *master weights* -- and the optimizer state stay fp32, and so do the
  gradients autograd accumulates into ``param.grad``.
* ``fp16`` multiplies the loss by a :class:`LossScaler`'s scale before backward. The
  gradients are *unscaled* where they enter the gradient compression (``GradCompression``
  divides each bucket's flat gradient by the scale before any codec, error feedback, clip or
  norm sees it), so error-feedback residuals are always in true-gradient units. A non-finite
  value in any rank's (scaled) gradient is recorded there, before compression could hide it
  (top-k may drop an inf), and vetoes the step on *every* rank through the trainer's
  :class:`~commtrain.guard.StepGuard` (one agreed decision); error feedback keeps its old
  residual for non-finite values. The scaler then halves its scale (``backoff``), on every
  rank alike because it reads the agreed outcome, and doubles it after ``growth_interval``
  clean steps (``torch.amp.GradScaler``'s rule). Its state is part of the checkpoint.
* Pipelines send boundary activations and activation gradients in the compute dtype
  (``act_dtype``): half the bytes of fp32 on the wire with codec ``none``; lossy codecs take
  bf16/fp16 input as it is (see the README's "Mixed precision").

``fp16`` needs an autocast on the device that supports float16 (CPU autocast does on recent
torch); otherwise the run refuses to start with one line.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_supported(precision: str, device_type: str) -> str | None:
    """None when ``precision`` runs on ``device_type``, else why not (one line)."""
    if precision == "fp32":
        return None
    dtype = DTYPES[precision]
    try:
        with torch.autocast(device_type, dtype=dtype):
            y = torch.nn.functional.linear(torch.ones(1, 2, device=device_type), torch.ones(2, 2, device=device_type))
        if y.dtype != dtype:
            return f"torch.autocast({device_type!r}) computes in {y.dtype}, not {dtype}"
    except (RuntimeError, ValueError, TypeError) as e:  # unsupported device/dtype pair
        return f"torch.autocast({device_type!r}, dtype={dtype}) is not supported here ({str(e).splitlines()[0]})"
    return None


class LossScaler:
    """Dynamic loss scale (``torch.amp.GradScaler``'s schedule) whose decisions come from
    outside: :meth:`update` takes the step's *agreed* overflow flag, so every rank holds the
    same scale. Scales are powers of two, so unscaling is exact."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 2.0 ** -14):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = int(growth_interval), float(min_scale)
        self.good_steps = 0
        self.overflows = 0

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.good_steps = 0
            self.overflows += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    @property
    def exhausted(self) -> bool:
        """The scale reached its floor: overflows now mean the gradients themselves are not finite."""
        return self.scale <= self.min_scale

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "overflows": self.overflows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.overflows = int(state.get("overflows", 0))


class Precision:
    """What ``train.precision`` means for one run on ``device``: :meth:`autocast` around
    forward + loss, the pipeline's wire dtype ``act_dtype``, and the ``scaler`` (fp16 only)."""

    def __init__(self, precision: str, device: torch.device):
        self.name = precision
        self.device_type = torch.device(device).type
        self.dtype = DTYPES[precision]
        self.act_dtype = self.dtype  # pipeline boundaries carry the compute dtype
        self.scaler = LossScaler() if precision == "fp16" else None
        self._compression = None  # the GradCompression that unscales (fp16), see attach()

    # -- the step, as the trainer calls it (no branches there) ---------------------------------
    def attach(self, compression) -> None:
        """fp16: ``compression`` (a GradCompression, or None) unscales every gradient bucket and
        notes non-finite local values before compressing."""
        if self.scaler is not None and compression is not None:
            compression.check_finite = True
            self._compression = compression

    def begin_step(self) -> None:
        """Before backward: the scale the loss is multiplied by this step is the one divided out."""
        if self._compression is not None:
            self._compression.loss_scale = self.scaler.scale

    def local_nonfinite(self) -> bool:
        """Did this rank's gradients hold a non-finite value before reduction (fp16; resets)?"""
        return self._compression.take_overflow() if self._compression is not None else False

    def end_step(self, skipped: bool, loss: float) -> dict[str, Any]:
        """After the agreed outcome: update the scaler; the metrics' ``loss_scale`` (the scale
        this step used) and ``overflow`` (fp16 only; empty otherwise)."""
        if self.scaler is None:
            return {}
        scale = self.scaler.scale
        return {"loss_scale": scale, "overflow": self.overflowed(skipped, loss)}

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The tensor to call backward on."""
        return loss * self.scaler.scale if self.scaler is not None else loss

    def overflowed(self, skipped: bool, loss: float) -> bool:
        """Was an agreed skip a loss-scale overflow (fp16, finite loss, scale not yet at its
        floor) rather than a diverged step? Updates the scaler (every step, on every rank)."""
        if self.scaler is None:
            return False
        self.scaler.update(skipped)
        return skipped and math.isfinite(loss) and not self.scaler.exhausted

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
