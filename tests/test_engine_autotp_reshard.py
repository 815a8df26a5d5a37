"""An engine checkpoint loads at another AutoTP size (DeepSpeed's universal checkpoint, done on load).

A run trains ``N`` steps with Adam at one AutoTP size, saves, and goes on ``M`` steps (the run "without the
save/load": saving does not touch it). The checkpoint is loaded into engines built from other weights at
AutoTP 2 -> 1 (world 1, and world 2 = DP 2 under ZeRO-1), 2 -> 2, 1 -> 2 and 2 -> 4, which continue the
same ``M`` steps of the same global batches. Their losses and final parameters (consolidated over TP and
DP) must equal the uninterrupted run's (fp32, relative 1e-5): the fp32 main weights, Adam's ``exp_avg``,
``exp_avg_sq`` and ``step``, the WarmupLR schedule (still warming up at the save) and the counters all
carried over. Without them the losses differ at the first resumed step: Adam's first step after a
lost state moves every weight by about lr.

The Adam caveat (``engine_common``): GPT-2's attention key bias gets a gradient that is zero up to
rounding, and Adam's 1/sqrt(v) + eps turns the reduction-order noise of another TP layout into
lr-sized steps; the GPT-2 runs use eps 1e-3, which bounds that amplification (Llama has no biases and
keeps eps 1e-8).
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

N, M = 2, 2
GLOBAL_MICRO = 2  # micro batches per global batch: DP x gradient accumulation, the same in every layout
EPS = {"gpt2": 1e-3, "llama": 1e-4}


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
    adam = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": EPS[kind], "weight_decay": 0.1}}
    scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 0.01}}
    return ds_config(dp, GLOBAL_MICRO // dp, stage, kind, optimizer=adam, scheduler=scheduler,
                     tensor_parallel={"autotp_size": tp})


def _straight(directory, kind, tp):
    """N steps, save (tag 'mid'), M more steps, save the end (tag 'end'); the M steps' losses, the lr at the save."""
    engine, _, _, _ = megatron_core.initialize(_model(kind), config=_config(kind, tp, tp, 0))
    run_steps(kind, engine, 0, N)
    engine.save_checkpoint(directory, tag="mid", client_state={"epoch": 3})
    lr = engine.get_lr()[0]
    losses, _ = run_steps(kind, engine, N, N + M)
    engine.save_checkpoint(directory, tag="end")
    engine.parallel_state.destroy()
    return losses, lr


def _resumed(source, directory, kind, tp, stage):
    """Load ``source``/mid into an engine of other weights at AutoTP ``tp``, run the M steps, save 'end'."""
    import torch.distributed as dist

    config = _config(kind, dist.get_world_size(), tp, stage)
    engine, _, _, _ = megatron_core.initialize(_model(kind, 0.5), config=config)
    _, client = engine.load_checkpoint(source, tag="mid")
    info = (client, engine.global_steps, engine.get_lr()[0])
    losses, _ = run_steps(kind, engine, N, N + M)
    engine.save_checkpoint(directory, tag="end")
    dp_rank = engine.parallel_state.dp_rank
    engine.parallel_state.destroy()
    return losses, dp_rank, info


def _check(kind, straight, results, ref_dir, out_dir, what):
    """Every rank's micro-batch losses, lr, client state, counters and the consolidated final weights
    equal the straight run's."""
    expected, expected_lr = straight
    for rank, (losses, dp_rank, (client, steps, lr)) in enumerate(results):
        dp = GLOBAL_MICRO // len(losses[0])
        assert client == {"epoch": 3} and steps == N, f"{what} rank {rank}: {client}, global_steps {steps}"
        assert lr == expected_lr, f"{what} rank {rank}: lr {lr} after loading, {expected_lr} at the save"
        mine = [[step[k * dp + dp_rank] for k in range(len(losses[0]))] for step in expected]
        assert_rel_close(torch.tensor(losses), torch.tensor(mine), 1e-5, f"{kind} {what} rank {rank} losses")
    want, _ = consolidate_state_dict(ref_dir, tag="end")
    got, _ = consolidate_state_dict(out_dir, tag="end")
    assert set(got) == set(want)
    for name, value in want.items():
        assert_rel_close(got[name], value, 1e-5, f"{kind} {what} {name}")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_load_at_another_autotp_size_equals_the_uninterrupted_run(tmp_path, kind):
    tp2, tp1 = str(tmp_path / "tp2"), str(tmp_path / "tp1")
    straight2 = run_distributed(_straight, 2, tp2, kind, 2, timeout=120)[0]
    (straight1,) = run_distributed(_straight, 1, tp1, kind, 1, timeout=120)
    cases = [  # (source, world, AutoTP size, ZeRO stage)
        (tp2, 1, 1, 0), (tp2, 2, 1, 1), (tp2, 2, 2, 0), (tp1, 2, 2, 0), (tp2, 4, 4, 0),
    ]
    for source, world, tp, stage in cases:
        out = str(tmp_path / f"from_{os.path.basename(source)}_world{world}_tp{tp}")
        results = run_distributed(_resumed, world, source, out, kind, tp, stage, timeout=180)
        expected = straight2 if source == tp2 else straight1
        _check(kind, expected, results, source, out, f"{os.path.basename(source)} -> world {world} AutoTP {tp}")
