"""A rough per-GPU memory estimate of one pipeline stage (does the setup fit?).

* Model states: fp32 weights + gradients + AdamW's two moments = 16 bytes per parameter;
  ZeRO stage 1 shards the optimizer side (moments and fp32 master), stage 2 the gradients too.
* Activations: Korthikanti et al. 2022, about ``(34 + 5 a T / C) * T * C`` bytes per block and
  sequence in 16-bit without recomputation (``a`` heads, width ``C``, length ``T``), scaled to
  the activation dtype, times the microbatches in flight on the stage; the last stage adds the
  fp32 logits and their gradient.
"""
from __future__ import annotations

from .shapes import ModelShape, StageShape


def stage_memory_gb(shape: ModelShape, stage: StageShape, dp: int, zero: int, mb: int, inflight: int,
                    act_itemsize: int, last: bool) -> float:
    n = stage.numel
    states = {0: 16.0 * n, 1: 8.0 * n + 8.0 * n / dp + 4.0 * n / dp, 2: 4.0 * n + 16.0 * n / dp}[zero]
    T, Cw, H = shape.seq_len, max(shape.hidden, 1), max(shape.n_head, 1)
    acts = stage.n_blocks * T * Cw * (34 + 5 * H * T / Cw) * mb * inflight * act_itemsize / 2
    if last:
        acts += 2 * mb * T * shape.vocab_size * 4 * inflight  # logits + their gradient, fp32
    return (states + acts) / 1e9
