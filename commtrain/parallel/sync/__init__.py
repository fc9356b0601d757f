"""Data-parallel gradient synchronisation: one interface, one implementation per strategy.

The trainer talks to exactly one :class:`GradSync` per run, whatever the strategy::

    sync.begin_step(step)                 # arm the backward hooks (buckets reduce as they fill)
    with sync.no_sync(): loss.backward()  # accumulation backwards only accumulate
    loss.backward()                       # the last backward launches the reductions
    stats = sync.step(max_grad_norm, veto)  # finish reducing, clip, update -> {"grad_norm", "skipped", ...}
    sync.zero_grad()
    ...
    sync.finalize()                       # after the last step: every replica holds the final model

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
* ``diloco``: the communication-avoiding outer loop -- H local inner steps per replica, then a
  compressed, possibly fragmented and overlapped sync of pseudo-gradients (:mod:`.diloco`).

:class:`SyncConfig` is the ``sync`` config section: ``strategy`` ``step`` (a gradient
reduction every step: ``data_parallel``, or ``zero`` when ``zero.stage`` > 0) or ``diloco``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Mapping, Protocol, runtime_checkable

import torch

from ...compress import build_codec
from ...registry import Registry
from ...validate import ConfigError, choice, integer, positive

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

    def finalize(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def memory_report(self) -> dict[str, int]: ...

    def close(self) -> None: ...


OptimizerFactory = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]
STRATEGIES = ("step", "diloco")
OUTER_OPTIMIZERS = ("nesterov", "sgd")


@dataclass
class SyncConfig:
    """The ``sync`` section: how data-parallel replicas stay in sync."""

    strategy: str = "step"  # step: reduce gradients every step; diloco: the outer loop
    inner_steps: int = 32  # diloco: H, inner optimizer steps between syncs of a fragment
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_optimizer: str = "nesterov"  # nesterov (momentum outer_momentum) | sgd (plain; lr 1 = averaging)
    codec: str = "none"  # codec for the pseudo-gradient (any registry spec)
    error_feedback: bool = True
    fragments: int = 1  # Streaming DiLoCo: F fragments, one synced every H/F steps
    overlap: bool = True  # the sync runs while the next inner steps compute
    overlap_steps: int = 1  # tau: the update is applied after this many further inner steps

    def validate(self) -> None:
        choice("sync.strategy", self.strategy, STRATEGIES)
        integer(self, "sync", "inner_steps", 1)
        integer(self, "sync", "fragments", 1)
        integer(self, "sync", "overlap_steps", 1)
        positive(self, "sync", "outer_lr")
        if not (isinstance(self.outer_momentum, (int, float)) and not isinstance(self.outer_momentum, bool)
                and 0 <= self.outer_momentum < 1):
            raise ConfigError(f"sync.outer_momentum={self.outer_momentum!r} is invalid; allowed: 0 <= momentum < 1")
        choice("sync.outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        for key in ("error_feedback", "overlap"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"sync.{key}={getattr(self, key)!r} is invalid; allowed: true, false")
        try:
            build_codec(self.codec)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"sync.codec={self.codec!r}: {e}") from None
        if self.fragments > self.inner_steps:
            raise ConfigError(f"sync.fragments={self.fragments} is invalid with sync.inner_steps={self.inner_steps}: "
                              f"one fragment syncs every H/F steps; allowed: fragments <= inner_steps")
        if self.overlap and self.overlap_steps > self.inner_steps // self.fragments:
            raise ConfigError(f"sync.overlap_steps={self.overlap_steps} is invalid: a fragment's update must land "
                              f"before the next fragment's sync starts; allowed: <= inner_steps / fragments = "
                              f"{self.inner_steps // self.fragments}")

    def strategy_name(self, zero_stage: int) -> str:
        """The registered GradSync this section (and ``zero.stage``) selects."""
        if self.strategy == "diloco":
            return "diloco"
        return "zero" if zero_stage else "data_parallel"


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


from . import data_parallel, diloco, zero  # noqa: E402,F401  (register the strategies)
from .data_parallel import DataParallel, GradReducer  # noqa: E402
from .diloco import DiLoCo  # noqa: E402
from .zero import ZeroConfig, ZeroSync  # noqa: E402

__all__ = ["DataParallel", "DiLoCo", "GradReducer", "GradSync", "SYNCS", "SyncConfig", "Veto", "ZeroConfig",
           "ZeroSync", "build_sync"]
