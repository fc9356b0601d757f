"""``powersgd``: rank-r gradient compression (Vogels et al., 2019) -- configuration only.

PowerSGD is not a Tensor -> Packet codec: it compresses a *matrix* into two factors whose
computation needs two all-reduces (P = M Q, then Q = M^T P) with an orthogonalisation in
between, so it cannot be expressed as one compress/decompress pair around a collective.
This registry entry carries its parameters so that ``grad: powersgd:rank=4`` is one more
codec spec; the data-parallel reducer and the DDP comm hook see
``needs_own_collective`` and run :mod:`commtrain.parallel.powersgd` instead of a
compressed all-reduce.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .codec import Codec, check_range, register_codec


@register_codec("powersgd")
class PowerSGD(Codec):
    """Parameters: ``rank`` (r >= 1, factor width), ``warm_start`` (reuse last step's Q, the
    power-iteration that makes rank 1-4 good enough), ``min_compression`` (compress a
    matrix only if n*m >= min_compression * r*(n+m); smaller ones go uncompressed),
    ``start_iter`` (steps of exact all-reduce before PowerSGD starts, as torch's
    ``PowerSGDState.start_powerSGD_iter``: the first steps move the weights most, and a
    rank-r projection of them, with Adam's per-element normalisation on top, can make the
    loss rise at first; the residual then also starts from a settled gradient).

    Why ``start_iter=10`` by default: torch defaults to 1,000 for pre-training, far longer
    than a short fine-tune; measured on a 10M-parameter GPT with AdamW, PowerSGD from step 0
    raised the loss over the first steps where exact DP lowered it. 10 steps of exact
    all-reduce cover the lr warm-up of the default schedule (``train.lr_warmup_steps=10``).
    """

    # The P and Q factors of all ranks are summed by a plain all-reduce.
    summable = True
    # Runs its own sequence of collectives (parallel/powersgd.py), never compress/decompress.
    needs_own_collective: ClassVar[bool] = True

    rank: int = 4
    warm_start: bool = True
    min_compression: float = 2.0
    start_iter: int = 10

    def validate(self):
        check_range(self, "rank", self.rank, 1)
        if not isinstance(self.rank, int):
            raise ValueError(f"powersgd: rank={self.rank!r} is invalid; allowed: an integer >= 1")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"powersgd: warm_start={self.warm_start!r} is invalid; allowed: true, false")
        check_range(self, "min_compression", self.min_compression, 1.0)
        if isinstance(self.start_iter, bool) or not isinstance(self.start_iter, int) or self.start_iter < 0:
            raise ValueError(f"powersgd: start_iter={self.start_iter!r} is invalid; allowed: an integer >= 0")

    def _refuse(self, *args, **kwargs):
        raise TypeError(
            "powersgd: compress/decompress are not available -- PowerSGD needs two all-reduces per "
            "matrix and runs only inside the data-parallel reducer (commtrain.parallel.GradReducer) "
            "or the DDP comm hook (commtrain.parallel.commtrain_hook), through GradCompression"
        )

    compress = _refuse
    decompress = _refuse

    def payload_nbytes(self, numel, dtype=None):
        self._refuse()

    def wire_nbytes(self, shape_or_numel, dtype=None) -> int:
        """fp32 bytes of P and Q for a matrix-shaped gradient (rows x rest); 1-D ones go raw."""
        shape = torch.Size([shape_or_numel] if isinstance(shape_or_numel, int) else shape_or_numel)
        if len(shape) < 2:
            return 4 * shape.numel()
        return 4 * self.factor_numel(shape[0], shape.numel() // max(shape[0], 1))

    def factor_numel(self, n: int, m: int) -> int:
        """Elements sent for an n x m matrix (P and Q), or n*m if it stays uncompressed."""
        r = min(self.rank, n, m)
        return r * (n + m) if self.compresses(n, m) else n * m

    def compresses(self, n: int, m: int) -> bool:
        r = min(self.rank, n, m)
        return n * m >= self.min_compression * r * (n + m)
