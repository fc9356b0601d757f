"""Pipeline parallelism: schedules as data, the executor, and AC-SGD activation channels."""
from .acsgd import ActivationChannel
from .buffers import ActivationBuffer, available_storages, register_storage
from .executor import PipelineEngine
from .schedules import (
    Action,
    DryRun,
    PipelineDeadlock,
    Schedule,
    available_schedules,
    build_schedule,
    dry_run,
    register_schedule,
    render_grid,
    simulate_timing,
    validate,
)

__all__ = [
    "ActivationBuffer",
    "ActivationChannel",
    "PipelineEngine",
    "available_storages",
    "register_storage",
    "Action",
    "DryRun",
    "PipelineDeadlock",
    "Schedule",
    "available_schedules",
    "build_schedule",
    "dry_run",
    "register_schedule",
    "render_grid",
    "simulate_timing",
    "validate",
]
