"""Mesh: pp-outer rank layout, dp/pp groups that really contain the right ranks."""
import pytest
import torch
import torch.distributed as dist

from commtrain.parallel.mesh import Mesh
from tests.dist_utils import run_ranks


def _mesh_worker(rank, world, pp, dp):
    m = Mesh(pp=pp, dp=dp, timeout_s=30)
    # Sum of global ranks over each group proves its membership, not just its bookkeeping.
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=m.dp_group)
    u = torch.tensor([float(rank)])
    dist.all_reduce(u, group=m.pp_group)
    try:
        Mesh(pp=world + 1, dp=1)
        err = None
    except ValueError as e:
        err = str(e)
    return dict(stage=m.stage, dp_rank=m.dp_rank, prev=m.prev_rank, next=m.next_rank, first=m.is_first,
                last=m.is_last, dp_sum=t.item(), pp_sum=u.item(), err=err, sizes=(m.pp_size, m.dp_size))


def test_mesh_2x2():
    out = run_ranks(_mesh_worker, 4, 2, 2, timeout=90)
    for rank, o in enumerate(out):
        stage, d = divmod(rank, 2)
        assert (o["stage"], o["dp_rank"], o["sizes"]) == (stage, d, (2, 2))
        assert o["prev"] == (None if stage == 0 else rank - 2)
        assert o["next"] == (rank + 2 if stage == 0 else None)
        assert o["first"] == (stage == 0) and o["last"] == (stage == 1)
        assert o["dp_sum"] == sum(stage * 2 + j for j in range(2))  # same stage
        assert o["pp_sum"] == sum(s * 2 + d for s in range(2))  # same dp_rank
        assert "pp=5" in o["err"] and "dp=1" in o["err"] and "world_size=4" in o["err"]


def test_mesh_pure_dp_and_pure_pp():
    out = run_ranks(_mesh_worker, 2, 1, 2, timeout=60)
    assert [o["dp_sum"] for o in out] == [1.0, 1.0] and [o["pp_sum"] for o in out] == [0.0, 1.0]
    assert all(o["prev"] is None and o["next"] is None for o in out)
    out = run_ranks(_mesh_worker, 2, 2, 1, timeout=60)
    assert [o["next"] for o in out] == [1, None] and [o["prev"] for o in out] == [None, 0]


def test_mesh_validates_factors_before_process_group():
    with pytest.raises(ValueError, match="dp=0"):
        Mesh(pp=1, dp=0)
