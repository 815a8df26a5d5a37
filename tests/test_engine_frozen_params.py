"""Engine checkpoints of a model with frozen parameters (``requires_grad=False``), as when fine-tuning
part of a model: the optimizer holds no state for them, so their values come from the model files.

Tiny GPT-2 with the position embedding (not split by AutoTP) and the first block's fused QKV weight
(split with stride 3) frozen, trained at AutoTP 2 with Adam, saved mid-run and loaded into an engine of
other weights at the saving layout, at AutoTP 1 and at AutoTP 1 x DP 2 under ZeRO-2. The resumed losses and
the consolidated final weights (``consolidate_state_dict``, what ``tools/zero_to_fp32.py`` writes) equal
the uninterrupted run's (bit for bit at the saving layout, else fp32 relative 1e-5 as in
``test_engine_autotp_reshard``), and the frozen weights come out unchanged. Before the fix every load
(any AutoTP size, any ZeRO stage) and every consolidation failed on "parameter 'transformer.wpe.weight' is
not fully covered by the optimizer files".
"""

import os

import torch
from engine_common import run_steps
from harness import run_distributed
from test_engine_autotp_reshard import M, N, _check, _config, _dp_losses, _model

import megatron_core
from megatron_core.engine.consolidate import consolidate_state_dict
from megatron_core.errors import ConfigError

FROZEN = ("transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight")


def _frozen_model(offset=0.0):
    model = _model("gpt2", offset)
    for name, param in model.named_parameters():
        if name in FROZEN:
            param.requires_grad_(False)
    return model


def _straight(directory):
    import torch.distributed as dist

    engine, _, _, _ = megatron_core.initialize(_frozen_model(), config=_config("gpt2", dist.get_world_size(), 2, 0))
    run_steps("gpt2", engine, 0, N)
    engine.save_checkpoint(directory, tag="mid", client_state={"epoch": 3})
    lr = engine.get_lr()[0]
    losses, _ = run_steps("gpt2", engine, N, N + M)
    engine.save_checkpoint(directory, tag="end")
    dp_rank = engine.parallel_state.dp_rank
    engine.parallel_state.destroy()
    return losses, lr, dp_rank


def _resumed(source, directory, tp, stage):
    import torch.distributed as dist

    config = _config("gpt2", dist.get_world_size(), tp, stage)
    engine, _, _, _ = megatron_core.initialize(_frozen_model(0.5), config=config)
    loaded, client = engine.load_checkpoint(source, tag="mid")
    info = (client, engine.global_steps, engine.get_lr()[0], os.path.relpath(loaded, source),
            engine.parallel_state.tp_rank)
    losses, _ = run_steps("gpt2", engine, N, N + M)
    engine.save_checkpoint(directory, tag="end")
    dp_rank = engine.parallel_state.dp_rank
    engine.parallel_state.destroy()
    return losses, dp_rank, info


def test_frozen_parameters_load_at_any_autotp_size_and_consolidate(tmp_path):
    source = str(tmp_path / "tp2")
    straight = _dp_losses(run_distributed(_straight, 2, source, timeout=120))
    initial = dict(_frozen_model().named_parameters())
    end, _ = consolidate_state_dict(source, tag="end")
    for name in FROZEN:
        assert torch.equal(end[name], initial[name].detach()), f"frozen {name} changed"
    for world, tp, stage in ((2, 2, 0), (1, 1, 0), (2, 1, 2)):
        out = str(tmp_path / f"world{world}_tp{tp}_zero{stage}")
        results = run_distributed(_resumed, world, source, out, tp, stage, timeout=120)
        _check("gpt2", straight, results, source, out, f"frozen: AutoTP 2 -> world {world} AutoTP {tp} ZeRO-{stage}",
               exact=(world, tp) == (2, 2), tp_sizes=(2, tp))


def _unfrozen_load(source, tp, load_optimizer_states):
    """An engine training every parameter loads the checkpoint saved with FROZEN frozen."""
    import torch.distributed as dist

    config = _config("gpt2", dist.get_world_size(), tp, 0)
    engine, _, _, _ = megatron_core.initialize(_model("gpt2", 0.5), config=config)
    try:
        engine.load_checkpoint(source, tag="mid", load_optimizer_states=load_optimizer_states)
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()} if tp == 1 else None


def test_unfreezing_after_the_save_is_one_line_or_loads_weights_only(tmp_path):
    """Fine-tuning in stages: parameters frozen when saved and trained now have no optimizer state to load:
    one line naming the parameter and ``load_optimizer_states=False`` (a KeyError before, at the saving
    AutoTP size and at another), which then loads the weights."""
    source = str(tmp_path / "tp2")
    run_distributed(_straight, 2, source, timeout=120)
    for world, tp in ((2, 2), (1, 1)):
        for message in run_distributed(_unfrozen_load, world, source, tp, True, timeout=120):
            assert isinstance(message, str) and "\n" not in message, message
            assert "has no optimizer state for 'transformer.wpe.weight'" in message, message
            assert message.endswith("load its weights only with load_optimizer_states=False"), message
    (module,) = run_distributed(_unfrozen_load, 1, source, 1, False, timeout=120)
    want, _ = consolidate_state_dict(source, tag="mid")
    for name in FROZEN:
        assert torch.equal(module[name], want[name]), name
