"""ShardedSampler: deterministic, epoch-reshuffled, rank-sharded and resumable batches of ids.

For every global step the *global batch* is a fixed slice of the epoch's permutation
(seeded by ``seed + epoch``); rank r takes the r-th ``batch_size`` piece of it. So the
concatenation of all ranks' batches, in rank order, is exactly ``global_batch(step)`` (the
single-process reference trains on that), and the stream depends only on (seed, number of
samples, global batch size) -- not on the rank count. Each epoch drops the last
``num_samples % global_batch`` ids of its permutation (a different set every epoch).

``sticky=True`` keeps every sample on one rank for the whole run: rank r owns the ids
``first_id + j * dp_size + r`` and reshuffles only those each epoch. AC-SGD needs this with
data parallelism, because its per-sample activation buffers live on one replica: a sample
dealt to another replica next epoch would be "unseen" there and sent as a first visit (8-bit, not a delta).
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch


def _check_int(name: str, value, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= {lo}")


class ShardedSampler:
    def __init__(self, dataset, batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle: bool = True, sticky: bool = False):
        """``dataset``: a TokenDataset (its ids are used) or a number of samples (ids 0..n-1)."""
        num = dataset if isinstance(dataset, int) else len(dataset)
        _check_int("batch_size", batch_size, 1)
        _check_int("dp_size", dp_size, 1)
        _check_int("seed", seed, 0)
        _check_int("num_samples", num, 0)
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} is invalid; allowed: 0..{dp_size - 1}")
        self.num_samples, self.first_id = num, getattr(dataset, "first_id", 0)
        self.batch_size, self.dp_rank, self.dp_size = batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.sticky = seed, shuffle, bool(sticky)
        self.global_batch_size = batch_size * dp_size
        # sticky: each rank walks its own num // dp_size samples.
        self.steps_per_epoch = (num // dp_size) // batch_size if self.sticky else num // self.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size={batch_size} x dp_size={dp_size} = {self.global_batch_size} is larger than the "
                f"{num} samples; allowed: a global batch <= the number of samples"
            )
        self.epoch, self.position = 0, 0  # the next batch to hand out
        self._perm_epoch, self._perm = -1, None

    # -- deterministic order ------------------------------------------------------------
    def _order(self, n: int, seed: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = self._order(self.num_samples, self.seed + epoch) + self.first_id
            self._perm_epoch = epoch
        return self._perm

    def _sticky_batch(self, rank: int, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.steps_per_epoch)
        # Seeded per (epoch, rank) so replicas do not walk their shards in lock-step.
        local = self._order(self.num_samples // self.dp_size, (self.seed + epoch) * 65537 + rank)
        b = self.batch_size
        return self.first_id + local[pos * b:(pos + 1) * b] * self.dp_size + rank

    def global_batch(self, step: int) -> torch.Tensor:
        """Ids of global step ``step`` (counted from the start of epoch 0), all ranks in rank order."""
        if self.sticky:
            return torch.cat([self._sticky_batch(r, step) for r in range(self.dp_size)])
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = self.global_batch_size
        return self._permutation(epoch)[pos * g:(pos + 1) * g]

    def rank_batch(self, step: int) -> torch.Tensor:
        if self.sticky:
            return self._sticky_batch(self.dp_rank, step)
        b = self.batch_size
        return self.global_batch(step)[self.dp_rank * b:(self.dp_rank + 1) * b]

    # -- iteration ----------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.position

    def __len__(self) -> int:
        return self.steps_per_epoch

    def next_batch(self) -> torch.Tensor:
        """This rank's next batch of ids (B,); rolls over into the next epoch (infinite)."""
        batch = self.rank_batch(self.step)
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        """The rest of the current epoch; state advances as batches are handed out."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    # -- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "global_batch_size": self.global_batch_size, "shuffle": self.shuffle,
                "sticky": self.sticky}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` left off. The rank count may change as long as the
        global batch (and so every step's content) is the same."""
        for key in ("seed", "num_samples", "global_batch_size", "shuffle", "sticky"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has {getattr(self, key)!r}; "
                                 "a resumed run must use the same data, seed and global batch size")
        if not 0 <= state["position"] < self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"sampler state position={state['position']!r}, epoch={state['epoch']!r} is invalid; "
                             f"allowed: epoch >= 0, 0 <= position < {self.steps_per_epoch}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
