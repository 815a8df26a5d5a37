"""Per-rank bytes of parameters, gradients, main parameters and optimizer state against the ZeRO paper.

Measured by ``memory_footprint`` from the tensors alive after a bf16 Adam step (K = 12: fp32 main
parameters 4 + exp_avg 4 + exp_avg_sq 4 bytes per parameter), Ψ parameters, Nd DP ranks:

=========  ===========  ==========  ==========  ===============
stage      parameters   gradients   fp32 main   Adam state
=========  ===========  ==========  ==========  ===============
plain DP   2Ψ           2Ψ          4Ψ          8Ψ
ZeRO-1     2Ψ           2Ψ          4Ψ/Nd       8Ψ/Nd
ZeRO-2     2Ψ           2Ψ/Nd       4Ψ/Nd       8Ψ/Nd
=========  ===========  ==========  ==========  ===============

"Up to bucket padding": each category may differ from its formula by its bytes per element times
the buffer's padding elements, plus Adam's 4-byte ``step`` scalar per parameter (or shard piece).
ZeRO-2 holds the full gradient buffer only from ``zero_grad()`` until the step (working memory of
backward, like activations); that is checked too.
"""
import pytest
import torch
from ddp_common import build, train_step
from harness import run_distributed
from toy_model import ToyConfig

from megatron_core.optimizer import memory_footprint

# Odd sizes: Ψ = 21607 is not a multiple of Nd, so the buffer is padded.
CONFIG = ToyConfig(num_layers=2, hidden_size=33, ffn_hidden_size=128, vocab_size=127)


def _footprints(stages):
    out = {}
    for stage in stages:
        ps, chunks, wrapped, optimizer = build({}, CONFIG, {"zero_stage": stage, "bucket_size": None}, {},
                                               torch.bfloat16)
        buffer = wrapped[0].buffers_by_dtype[0]
        during: dict = {}

        def record_grads(during=during, wrapped=wrapped, optimizer=optimizer):
            during.update(grads=memory_footprint(wrapped, optimizer).grads)

        train_step(ps, CONFIG, wrapped, optimizer, 0, 1, before_step=record_grads)
        after = memory_footprint(wrapped, optimizer)
        released = (buffer.grad_data is None
                    and all(b.grad_data.untyped_storage().nbytes() == 0 for b in buffer.buckets))
        optimizer.zero_grad()
        psi = sum(p.numel() for p in chunks[0].parameters())
        after_zero_grad = memory_footprint(wrapped).grads
        out[stage] = {"after": after, "during_grads": during["grads"], "after_zero_grad": after_zero_grad,
                      "psi": psi, "pad": buffer.numel - psi, "pieces": len(optimizer.pairs), "dp": ps.dp_size,
                      "full_grads_released": released}
        ps.destroy()
    return out


def _formulas(stage: int, psi: int, nd: int) -> dict:
    return {0: dict(params=2 * psi, grads=2 * psi, main_params=4 * psi, optimizer_state=8 * psi),
            1: dict(params=2 * psi, grads=2 * psi, main_params=4 * psi / nd, optimizer_state=8 * psi / nd),
            2: dict(params=2 * psi, grads=2 * psi / nd, main_params=4 * psi / nd, optimizer_state=8 * psi / nd)}[stage]


@pytest.mark.parametrize("nd", [2, 4])
def test_bytes_per_rank_match_zero_formulas(nd):
    results = run_distributed(_footprints, nd, [0, 1, 2], timeout=90)
    for stage in (0, 1, 2):
        state_total = 0
        for rank, by_stage in enumerate(results):
            r = by_stage[stage]
            psi, pad, pieces = r["psi"], r["pad"], r["pieces"]
            assert r["dp"] == nd and pad < nd
            measured = r["after"]
            slack = {"params": 2 * pad, "grads": 2 * pad, "main_params": 4 * pad,
                     "optimizer_state": 8 * pad + 4 * pieces}
            for field, expected in _formulas(stage, psi, nd).items():
                got = getattr(measured, field)
                assert abs(got - expected) <= slack[field], \
                    f"ZeRO-{stage} Nd={nd} rank {rank} {field}: {got} bytes, formula {expected:.0f} (+-{slack[field]})"
            total = {0: 16 * psi, 1: 4 * psi + 12 * psi / nd, 2: 2 * psi + 14 * psi / nd}[stage]
            assert abs(measured.total - total) <= sum(slack.values())
            state_total += measured.optimizer_state - 4 * pieces
            # Stage 2: each bucket's full gradient is freed once reduced: after backward (and after
            # zero_grad, which allocates nothing) only the shard is held.
            full, shard = 2 * (psi + pad), 2 * (psi + pad) // nd
            if stage == 2:
                assert r["full_grads_released"] and r["during_grads"] == shard
                assert r["after_zero_grad"] == shard
            else:
                assert not r["full_grads_released"] and r["during_grads"] == full
        # The Adam moments of all DP ranks together are exactly the model's, once.
        expected_total = 8 * psi * (nd if stage == 0 else 1)
        assert state_total == expected_total, \
            f"ZeRO-{stage}: Adam moments over all ranks {state_total} != {expected_total}"


