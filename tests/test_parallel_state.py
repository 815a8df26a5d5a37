"""Process-group layout, group membership by real collectives, and errors."""
import pytest
import torch
import torch.distributed as dist
from harness import RankError, run_distributed

from megatron_core import parallel_state
from megatron_core.parallel_state import rank_groups


def test_layout_tp_dp_pp_order_matches_megatron():
    sizes = {"tp": 2, "cp": 1, "ep": 1, "dp": 2, "pp": 2}
    order = "tp-cp-ep-dp-pp"
    assert rank_groups(sizes, order, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_groups(sizes, order, "dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert rank_groups(sizes, order, "pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert rank_groups(sizes, order, "tp-pp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # Another order puts data-parallel ranks adjacent instead.
    assert rank_groups(sizes, "dp-tp-cp-ep-pp", "dp") == [[0, 1], [2, 3], [4, 5], [6, 7]]


def _groups_on_rank(tp, pp):
    ps = parallel_state.initialize_model_parallel(tp, pp)
    me = torch.tensor([float(dist.get_rank())])
    sums = {}
    for name, group in (("tp", ps.tp_group), ("pp", ps.pp_group), ("dp", ps.dp_group), ("mp", ps.mp_group)):
        t = me.clone()
        dist.all_reduce(t, group=group)
        sums[name] = t.item()
    emb = None
    if ps.is_in_embedding_group():
        t = me.clone()
        dist.all_reduce(t, group=ps.embedding_group)
        emb = t.item()
    out = dict(rank=ps.rank, tp=(ps.tp_rank, ps.tp_ranks), pp=(ps.pp_rank, ps.pp_ranks), dp=(ps.dp_rank, ps.dp_ranks),
               first=ps.is_pipeline_first_stage(), last=ps.is_pipeline_last_stage(), sums=sums, emb=emb,
               emb_ranks=ps.embedding_ranks, next=ps.next_pipeline_rank, prev=ps.prev_pipeline_rank)
    parallel_state.destroy_model_parallel()
    return out


def test_groups_on_eight_ranks_communicate_within_their_members():
    results = run_distributed(_groups_on_rank, 8, 2, 2, timeout=90)
    for r in results:
        rank = r["rank"]
        for name in ("tp", "pp", "dp"):
            _, members = r[name]
            assert rank in members
            assert r["sums"][name] == sum(members)
        tp_members, pp_members = r["tp"][1], r["pp"][1]
        assert r["sums"]["mp"] == sum(t + p - rank for t in tp_members for p in pp_members)  # tp x pp block
        assert r["first"] == (rank < 4) and r["last"] == (rank >= 4)
        assert r["emb_ranks"] == pp_members
        assert r["emb"] == sum(pp_members)
        assert r["next"] == pp_members[(r["pp"][0] + 1) % 2]
        assert r["prev"] == pp_members[(r["pp"][0] - 1) % 2]
    assert [r["tp"][0] for r in results] == [0, 1] * 4
    assert [r["dp"][0] for r in results] == [0, 0, 1, 1] * 2


def _virtual_stages():
    ps = parallel_state.initialize_model_parallel(1, 2, 2)
    return (ps.is_pipeline_first_stage(vp_stage=0), ps.is_pipeline_first_stage(vp_stage=1),
            ps.is_pipeline_last_stage(vp_stage=0), ps.is_pipeline_last_stage(vp_stage=1))


def test_virtual_stage_queries():
    r0, r1 = run_distributed(_virtual_stages, 2, timeout=60)
    assert r0 == (True, False, False, False)
    assert r1 == (False, False, False, True)


def _bad_sizes():
    parallel_state.initialize_model_parallel(3, 1)


def test_sizes_not_dividing_world_are_named():
    with pytest.raises(RankError, match=r"world size 4 is not divisible by tensor_model_parallel_size \(3\) x .* "
                                        r"x expert_model_parallel_size \(1\) = 3; change the sizes"):
        run_distributed(_bad_sizes, 4, timeout=60)


def test_layer_before_process_groups_is_a_clear_error():
    from megatron_core.tensor_parallel import ColumnParallelLinear
    with pytest.raises(RuntimeError, match="model parallel groups are not initialized"):
        ColumnParallelLinear(4, 4)


def _registered_after_destroy():
    ps = parallel_state.initialize_model_parallel(2, 2)
    ps.background_group()
    groups = {"tp": ps.tp_group, "pp": ps.pp_group, "dp": ps.dp_group, "mp": ps.mp_group,
              "embedding": ps.embedding_group, "background": ps.background_group()}
    before = [name for name, group in groups.items() if _registered(group)]
    initialized = parallel_state.model_parallel_is_initialized()
    parallel_state.destroy_model_parallel()
    after = [name for name, group in groups.items() if _registered(group)]
    return before, after, (initialized, parallel_state.model_parallel_is_initialized())


def _registered(group) -> bool:
    try:
        dist.get_rank(group)  # ValueError for a group torch.distributed no longer knows
    except ValueError:
        return False
    return True


def test_destroy_releases_every_group_of_this_rank():
    for before, after, initialized in run_distributed(_registered_after_destroy, 4, timeout=60):
        assert before == ["tp", "pp", "dp", "mp", "embedding", "background"]
        assert after == [], f"groups still registered after destroy_model_parallel: {after}"
        assert initialized == (True, False), "model_parallel_is_initialized before and after destroy"
