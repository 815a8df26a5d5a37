"""Test helper: a run's parameters and optimizer state as whole TP = 1 tensors, gathered by the test.

Independent of the checkpoint code under test (``dist_checkpointing.sharded``): each rank fills whole
TP-local tensors from its own ZeRO pieces (``ShardPiece``'s flat element ranges) and the test
all-reduces them over DP; the TP slices are then concatenated along their partition dim (a strided
parameter's parts interleaved, as ``tests/test_dist_checkpointing._full``). Uses only interfaces that
existed before the sharded checkpoint (commit 65d0e05), so ``tests/fixtures/make_dist_ckpt_pre_shard.py``
records the same view with the code of that commit.
"""
import contextlib

import torch
import torch.distributed as dist


def _pieces(optimizer):
    """``(model param, first, end, main)`` of every main parameter (whole parameters without ZeRO)."""
    if hasattr(optimizer, "sharded"):
        return [(piece.param, piece.param_start, piece.param_end, main) for sb in optimizer.sharded
                for piece, main in zip(sb.pieces, sb.mains, strict=True)]
    return [(model, 0, model.numel(), main) for main, model in optimizer.pairs]


def local_state(ps, spec, chunks, wrapped, optimizer) -> dict:
    """This rank's view: ``tensors`` {"model/<name>" or "<state key>/<name>": TP-local fp32 tensor}
    (optimizer state summed over DP, so whole on every rank), ``shard`` {name: (dim, stride) or None},
    ``tp``, ``dp``, ``step``. Collective over DP (the gathers are the test's, not the code's)."""
    with contextlib.ExitStack() as stack:
        for w in wrapped:
            if w.ddp_config.zero_stage == 3:
                stack.enter_context(w.gathered_params())
        params = spec.global_parameters(chunks)
        tensors = {f"model/{n}": p.detach().float().clone() for n, p in params.items()}
    shard = {n: ((p.partition_dim, getattr(p, "partition_stride", 1)) if getattr(p, "tensor_model_parallel", False)
                 else None) for n, p in params.items()}
    name_of = {id(p): n for n, p in params.items()}
    keys = sorted({k for st in optimizer.inner.state.values() for k, v in st.items() if torch.is_tensor(v) and v.dim()})
    steps = {float(st["step"]) for st in optimizer.inner.state.values() if "step" in st}
    for key in ["main", *keys]:
        full = {n: torch.zeros(p.numel()) for n, p in params.items()}
        for param, first, end, main in _pieces(optimizer):
            value = main if key == "main" else optimizer.inner.state[main][key]
            full[name_of[id(param)]][first:end] = value.detach().reshape(-1).float()
        for n, p in params.items():
            if hasattr(optimizer, "sharded") and ps.dp_size > 1:
                dist.all_reduce(full[n], group=ps.dp_group)  # each element from the one rank that owns it
            tensors[f"{key}/{n}"] = full[n].view(p.shape)
    return {"tensors": tensors, "shard": shard, "tp": (ps.tp_rank, ps.tp_size), "dp": (ps.dp_rank, ps.dp_size),
            "step": steps}


def merged(results: list) -> dict:
    """``{"<key>/<name>": whole TP = 1 tensor}`` from every rank's :func:`local_state` (PP 1), and the steps."""
    out = {}
    for key in results[0]["tensors"]:
        name = key.split("/", 1)[1]
        by_tp = {r["tp"][0]: r["tensors"][key] for r in results if r["dp"][0] == 0}
        tensors = [by_tp[t] for t in sorted(by_tp)]
        split = results[0]["shard"][name]
        if split is None:
            out[key] = tensors[0]
            continue
        dim, stride = split
        parts = [t.chunk(stride, dim=dim) for t in tensors]
        out[key] = torch.cat([p[i] for i in range(stride) for p in parts], dim=dim)
    return {"tensors": out, "step": set().union(*(r["step"] for r in results))}


def assert_same(a: dict, b: dict, what: str) -> None:
    """Every tensor of two :func:`merged` views equal, exactly."""
    assert sorted(a["tensors"]) == sorted(b["tensors"]), f"{what}: {sorted(a['tensors'])} vs {sorted(b['tensors'])}"
    assert a["step"] == b["step"], f"{what}: optimizer steps {a['step']} vs {b['step']}"
    for key, value in a["tensors"].items():
        assert torch.equal(value, b["tensors"][key]), \
            f"{what}: {key} differs (max {(value - b['tensors'][key]).abs().max().item():.3g})"
