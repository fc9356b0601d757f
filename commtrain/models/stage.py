"""A pipeline stage: a contiguous run of a model's layers, sharing the model's parameters.

Models expose an ordered layer list ``[embedding, block_0, ..., block_{L-1}, head]`` where the
embedding maps token ids (B, T) to hidden states (B, T, C), every block maps (B, T, C) to
(B, T, C) and the head (final norm + lm head) maps hidden states to logits (B, T, V). Any
contiguous run of that list is therefore a valid stage, and running all stages in order is
exactly the unsplit model.

Weight tying: GPT-2 style models share the embedding matrix with the lm head. When the
embedding and the head land on different stages (different processes), the tie cannot be
kept without an extra gradient all-reduce between the first and last stage, so the head
stage gets an *untied copy* (same initial values, so outputs are identical at step 0; the
two copies then train independently). With one stage the tie is kept.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .partition import layer_costs, partition


class Stage(nn.Module):
    """Layers ``[start, stop)`` of a model's layer list, run in order."""

    def __init__(self, layers: Sequence[nn.Module], index: int, n_stages: int, start: int, stop: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.index, self.n_stages = index, n_stages
        self.start, self.stop = start, stop

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.n_stages - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        return f"stage {self.index}/{self.n_stages}, layers [{self.start}, {self.stop})"


def split_into_stages(
    layers: list[nn.Module],
    n_stages: int,
    balance: str,
    untie_head: Callable[[nn.Module], nn.Module] | None = None,
) -> list[Stage]:
    """Partition ``layers`` into ``n_stages`` balanced stages (see :mod:`.partition`).

    ``untie_head(head) -> head'`` is called when the model ties its head to its embedding and
    the two end up on different stages (see the module docstring).
    """
    bounds = partition(layer_costs(layers, balance), n_stages)
    layers = list(layers)
    if untie_head is not None and n_stages > 1:
        layers[-1] = untie_head(layers[-1])
    return [Stage(layers[a:b], i, n_stages, a, b) for i, (a, b) in enumerate(bounds)]