def _fp32_footprints():
    out = {}
    for stage in (1, 2, 3):
        ps, chunks, wrapped, optimizer = build({}, CONFIG, {"zero_stage": stage, "bucket_size": 3000}, {})
        train_step(ps, CONFIG, wrapped, optimizer, 0, 1)
        out[stage] = (memory_footprint(wrapped, optimizer), wrapped[0].buffers_by_dtype[0].numel,
                      len(optimizer.pairs))
        ps.destroy()
    return out


def test_fp32_shards_are_their_own_main_copy():
    """fp32 parameters: the distributed optimizer updates this rank's shard of them in place, as Megatron-LM's
    (``shard_fp32_groups`` are views of the model's parameters); a second fp32 copy of the shard was 4 bytes
    per parameter / Nd more (K = 12 instead of 8 for Adam), for the same values."""
    for by_stage in run_distributed(_fp32_footprints, 2, timeout=90):
        for stage, (measured, padded, pieces) in by_stage.items():
            assert measured.main_params == 0, f"ZeRO-{stage}: {measured.main_params} bytes of fp32 main copies"
            assert measured.params == 4 * padded // (2 if stage == 3 else 1)
            assert abs(measured.optimizer_state - 8 * padded / 2) <= 4 * pieces


# ---- ZeRO-3: (2+2+K)Ψ/Nd between steps, plus the live gathered window during forward/backward ----
Z3_BUCKET, Z3_PREFETCH = 3000, 3000
Z3_CONFIG = ToyConfig(num_layers=4, hidden_size=33, ffn_hidden_size=128, vocab_size=127)


def _zero3_footprint():
    ps, chunks, wrapped, optimizer = build({}, Z3_CONFIG, {"zero_stage": 3, "bucket_size": Z3_BUCKET,
                                                        "stage3_prefetch_bucket_size": Z3_PREFETCH}, {}, torch.bfloat16)
    buffer = wrapped[0].buffers_by_dtype[0]
    peak = {"window": 0}

    def watch(*_):
        peak["window"] = max(peak["window"], memory_footprint(wrapped).gathered_params)

    for m in chunks[0].modules():
        m.register_forward_hook(watch)
        m.register_full_backward_hook(watch)
    train_step(ps, Z3_CONFIG, wrapped, optimizer, 0, 2)
    after = memory_footprint(wrapped, optimizer)
    psi = sum(p.numel() for p in chunks[0].parameters())
    result = {"after": after, "psi": psi, "padded": buffer.numel, "pieces": len(optimizer.pairs), "dp": ps.dp_size,
              "peak_window": peak["window"], "largest_bucket": max(b.end - b.start for b in buffer.buckets),
              "buckets": len(buffer.buckets)}
    ps.destroy()
    return result


@pytest.mark.parametrize("nd", [2, 4])
def test_zero3_bytes_per_rank_match_formula_plus_window(nd):
    for rank, r in enumerate(run_distributed(_zero3_footprint, nd, timeout=90)):
        psi, padded, measured = r["psi"], r["padded"], r["after"]
        pad = padded - psi
        assert r["buckets"] >= 4, "the test needs several buckets"
        # Between steps nothing is gathered: shards only, (2+2+12)Ψ/Nd up to padding (+ Adam's step scalars).
        assert measured.gathered_params == 0
        expected = {"params": 2 * padded / nd, "grads": 2 * padded / nd, "main_params": 4 * padded / nd,
                    "optimizer_state": 8 * padded / nd}
        for field, value in expected.items():
            slack = 4 * r["pieces"] if field == "optimizer_state" else 0
            assert abs(getattr(measured, field) - value) <= slack, \
                f"ZeRO-3 Nd={nd} rank {rank} {field}: {getattr(measured, field)} bytes, formula {value:.0f}"
        assert abs(measured.total - 16 * psi / nd) <= 16 * pad / nd + 4 * r["pieces"]
        # During the step the window holds the buckets of the module running (at most 2), the tied
        # word embedding's bucket (gathered from the output layer's backward until the embedding's
        # own gradient at the end) and the prefetch (its budget, rounded up to a whole bucket).
        bound = 2 * (4 * r["largest_bucket"] + Z3_PREFETCH)
        assert 0 < r["peak_window"] <= bound and r["peak_window"] < 2 * padded, \
            f"rank {rank}: peak gathered window {r['peak_window']} bytes (bound {bound}, full {2 * padded})"


