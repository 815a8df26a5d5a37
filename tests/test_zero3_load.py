"""ZeRO-3 ``load_state_dict``: each rank copies its shard straight from the incoming tensors, nothing gathered.

Equivalence is torch itself: the same state dict is loaded into a plain (unwrapped) copy of the model and into
the ZeRO-3-wrapped one; the return value or the error message must be the same string, and afterwards every
rank's gathered parameters (and the wrapper's ``state_dict()``) must equal the plain model's bit for bit. The
model has buckets smaller than its parameters (a parameter spans buckets and shards), a 0-D parameter loaded
from a 1-element 1-D tensor (torch's rule), a frozen layer, a buffer and an embedding tied to the output layer
(Hugging Face's tying: one Parameter under two keys, torch keeps the last one loaded). Memory: test_memory.py.
"""
import copy

import pytest
import torch
from harness import run_distributed

MODEL_KEYS = ["embed.weight", "body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "scale",
              "frozen.weight", "frozen.bias", "running", "head.weight"]


class Tied(torch.nn.Module):
    """Embedding tied to the output layer, a 0-D scale, a frozen layer and a buffer."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(11, 6)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Linear(7, 5))
        self.scale = torch.nn.Parameter(torch.tensor(1.5 + seed))
        self.frozen = torch.nn.Linear(5, 3)
        self.frozen.requires_grad_(False)
        self.register_buffer("running", torch.randn(3))
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        self.to(dtype)


def _incoming(case: str, dtype: torch.dtype) -> tuple[dict, bool]:
    """The state dict to load (another seed's values; the same on every rank) and ``strict``."""
    source = Tied(seed=5, dtype=torch.float32 if case == "fp32-into-model" else dtype)
    state = source.state_dict(keep_vars=case == "keep-vars")
    if case != "keep-vars":
        state = {k: v.clone() for k, v in state.items()}
    state["head.weight"] = torch.randn(11, 6).to(state["head.weight"].dtype)  # tied: the last key loaded wins
    state["scale"] = state["scale"].reshape(1)  # torch 0.3's 1-D form of a 0-D parameter
    strict = True
    if case == "missing-and-unexpected":
        del state["body.1.bias"]
        state["body.2.weight"] = torch.zeros(3)
        strict = False
    elif case in ("strict-missing", "size-mismatch", "not-a-tensor", "meta-entry"):
        del state["body.0.bias"]
        if case == "size-mismatch":
            state["body.1.weight"] = torch.zeros(5, 8, dtype=dtype)
        if case == "not-a-tensor":
            state["body.0.weight"] = "weights"
        if case == "meta-entry":  # the right shape, but no data: the copy itself fails
            state["body.0.weight"] = torch.empty(7, 6, dtype=dtype, device="meta")
    return state, strict


def _outcome(module: torch.nn.Module, state: dict, strict: bool) -> str:
    try:
        return repr(module.load_state_dict(state, strict=strict))
    except RuntimeError as exc:
        return f"RuntimeError: {exc}"


def _load(case: str, dtype_name: str, ddp_options: dict, submodule: str | None = None) -> dict:
    from megatron_core import parallel_state
    from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron_core.distributed.comm_log import CommLog

    dtype = getattr(torch, dtype_name)
    ps = parallel_state.ParallelState(1, 1, None)
    model = Tied(seed=1, dtype=dtype)
    plain = copy.deepcopy(model)
    log = CommLog()
    config = DistributedDataParallelConfig(zero_stage=3, bucket_size=40, **ddp_options)
    wrapped = DistributedDataParallel(config, model, ps, comm_log=log)
    state, strict = _incoming(case, dtype)
    if submodule is not None:  # a load rooted at a submodule, whose parameters the wrapper's root never sees
        state = {k[len(submodule) + 1:]: v for k, v in state.items() if k.startswith(submodule + ".")}
        plain, target = plain.get_submodule(submodule), model.get_submodule(submodule)
    else:
        target = wrapped
    collectives = len(log.records)
    got, want = _outcome(target, state, strict), _outcome(plain, state, strict)
    collectives = len(log.records) - collectives
    buffer = wrapped.buffers_by_dtype[0]
    result = {"got": got, "want": want, "collectives": collectives, "dp": ps.dp_size,
              "buckets": len(buffer.buckets), "persistent": sum(b.persistent for b in buffer.buckets),
              "gathered_after_load": sum(b.gathered for b in buffer.buckets)}
    reference = Tied(seed=1, dtype=dtype)
    reference.load_state_dict(plain.state_dict() if submodule is None else _whole(reference, plain, submodule))
    with wrapped.gathered_params():  # every rank's shards, all-gathered
        result["different"] = [name for name, p in model.named_parameters(remove_duplicate=False)
                               if not torch.equal(p, reference.get_parameter(name))]
    saved = wrapped.state_dict()
    result["state_dict_different"] = [k for k, v in reference.state_dict().items() if not torch.equal(saved[k], v)]
    if submodule is not None:  # a state_dict() rooted there too (it read the freed storage of its buckets)
        saved = model.get_submodule(submodule).state_dict()
        result["state_dict_different"] += [k for k, v in reference.get_submodule(submodule).state_dict().items()
                                           if not torch.equal(saved[k], v)]
    ps.destroy()
    return result


def _whole(reference: torch.nn.Module, plain_submodule: torch.nn.Module, name: str) -> dict:
    state = reference.state_dict()
    state.update({f"{name}.{k}": v for k, v in plain_submodule.state_dict().items()})
    return state


CASES = ["full", "keep-vars", "fp32-into-model", "missing-and-unexpected", "strict-missing", "size-mismatch",
         "not-a-tensor", "meta-entry"]


def _check(results: list[dict], dp: int) -> None:
    for rank, r in enumerate(results):
        assert r["dp"] == dp and r["buckets"] >= 4, r
        assert r["got"] == r["want"], f"rank {rank}: ZeRO-3 {r['got']!r}\ntorch {r['want']!r}"
        assert r["different"] == [] and r["state_dict_different"] == [], f"rank {rank}: {r}"
        # Straight into the shards: no all-gather (gathering every bucket issued one per bucket).
        assert r["collectives"] == 0, f"rank {rank}: {r['collectives']} collectives during the load"
        assert r["gathered_after_load"] == r["persistent"], r


@pytest.mark.parametrize("case", CASES)
def test_zero3_load_equals_torchs_at_dp2_bf16(case):
    _check(run_distributed(_load, 2, case, "bfloat16", {}, timeout=90), 2)


@pytest.mark.parametrize("options", [{}, {"stage3_param_persistence_threshold": 40}, {"offload_param": True}],
                         ids=["sharded", "persistent-buckets", "offload-param"])
@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("case", ["full", "meta-entry"])
def test_zero3_load_equals_torchs_fp32(case, dp, options):
    results = run_distributed(_load, dp, case, "float32", options, timeout=90)
    _check(results, dp)
    if "stage3_param_persistence_threshold" in options:
        assert 0 < results[0]["persistent"] < results[0]["buckets"]  # both paths: gathered buckets and freed ones


def test_zero3_load_of_a_submodule_writes_its_shards():
    """``model.body.load_state_dict(...)`` and ``model.body.state_dict()`` on their own: the wrapper's hooks are on
    every submodule (a hook on the wrapped root alone never ran: torch copied into the freed storage of the
    body's buckets, and read it back for the state dict)."""
    _check(run_distributed(_load, 2, "full", "float32", {}, "body", timeout=90), 2)


def _assign() -> str:
    from megatron_core import parallel_state
    from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ps = parallel_state.ParallelState(1, 1, None)
    model = Tied(seed=1, dtype=torch.float32)
    wrapped = DistributedDataParallel(DistributedDataParallelConfig(zero_stage=3, bucket_size=40), model, ps)
    try:
        wrapped.load_state_dict(Tied(seed=5, dtype=torch.float32).state_dict(), assign=True)
        return "loaded"
    except ValueError as exc:
        return str(exc)
    finally:
        ps.destroy()


def test_zero3_load_with_assign_is_a_one_line_error():
    """``assign=True`` would make the module's parameters the incoming tensors, detached from the buckets that
    training gathers and updates (it did so silently)."""
    for message in run_distributed(_assign, 2, timeout=60):
        assert "\n" not in message and message.startswith("load_state_dict with assign=True would replace the "
                                                          "ZeRO-3 parameters of the model"), message


def _state_dict_rooted_anywhere() -> dict:
    from megatron_core import parallel_state
    from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ps = parallel_state.ParallelState(1, 1, None)
    model, plain = Tied(seed=1, dtype=torch.float32), Tied(seed=1, dtype=torch.float32)
    wrapped = DistributedDataParallel(DistributedDataParallelConfig(zero_stage=3, bucket_size=40), model, ps)
    calls = {"body with a prefix": (lambda m: m.body.state_dict(prefix="x.")),
             "body in a container": (lambda m: torch.nn.Sequential(m.body).state_dict()),
             "model with a prefix": (lambda m: m.state_dict(prefix="x.")),
             "wrapper in a container": (lambda m: torch.nn.ModuleList([m]).state_dict())}
    different = {}
    for what, call in calls.items():
        got, want = call(wrapped if what.startswith("wrapper") else model), call(plain)
        different[what] = [k for k, v in want.items() if k not in got or not torch.equal(got[k], v)]
    ps.destroy()
    return different


def test_zero3_state_dict_rooted_with_a_prefix_or_in_a_container():
    """``state_dict()`` acts at the root of the call, whatever its ``prefix``: ``model.body.state_dict(prefix="x.")``
    and ``nn.Sequential(model.body).state_dict()`` read the freed storage of the body's buckets (the rank crashed)
    when the root was taken to be the wrapped module or a call with ``prefix=""``."""
    for different in run_distributed(_state_dict_rooted_anywhere, 2, timeout=60):
        assert all(keys == [] for keys in different.values()), different
