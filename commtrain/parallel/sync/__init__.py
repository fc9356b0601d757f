"""Data-parallel gradient synchronisation: one interface, one implementation per strategy.

The trainer talks to exactly one :class:`GradSync` per run, whatever the strategy::

    sync.begin_step(step)                 # arm the backward hooks (buckets reduce as they fill)
    with sync.no_sync(): loss.backward()  # accumulation backwards only accumulate
    loss.backward()                       # the last backward launches the reductions
    stats = sync.step(max_grad_norm, veto)  # finish reducing, clip, update -> {"grad_norm", "skipped", ...}
    sync.zero_grad()

``veto`` (optional) is called once per step with the global gradient norm (a 0-d tensor,
of the averaged gradient before clipping), after the reduction and before anything is
updated; when it returns True the step is *skipped*: no clipping, no optimizer step, no
parameter gather -- optimizer state (and ZeRO's master shard) stay as they were, and
``stats["skipped"]`` is True. The trainer's non-finite guard uses it (it must be called on
every rank of the group: the trainer's veto is itself a collective).

``param_groups`` are the optimizer's (the lr schedule writes them); ``state_dict()`` holds the
optimizer state, the gradient-compression state (EF residuals, PowerSGD factors, codec RNG)
and whatever else the strategy keeps. Strategies register by name (``sync.strategy``) and
all compress through :class:`~commtrain.parallel.compression.GradCompression`.

* ``data_parallel``: the overlapped compressed reducer + a ``torch.optim`` optimizer on every
  replica (:mod:`.data_parallel`).
* ``zero``: ZeRO stages 1 and 2, optimizer state (and at stage 2 gradients) sharded, gradient
  buckets reduce-scattered during backward (:mod:`.zero`).
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterable, Mapping, Protocol, runtime_checkable

import torch

from ...registry import Registry

SYNCS: Registry[Callable[..., "GradSync"]] = Registry("gradient sync")
Veto = Callable[[torch.Tensor], bool]  # global grad norm -> skip this step's update?


@runtime_checkable
class GradSync(Protocol):
    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def begin_step(self, step: int) -> None: ...

    def no_sync(self) -> ContextManager[None]: ...

    def step(self, max_grad_norm: float = 0.0, veto: Veto | None = None) -> dict[str, Any]: ...

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def memory_report(self) -> dict[str, int]: ...

    def close(self) -> None: ...


OptimizerFactory = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]


def build_sync(name: str, named_params, optimizer_factory: OptimizerFactory, comm, **kwargs) -> GradSync:
    """The registered strategy ``name`` over ``comm`` (the data-parallel group)."""
    return SYNCS.get(name, "sync strategy")(named_params, optimizer_factory, comm, **kwargs)


def grad_norm(grads: Iterable[torch.Tensor], device) -> torch.Tensor:
    """sqrt(sum of squared elements) in fp32, as ``clip_grad_norm_`` computes it."""
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        sq += g.float().pow(2).sum()
    return sq.sqrt()


def clip_(grads: Iterable[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` so that their norm is at most ``max_norm`` (``clip_grad_norm_``'s rule)."""
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale)


from . import data_parallel, zero  # noqa: E402,F401  (register the strategies)
from .data_parallel import DataParallel, GradReducer  # noqa: E402
from .zero import ZeroConfig, ZeroSync  # noqa: E402

__all__ = ["DataParallel", "GradReducer", "GradSync", "SYNCS", "Veto", "ZeroConfig", "ZeroSync", "build_sync"]
