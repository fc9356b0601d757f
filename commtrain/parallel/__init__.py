"""Executors: the process mesh, data-parallel gradient reduction (own reducer or a DDP comm
hook), PowerSGD, the ZeRO sharded optimizer, and (in ``pipeline/``) pipeline stages."""
from .ddp_hook import CommtrainHookState, commtrain_hook
from .mesh import Mesh
from .powersgd import PowerSGDReducer
from .reducer import Bucket, GradReducer, ReduceConfig, build_buckets
from .zero import ZeroOptimizer

__all__ = [
    "Bucket", "CommtrainHookState", "GradReducer", "Mesh", "PowerSGDReducer", "ReduceConfig",
    "ZeroOptimizer", "build_buckets", "commtrain_hook",
]
