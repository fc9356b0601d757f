"""The process mesh: ``pp`` pipeline stages x ``dp`` data-parallel replicas.

Global rank layout is pipeline-outer: ``rank = stage * dp + dp_rank``. So the ``dp``
ranks of one stage are consecutive (on one machine they share the fastest links, and
data-parallel gradient traffic is the largest), and a pipeline is the ranks
``dp_rank, dp_rank + dp, dp_rank + 2 dp, ...``.

``torch.distributed.new_group`` is itself a collective over the *whole* world: every rank
must call it for every group, in the same order, even for groups it is not in. ``Mesh``
therefore creates all dp groups (stage 0..pp-1) and then all pp groups (dp_rank
0..dp-1) on every rank and keeps the two it belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from ..validate import ConfigError, integer, positive


@dataclass
class ParallelConfig:
    """The ``parallel`` section: the mesh's degrees and how the work runs on it."""

    dp: Optional[int] = None  # None: world_size // pp
    pp: int = 1
    schedule: str = "1f1b"  # a registered pipeline schedule
    microbatches: int = 4
    bucket_mb: float = 4.0  # gradient bucket size (MiB)
    overlap: bool = True  # start each gradient bucket's reduction as soon as it is ready

    def validate(self) -> None:
        from .pipeline.schedules import available_schedules

        integer(self, "parallel", "pp", 1)
        integer(self, "parallel", "microbatches", 1)
        positive(self, "parallel", "bucket_mb")
        if self.dp is not None:
            integer(self, "parallel", "dp", 1)
        if self.schedule not in available_schedules():
            raise ConfigError(f"parallel.schedule={self.schedule!r} is invalid; allowed: {', '.join(available_schedules())}")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"parallel.overlap={self.overlap!r} is invalid; allowed: true, false")

    def degrees(self, world_size: int) -> tuple[int, int]:
        """``(pp, dp)`` for ``world_size`` ranks (``dp`` None: the rest of the world), checked."""
        dp = self.dp if self.dp is not None else world_size // self.pp
        if dp < 1 or self.pp * dp != world_size:
            raise ConfigError(
                f"parallel.pp={self.pp} x parallel.dp={self.dp if self.dp is not None else 'auto'} "
                f"must equal the world size {world_size} (pp * dp = {self.pp * max(dp, 0)})"
            )
        return self.pp, dp


def _check_factor(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Mesh: {name}={value!r} is invalid; allowed: an integer >= 1")


@dataclass
class Mesh:
    """``Mesh(pp, dp)``: build after ``dist.init_process_group``.

    Attributes: ``rank``, ``world_size``, ``pp_size``, ``dp_size``, ``stage``, ``dp_rank``,
    ``dp_group`` (ranks of this stage; gradient reduction, ZeRO), ``pp_group`` (the
    stages of this replica; pipeline p2p), ``prev_rank`` / ``next_rank`` (global ranks of
    the neighbouring stages in this pipeline, ``None`` at the ends), ``is_first`` /
    ``is_last`` (stage position).
    """

    pp: int
    dp: int
    timeout_s: float | None = None
    rank: int = field(init=False)
    world_size: int = field(init=False)

    def __post_init__(self):
        _check_factor("pp", self.pp)
        _check_factor("dp", self.dp)
        if not dist.is_initialized():
            raise RuntimeError("Mesh: call torch.distributed.init_process_group before building the mesh")
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        if self.pp * self.dp != self.world_size:
            raise ValueError(
                f"Mesh: pp * dp must equal the world size, got pp={self.pp} * dp={self.dp} = "
                f"{self.pp * self.dp} but world_size={self.world_size}"
            )
        self.stage, self.dp_rank = divmod(self.rank, self.dp)
        kw = {"timeout": timedelta(seconds=self.timeout_s)} if self.timeout_s else {}
        # Same creation order on every rank (new_group is a world collective).
        self.dp_ranks_by_stage = [[s * self.dp + d for d in range(self.dp)] for s in range(self.pp)]
        self.pp_ranks_by_replica = [[s * self.dp + d for s in range(self.pp)] for d in range(self.dp)]
        dp_groups = [self._group(r, kw) for r in self.dp_ranks_by_stage]
        pp_groups = [self._group(r, kw) for r in self.pp_ranks_by_replica]
        self.dp_group = dp_groups[self.stage]
        self.pp_group = pp_groups[self.dp_rank]

    def _group(self, ranks: list[int], kw):
        # A group of its own even when it spans the world: the Communicator runs collectives on
        # it from a worker thread (e.g. an overlapped outer sync that outlives the step), and
        # the main thread's own collectives on WORLD (loss mean, eval, checkpoint agreement)
        # must never interleave with them on one group.
        return dist.new_group(ranks=ranks, **kw)

    @property
    def pp_size(self) -> int:
        return self.pp

    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.rank - self.dp

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + self.dp

    def global_rank(self, stage: int, dp_rank: int) -> int:
        """Global rank of (stage, dp_rank)."""
        if not (0 <= stage < self.pp and 0 <= dp_rank < self.dp):
            raise ValueError(f"Mesh: (stage={stage}, dp_rank={dp_rank}) outside pp={self.pp}, dp={self.dp}")
        return stage * self.dp + dp_rank

    def __repr__(self) -> str:
        return (f"Mesh(pp={self.pp}, dp={self.dp}, rank={self.rank}, stage={self.stage}, "
                f"dp_rank={self.dp_rank})")