# ---- construction: one bucket at a time, not two more copies of the model ----
_LAYER = 2048  # four Linear(2048, 2048) layers of 16 MiB each (fp32), one bucket per layer
_OVERHEAD_MIB = 12  # slack for allocator and gloo noise: under 1 MiB measured after the warm-up below


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> float:
    """Reset VmHWM to the current resident size (/proc/self/clear_refs 5) and return that size in MiB."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _rss_mib("VmRSS")


def _construction_peak(zero_stage: int) -> dict:
    """Resident-memory growth while DDP wraps the model, and (ZeRO-3) while ``state_dict()`` copies it."""
    import ctypes
    import ctypes.util

    from megatron_core import parallel_state
    from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    # Fixed settings (M_MMAP_THRESHOLD -3, M_MMAP_MAX -4, malloc.h): every block of 1 MiB or more is its own
    # mapping, returned at free, so resident memory follows the live tensors (glibc's dynamic threshold, or
    # the training allocator a test before may have set in this process, keeps freed blocks resident).
    assert libc.mallopt(-3, 1 << 20) == 1 and libc.mallopt(-4, 1 << 16) == 1
    ps = parallel_state.ParallelState(1, 1, None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(_LAYER, _LAYER, bias=False) for _ in range(4)])
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    first_rows = {f"{i}.weight": layer.weight[:2].clone() for i, layer in enumerate(model)}
    config = DistributedDataParallelConfig(zero_stage=zero_stage, bucket_size=_LAYER * _LAYER)
    # Once on a tiny model first: what the first wrap imports (and compiles to .pyc in a fresh venv: 7 MiB more
    # growth measured in CI) and gloo's first buffers are not the wrapper's memory.
    DistributedDataParallel(config, torch.nn.Linear(8, 8, bias=False), ps).state_dict()
    before = _reset_peak()
    wrapped = DistributedDataParallel(config, model, ps)
    result = {"peak": _rss_mib("VmHWM") - before, "after": _rss_mib("VmRSS") - before, "model": model_mib,
              "dp": ps.dp_size, "buckets": len(wrapped.buffers_by_dtype[0].buckets)}
    before = _reset_peak()
    state = wrapped.state_dict()
    result["state_dict_peak"] = _rss_mib("VmHWM") - before
    # Rank 0's values everywhere (the wrapper broadcast them), whole, in copies that outlive the gather.
    result["state_dict_equal"] = sorted(state) == sorted(first_rows) and all(
        state[k].shape == (_LAYER, _LAYER) and torch.equal(state[k][:2], first_rows[k]) for k in state)
    ps.destroy()
    return result


def _load_peak() -> dict:
    """ZeRO-3: resident-memory growth while ``load_state_dict`` loads a full state dict allocated before."""
    import ctypes
    import ctypes.util

    from megatron_core import parallel_state
    from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.mallopt(-3, 1 << 20) == 1 and libc.mallopt(-4, 1 << 16) == 1  # as in _construction_peak
    ps = parallel_state.ParallelState(1, 1, None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(_LAYER, _LAYER, bias=False) for _ in range(4)])
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    config = DistributedDataParallelConfig(zero_stage=3, bucket_size=_LAYER * _LAYER)
    tiny = DistributedDataParallel(config, torch.nn.Linear(8, 8, bias=False), ps)  # first-wrap and first-load costs
    tiny.load_state_dict(tiny.state_dict())
    wrapped = DistributedDataParallel(config, model, ps)
    generator = torch.Generator().manual_seed(1)  # the same incoming values on every rank, not the model's
    incoming = {f"{i}.weight": torch.randn(_LAYER, _LAYER, generator=generator) for i in range(4)}
    before = _reset_peak()
    wrapped.load_state_dict(incoming)
    result = {"peak": _rss_mib("VmHWM") - before, "model": model_mib, "dp": ps.dp_size,
              "buckets": len(wrapped.buffers_by_dtype[0].buckets)}
    with wrapped.gathered_params():  # every rank's loaded shards, all-gathered
        result["equal"] = all(torch.equal(model.get_parameter(k), v) for k, v in incoming.items())
    ps.destroy()
    return result


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux's VmHWM reset")
def test_zero3_load_state_dict_copies_into_the_shards():
    """``load_state_dict`` of a ZeRO-3 model (the legacy ``--ckpt-format torch`` resume, the engine's load)
    gathered every bucket while the incoming state dict was also held: a second copy of the model per rank
    (64 MiB growth for this 64 MiB model at DP 2, the state dict allocated before). Each rank now copies its
    shard straight from the incoming tensors: nothing beyond the state dict, not even a bucket."""
    for r in in_a_fresh_process("test_memory", "_load_peak", 2):
        assert r["buckets"] == 4 and r["dp"] == 2 and r["equal"], r
        assert r["peak"] <= _OVERHEAD_MIB, r


def in_a_fresh_process(module: str, function: str, world_size: int, *args) -> list:
    """``run_distributed(module.function, world_size, *args)`` from a new interpreter (JSON results).

    For resident-memory measurements: ranks forked from pytest inherit its heap, whose free blocks (resident
    already) serve large allocations whatever the mmap threshold, so resident memory then depends on the tests
    that ran before (measured: 16 MiB more kept after one of them)."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from harness import run_distributed; "
              "import importlib; fn = getattr(importlib.import_module(sys.argv[2]), sys.argv[3]); "
              "print(json.dumps(run_distributed(fn, int(sys.argv[4]), *json.loads(sys.argv[5]), timeout=180)))")
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), module, function,
                           str(world_size), json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux's VmHWM reset")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_wraps_the_model_one_bucket_at_a_time(zero_stage):
    """Wrapping allocated every bucket's full storage before keeping the shards: under ZeRO-3 two more copies
    of the model at once (parameters and zeroed gradients: 200 MiB growth for this 64 MiB model at DP 2), so a
    model that fits only sharded failed before its first step; under ZeRO-2 one more (the zeroed gradients).
    Now a bucket's full parameters live only while it is filled and its gradient storage is not touched
    before its first gradient: the growth is what is kept (ZeRO-3: the parameter and gradient shards, 2/DP
    of the model; ZeRO-2: the parameter buffer and the gradient shard) plus one bucket under ZeRO-3."""
    for r in in_a_fresh_process("test_memory", "_construction_peak", 2, zero_stage):
        bucket, model, dp = r["model"] / r["buckets"], r["model"], r["dp"]
        assert r["buckets"] == 4
        kept = (model / dp if zero_stage == 3 else model) + model / dp
        assert r["peak"] <= kept + (bucket if zero_stage == 3 else 0) + _OVERHEAD_MIB, r
        # The model's own parameters were freed as they moved into the buffer or the shards.
        assert r["after"] <= kept - model + _OVERHEAD_MIB, r
        if zero_stage == 3:  # a full copy of the model, gathered one bucket at a time (it was all buckets first)
            assert r["state_dict_equal"] and r["state_dict_peak"] <= model + bucket + _OVERHEAD_MIB, r


