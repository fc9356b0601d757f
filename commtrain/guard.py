"""The per-step agreement of all ranks: mean loss, non-finite guard, stop request.

Every rank knows only its own loss, its own gradient norm (pipeline stages see different
gradients; ZeRO-2 ranks different shards) and whether *it* received SIGTERM/SIGINT. One
all-reduce over the whole world of three numbers, ``[loss, non-finite?, stop asked?]``
(summed), makes all of them agree:

* ``loss``: the mean of the ranks' losses (the replicas' mean; in a pipeline every stage
  reports its replica's loss) -- the number the metrics log;
* ``nonfinite``: some rank's loss or gradient norm is NaN/inf -> every rank skips the
  update (the gradient sync's ``veto``), so replicas and stages stay consistent;
* ``stop``: some rank was asked to stop -> all stop at this step boundary.

It runs inside ``sync.step`` as its ``veto`` (after the reduction, before the update), so
the step costs one tiny collective, as the loss average alone did before.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Agreed:
    loss: float  # mean over ranks (NaN when some rank's loss is)
    nonfinite: bool  # some rank saw a non-finite loss or gradient norm: the step was skipped
    stop: bool  # some rank was asked to stop (SIGTERM/SIGINT)


class StepGuard:
    def __init__(self, device: torch.device, stop_requested: Callable[[], bool]):
        self.device = device
        self.stop_requested = stop_requested
        self.world_size = dist.get_world_size()
        self._agreed: Agreed | None = None

    def veto(self, loss: float, local_nonfinite: Callable[[], bool] | None = None) -> Callable[[torch.Tensor], bool]:
        """The ``veto`` for this step's ``sync.step``: agrees with every rank, True = skip.
        ``local_nonfinite()`` (optional): did this rank's own gradients hold a non-finite value
        before they were reduced (fp16 loss scaling: an overflow a codec might have dropped)?"""
        self._agreed = None

        def decide(grad_norm: torch.Tensor) -> bool:
            local = local_nonfinite() if local_nonfinite is not None else False  # always read: it resets
            bad = local or not (math.isfinite(float(loss)) and bool(torch.isfinite(grad_norm)))
            t = torch.tensor([float(loss), float(bad), float(self.stop_requested())],
                             dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total, n_bad, n_stop = t.tolist()
            self._agreed = Agreed(loss=total / self.world_size, nonfinite=n_bad > 0, stop=n_stop > 0)
            return self._agreed.nonfinite

        return decide

    def outcome(self) -> Agreed:
        """What the ranks agreed in this step's veto."""
        if self._agreed is None:
            raise RuntimeError("the gradient sync did not call its veto this step (every GradSync.step must)")
        return self._agreed
