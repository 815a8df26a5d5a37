"""An engine checkpoint loads at another AutoTP size (DeepSpeed's universal checkpoint, done on load).

A run trains ``N`` steps with Adam at one AutoTP size, saves, and goes on ``M`` steps (the run "without
the save/load": saving does not touch it). The checkpoint is loaded into engines built from other weights
at AutoTP 2 -> 1 (world 1, and world 2 = DP 2 under ZeRO-1 and ZeRO-3), 2 -> 2, 1 -> 2, 2 -> 4 and AutoTP
2 x DP 2 ZeRO-2 -> 1, which continue the same ``M`` steps of the same global batches. Their losses and
final parameters (consolidated over TP and DP) must equal the uninterrupted run's (fp32, relative 1e-5;
bit for bit when the layout is the saving run's): the fp32 main weights, Adam's ``exp_avg``,
``exp_avg_sq`` and ``step``, the WarmupLR schedule (still warming up at the save), the counters and the
client state all carried over. A lost Adam state would move every weight by about lr at the first resumed
step.

The Adam caveat (``engine_common``): Adam's 1/sqrt(v) + eps turns the reduction-order noise of another TP
layout into lr-sized steps where a gradient is near zero. With eps 1e-8 (measured) GPT-2's attention key
bias, whose gradient is zero up to rounding (softmax ignores it), missed by 3e-3 after AutoTP 2 -> 1, and
an element of Llama's embedding by 1.1e-5; both runs use AdamW with eps 1e-4.
"""

import os

import pytest
import torch
from engine_common import VOCAB, ds_config, run_steps
from equivalence import assert_rel_close
from harness import run_distributed
from hf_testing import tiny_hf_gpt2, tiny_hf_llama

import megatron_core
from megatron_core.engine.consolidate import consolidate_state_dict
from megatron_core.errors import ConfigError

N, M = 2, 2
GLOBAL_MICRO = 2  # micro batches per global batch: DP x gradient accumulation, the same in every layout
EPS = 1e-4  # the Adam caveat (module docstring)


def _model(kind, offset=0.0):
    """Heads and key/value heads 4: AutoTP 1, 2 and 4 all divide them. ``offset`` gives other weights."""
    if kind == "gpt2":
        model = tiny_hf_gpt2(vocab_size=VOCAB, hidden=32, layers=1, heads=4, positions=16)
    else:
        model = tiny_hf_llama(vocab_size=VOCAB, hidden=32, layers=1, heads=4, kv_heads=4, ffn=48, positions=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(offset)
    return model


def _config(kind, world, tp, stage):
    dp = world // tp
    adam = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": EPS, "weight_decay": 0.1}}
    scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 0.01}}
    return ds_config(dp, GLOBAL_MICRO // dp, stage, kind, optimizer=adam, scheduler=scheduler,
                     tensor_parallel={"autotp_size": tp})


def _straight(directory, kind, tp, stage=0):
    """N steps, save (tag 'mid'), M more steps, save the end (tag 'end'); the M steps' losses, the lr at the save."""
    import torch.distributed as dist

    engine, _, _, _ = megatron_core.initialize(_model(kind), config=_config(kind, dist.get_world_size(), tp, stage))
    run_steps(kind, engine, 0, N)
    engine.save_checkpoint(directory, tag="mid", client_state={"epoch": 3})
    lr = engine.get_lr()[0]
    losses, _ = run_steps(kind, engine, N, N + M)
    engine.save_checkpoint(directory, tag="end")
    dp_rank = engine.parallel_state.dp_rank
    engine.parallel_state.destroy()
    return losses, lr, dp_rank


def _resumed(source, directory, kind, tp, stage):
    """Load ``source``/mid into an engine of other weights at AutoTP ``tp``, run the M steps, save 'end'."""
    import torch.distributed as dist

    config = _config(kind, dist.get_world_size(), tp, stage)
    engine, _, _, _ = megatron_core.initialize(_model(kind, 0.5), config=config)
    loaded, client = engine.load_checkpoint(source, tag="mid")
    info = (client, engine.global_steps, engine.get_lr()[0], os.path.relpath(loaded, source),
            engine.parallel_state.tp_rank)
    losses, _ = run_steps(kind, engine, N, N + M)
    engine.save_checkpoint(directory, tag="end")
    dp_rank = engine.parallel_state.dp_rank
    engine.parallel_state.destroy()
    return losses, dp_rank, info