def _persistence(thresholds: list[int]) -> list[list[tuple[int, bool, bool]]]:
    """Per threshold, each ZeRO-3 bucket's (elements, persistent, full storage kept after wrapping)."""
    from megatron_core import parallel_state
    from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    out = []
    for threshold in thresholds:
        ps = parallel_state.ParallelState(1, 1, None)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4, bias=False))
        config = DistributedDataParallelConfig(zero_stage=3, bucket_size=1,
                                               stage3_param_persistence_threshold=threshold)
        wrapped = DistributedDataParallel(config, model, ps)
        out.append(sorted((b.end - b.start, b.persistent, b.param_data.untyped_storage().size() > 0)
                          for b in wrapped.buffers_by_dtype[0].buckets))
        ps.destroy()
    return out


def test_zero3_keeps_buckets_up_to_the_persistence_threshold_whole():
    """``stage3_param_persistence_threshold`` is inclusive, as DeepSpeed's (``mark_persistent_parameters``:
    ``param.ds_numel <= param_threshold``): a bucket of exactly that many elements stays gathered, one
    element more is freed after wrapping."""
    [[none]] = run_distributed(_persistence, 1, [0])
    small, large = none[0][0], none[1][0]
    assert small < large and none == [(small, False, False), (large, False, False)]
    [[_, at, below]] = run_distributed(_persistence, 1, [0, large, large - 1])
    assert at == [(small, True, True), (large, True, True)]
    assert below == [(small, True, True), (large, False, False)]


def _zero3_state_dict_with_a_frozen_layer() -> tuple[dict, dict]:
    from megatron_core import parallel_state
    from megatron_core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    ps = parallel_state.ParallelState(1, 1, None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 4, bias=False))
    model[1].weight.requires_grad_(False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = DistributedDataParallel(DistributedDataParallelConfig(zero_stage=3, bucket_size=1), model, ps)
    state = wrapped.state_dict()
    ps.destroy()
    return expected, state


def test_zero3_state_dict_holds_frozen_parameters_beside_the_gathered_ones():
    """A frozen parameter is in no ZeRO-3 bucket (it stays whole on every rank): ``state_dict()`` copies the
    gathered buckets' parameters and leaves it as the module has it."""
    [(expected, state)] = run_distributed(_zero3_state_dict_with_a_frozen_layer, 1)
    assert sorted(state) == sorted(expected) == ["0.weight", "1.weight"]
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
