"""Parallelism: the process mesh, data-parallel gradient sync (one interface: plain DP with
the overlapped compressed reducer, ZeRO 1/2; and a DDP comm hook), gradient compression
shared by all of them, PowerSGD, and (in ``pipeline/``) pipeline stages and schedules."""
from .buckets import Bucket, build_buckets
from .compression import CompressionConfig, GradCompression
from .ddp_hook import CommtrainHookState, commtrain_hook
from .mesh import Mesh, ParallelConfig
from .powersgd import PowerSGDReducer
from .sync import DataParallel, GradReducer, GradSync, ZeroConfig, ZeroSync, build_sync

__all__ = [
    "Bucket", "CommtrainHookState", "CompressionConfig", "DataParallel", "GradCompression", "GradReducer",
    "GradSync", "Mesh", "ParallelConfig", "PowerSGDReducer", "ZeroConfig", "ZeroSync", "build_buckets",
    "build_sync", "commtrain_hook",
]