def _dp_losses(results):
    """``(losses, lr)`` of a straight run: each step's micro-batch losses in micro-batch order (at DP d > 1
    with one micro batch per rank, micro batch j is DP rank j's)."""
    by_dp = {dp_rank: losses for losses, _, dp_rank in results}
    if len(by_dp) == 1:
        return by_dp[0], results[0][1]
    return [[by_dp[d][step][0] for d in sorted(by_dp)] for step in range(M)], results[0][1]


def _equal(actual, expected, _tol, what):
    assert torch.equal(actual, expected), f"{what}: differs from the uninterrupted run"


def _check(kind, straight, results, ref_dir, out_dir, what, exact, tp_sizes):
    """Every rank's micro-batch losses, lr, client state, counters and the consolidated final weights
    equal the straight run's (``exact``: bit for bit, the layout being the saving run's). ``tp_sizes``:
    (saved, loaded) AutoTP size, for the model-states file load_checkpoint names (DeepSpeed's SDLoader
    index: TP rank r of t loads file r * saved // t)."""
    close = _equal if exact else assert_rel_close
    expected, expected_lr = straight
    saved_tp, tp = tp_sizes
    for rank, (losses, dp_rank, (client, steps, lr, loaded, tp_rank)) in enumerate(results):
        assert loaded == os.path.join("mid", f"mp_rank_{tp_rank * saved_tp // tp:02d}_model_states.pt"), loaded
        dp = GLOBAL_MICRO // len(losses[0])
        assert client == {"epoch": 3} and steps == N, f"{what} rank {rank}: {client}, global_steps {steps}"
        assert lr == expected_lr, f"{what} rank {rank}: lr {lr} after loading, {expected_lr} at the save"
        mine = [[step[k * dp + dp_rank] for k in range(len(losses[0]))] for step in expected]
        close(torch.tensor(losses), torch.tensor(mine), 1e-5, f"{kind} {what} rank {rank} losses")
    want, _ = consolidate_state_dict(ref_dir, tag="end")
    got, _ = consolidate_state_dict(out_dir, tag="end")
    assert set(got) == set(want)
    for name, value in want.items():
        close(got[name], value, 1e-5, f"{kind} {what} {name}")


# (source, world, AutoTP size, ZeRO stage); GPT-2 (fused QKV with stride 3, Conv1D weights stored transposed
# under AutoTP, lm_head tied: under ZeRO-3 too) takes every layout, Llama (separate q/k/v projections,
# SwiGLU) one each way.
CASES = {
    "gpt2": [
        ("tp2", 1, 1, 0), ("tp2", 2, 1, 1), ("tp2", 2, 1, 3), ("tp2", 2, 2, 0), ("tp1", 2, 2, 0), ("tp2", 4, 4, 0),
    ],
    "llama": [("tp2", 1, 1, 0), ("tp1", 2, 2, 0), ("tp2dp2", 1, 1, 0)],
}
# The saving runs: (world, AutoTP size, ZeRO stage); at AutoTP 2 x DP 2 under ZeRO-2 each TP rank's optimizer
# state is split over two DP ranks' files.
SOURCES = {"tp2": (2, 2, 0), "tp1": (1, 1, 0), "tp2dp2": (4, 2, 2)}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_load_at_another_autotp_size_equals_the_uninterrupted_run(tmp_path, kind):
    straight = {}
    for source in sorted({case[0] for case in CASES[kind]}):
        world, tp, stage = SOURCES[source]
        results = run_distributed(_straight, world, str(tmp_path / source), kind, tp, stage, timeout=120)
        straight[source] = _dp_losses(results)
    for source, world, tp, stage in CASES[kind]:
        out, src = str(tmp_path / f"from_{source}_world{world}_tp{tp}"), str(tmp_path / source)
        results = run_distributed(_resumed, world, src, out, kind, tp, stage, timeout=180)
        what = f"{source} -> world {world} AutoTP {tp} ZeRO-{stage}"
        _check(kind, straight[source], results, src, out, what, exact=SOURCES[source] == (world, tp, stage),
               tp_sizes=(SOURCES[source][1], tp))


