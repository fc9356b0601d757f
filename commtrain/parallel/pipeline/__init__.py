"""Pipeline parallelism: schedules as data, the executor, and AC-SGD activation channels."""
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
    validate,
)

__all__ = [
    "Action",
    "DryRun",
    "PipelineDeadlock",
    "Schedule",
    "available_schedules",
    "build_schedule",
    "dry_run",
    "register_schedule",
    "render_grid",
    "validate",
]