def _load_error(source, other):
    """The ConfigError line of loading ``source`` at AutoTP 1 into the same GPT-2 (``other`` None), a wider
    GPT-2 ("wider") or a Llama ("llama"), or None."""
    if other == "wider":
        model = tiny_hf_gpt2(vocab_size=VOCAB, hidden=64, layers=1, heads=4, positions=16)
    else:
        model = _model(other or "gpt2")
    engine, _, _, _ = megatron_core.initialize(model, config=_config(other or "gpt2", 1, 1, 0))
    try:
        engine.load_checkpoint(source, tag="mid")
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()
    return None


FP16 = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1}


def _save_fp16(directory):
    config = _config("gpt2", 2, 2, 0)
    engine, _, _, _ = megatron_core.initialize(_model("gpt2"), config={**config, "fp16": FP16})
    run_steps("gpt2", engine, 0, 2)
    engine.save_checkpoint(directory, tag="mid")
    scale = engine.optimizer.grad_scaler.scale
    engine.parallel_state.destroy()
    return scale


def _load_fp16(source, directory, module_only):
    config = {**_config("gpt2", 1, 1, 0), "fp16": FP16}
    engine, _, _, _ = megatron_core.initialize(_model("gpt2", 0.5), config=config)
    engine.load_checkpoint(source, tag="mid", load_module_only=module_only)
    scale = engine.optimizer.grad_scaler.scale
    module = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    engine.save_checkpoint(directory, tag="again")
    engine.parallel_state.destroy()
    return scale, module


def test_fp16_autotp_checkpoint_moves_exactly(tmp_path):
    """fp16 at AutoTP 2 loaded at AutoTP 1: the dynamic loss scale (grown by clean steps, window 1) comes
    back, the fp32 main weights move bit for bit (saved again and consolidated: equal to the source) and
    the fp16 module holds them rounded; with ``load_module_only`` the module comes from the fp16 model
    files, the same values."""
    source = str(tmp_path / "tp2")
    saved_scale = run_distributed(_save_fp16, 2, source, timeout=120)[0]
    assert saved_scale > 2.0**8
    want, _ = consolidate_state_dict(source, tag="mid")
    for module_only in (False, True):
        out = str(tmp_path / f"tp1_{module_only}")
        ((scale, module),) = run_distributed(_load_fp16, 1, source, out, module_only, timeout=120)
        assert scale == (2.0**8 if module_only else saved_scale), (module_only, scale)
        for name, value in want.items():
            assert module[name].dtype == torch.float16 and torch.equal(module[name], value.half()), name
        if not module_only:
            got, _ = consolidate_state_dict(out, tag="again")
            for name, value in want.items():
                assert torch.equal(got[name], value), f"fp32 main {name} changed on the way"


def test_what_cannot_be_resharded_is_one_line(tmp_path):
    """Resharding checks the merged shapes against this model's (a wider GPT-2: one line naming the key,
    not a torch error), passes the keys of another model (a Llama) through to the strict load's one line,
    and reads every saved TP rank's files (a missing one is named)."""
    run_distributed(_straight, 2, str(tmp_path), "gpt2", 2, timeout=120)
    (message,) = run_distributed(_load_error, 1, str(tmp_path), "wider", timeout=120)
    assert message == (
        "load_checkpoint: transformer.wte.weight is [64, 32] in the checkpoint (merged over its AutoTP ranks), "
        "[64, 64] in this model; load it into the model it was saved from"
    ), message
    (message,) = run_distributed(_load_error, 1, str(tmp_path), "llama", timeout=120)
    assert message.startswith(f"load_checkpoint: {tmp_path / 'mid' / 'mp_rank_00_model_states.pt'} holds another "
                              f"model than this engine's (") \
        and "unexpected key(s), e.g. 'transformer.wte.weight'" in message and "\n" not in message, message
    optim = tmp_path / "mid" / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    optim.rename(tmp_path / "optim.pt")
    (message,) = run_distributed(_load_error, 1, str(tmp_path), None, timeout=120)
    assert message == (f"load_checkpoint: checkpoint {str(tmp_path / 'mid')!r} has no "
                       f"zero_pp_rank_0_mp_rank_01_optim_states.pt (the save wrote 1 optimizer fragment files for TP "
                       f"rank 1, 1 missing); is a rank's file missing?"), message
    (tmp_path / "mid" / "mp_rank_01_model_states.pt").unlink()
    (message,) = run_distributed(_load_error, 1, str(tmp_path), None, timeout=120)
    assert message == (f"load_checkpoint: {tmp_path / 'mid' / 'mp_rank_01_model_states.pt'} does not exist; is a "
                       f"TP rank's model file missing?"), message
