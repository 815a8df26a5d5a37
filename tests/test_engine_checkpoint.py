"""Engine checkpoints: resume equals the uninterrupted run, loading at another DP size, load errors.

- save after 2 of 4 steps, load into an engine built from other weights, train 2 more: losses and
  state dict equal the uninterrupted run bit for bit (same DP size, every ZeRO stage);
- a DP 2 / ZeRO-2 checkpoint loaded at DP 4 / ZeRO-1 continues like the plain PyTorch loop (fp32, rel 1e-5);
- DeepSpeed's save/load signatures, client state, fp16 loss scale, frozen parameters left out, and
  one-line errors on every rank for a wrong model, a failed write or a missing file.

Consolidation (``zero_to_fp32``, ``save_16bit_model``) is in ``test_engine_consolidate.py``.
"""

import os

import pytest
import torch
from engine_common import VOCAB, config_error, ds_config, make_model, reference, run_steps, sharded, state_of
from equivalence import assert_rel_close
from harness import run_distributed
from hf_testing import tiny_hf_gpt2

import megatron_core
from megatron_core.engine.consolidate import consolidate_state_dict
from megatron_core.errors import ConfigError


def _other_weights(kind):
    model = make_model(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    return model


def _resume(directory, kind, stage, ga):
    config = sharded(ds_config(
        2, ga, stage, kind, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_max_lr": 0.01}}
    ))
    engine, _, _, _ = megatron_core.initialize(make_model(kind), config=config)
    straight, _ = run_steps(kind, engine, 0, 4)
    straight_state = state_of(engine)
    engine.parallel_state.destroy()

    engine, _, _, _ = megatron_core.initialize(make_model(kind), config=config)
    run_steps(kind, engine, 0, 2)
    path = engine.save_checkpoint(directory, client_state={"epoch": 7})
    engine.parallel_state.destroy()

    engine, _, _, _ = megatron_core.initialize(_other_weights(kind), config=config)
    loaded, client = engine.load_checkpoint(directory)
    counters = (engine.global_steps, engine.micro_steps, engine.global_samples)
    resumed, _ = run_steps(kind, engine, 2, 4)
    resumed_state = state_of(engine)
    engine.parallel_state.destroy()
    return straight[2:], resumed, straight_state, resumed_state, (path, loaded, client, counters)


@pytest.mark.parametrize("stage,ga", [(0, 1), (1, 2), (2, 2), (3, 2)])
def test_resume_equals_uninterrupted_run(tmp_path, stage, ga):
    results = run_distributed(_resume, 2, str(tmp_path), "mlp", stage, ga, timeout=120)
    for rank, (straight, resumed, straight_state, resumed_state, info) in enumerate(results):
        saved, loaded, client, counters = info
        # DeepSpeed's returns: True, and the model-states file loaded (it was the tag folder, twice).
        assert saved is True and client == {"epoch": 7}
        assert loaded == os.path.join(str(tmp_path), "global_step2", "mp_rank_00_model_states.pt"), loaded
        assert counters == (2, 0, 2 * 2 * ga * 2)  # micro_steps is not loaded, as DeepSpeed
        assert straight == resumed, f"rank {rank}: losses after resuming differ"
        for name, value in straight_state.items():
            assert torch.equal(value, resumed_state[name]), f"rank {rank}: {name} differs after resuming"
    assert (tmp_path / "latest").read_text() == "global_step2"


def _nvme_engine(swap_dir, stage, model):
    config = sharded(ds_config(2, 2, stage))
    os.makedirs(swap_dir)
    config["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": swap_dir}
    engine, _, _, _ = megatron_core.initialize(model, config=config)
    return engine


def _nvme_resume(directory, swap_dir, stage):
    import torch.distributed as dist

    rank = dist.get_rank()
    engine = _nvme_engine(os.path.join(swap_dir, f"straight{rank}"), stage, make_model("mlp"))
    straight, _ = run_steps("mlp", engine, 0, 4)
    straight_state = state_of(engine)
    engine.parallel_state.destroy()
    engine = _nvme_engine(os.path.join(swap_dir, f"saving{rank}"), stage, make_model("mlp"))
    run_steps("mlp", engine, 0, 2)
    engine.save_checkpoint(directory)
    engine.parallel_state.destroy()
    engine = _nvme_engine(os.path.join(swap_dir, f"resumed{rank}"), stage, _other_weights("mlp"))
    engine.load_checkpoint(directory)
    resumed, _ = run_steps("mlp", engine, 2, 4)
    resumed_state = state_of(engine)
    engine.parallel_state.destroy()
    return straight[2:], resumed, straight_state, resumed_state


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_with_nvme_offload_equals_uninterrupted_run(tmp_path, stage):
    """With offload_optimizer.device nvme, save_checkpoint read the fp32 main weights and Adam state while the
    swapper had freed their storage between steps: the process died of SIGSEGV (found by trial14 under torchrun,
    every model, 1 and 2 ranks, ZeRO-2 and 3). The save and the load now swap them in first."""
    results = run_distributed(_nvme_resume, 2, str(tmp_path / "ckpt"), str(tmp_path / "swap"), stage, timeout=120)
    for rank, (straight, resumed, straight_state, resumed_state) in enumerate(results):
        assert straight == resumed, f"rank {rank}: losses after resuming differ"
        for name, value in straight_state.items():
            assert torch.equal(value, resumed_state[name]), f"rank {rank}: {name} differs after resuming"


def _save_at_dp2(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 2, 2))
    run_steps("mlp", engine, 0, 2)
    engine.save_checkpoint(directory, tag="mid")
    engine.parallel_state.destroy()


def _continue_at_dp4(directory):
    engine, _, _, _ = megatron_core.initialize(_other_weights("mlp"), config=ds_config(4, 1, 1))
    _, client = engine.load_checkpoint(directory, tag="mid")
    losses, _ = run_steps("mlp", engine, 2, 4)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return client, state


def test_load_at_another_dp_size(tmp_path):
    (ref,) = run_distributed(reference, 1, "mlp", 4, 4, timeout=120)
    run_distributed(_save_at_dp2, 2, str(tmp_path), timeout=120)
    for rank, (client, state) in enumerate(run_distributed(_continue_at_dp4, 4, str(tmp_path), timeout=90)):
        assert client == {}
        for name, value in ref["state"].items():
            assert_rel_close(state[name], value, 1e-5, f"rank {rank} {name}")


def _save_after_one_step_at_dp2(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, 2))
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory, tag="one")
    engine.parallel_state.destroy()


def _continue_at_dp1_ga2(directory):
    engine, _, _, _ = megatron_core.initialize(_other_weights("mlp"), config=ds_config(1, 2, 1))
    engine.load_checkpoint(directory, tag="one")
    micro_steps = engine.micro_steps
    run_steps("mlp", engine, 1, 3)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return micro_steps, state


def test_load_at_another_accumulation_keeps_the_boundaries(tmp_path):
    """A checkpoint of DP 2 x GA 1 resumed at DP 1 x GA 2 (the same train_batch_size): load_checkpoint restored
    the saving run's micro_steps (1), so the resumed run's accumulation boundary fell after its first micro batch
    and every step mixed two global batches. DeepSpeed 0.19.8 restores global_steps, global_samples and
    skipped_steps but not micro_steps, which counts this engine's own step() calls."""
    (ref,) = run_distributed(reference, 1, "mlp", 3, 2, timeout=120)
    run_distributed(_save_after_one_step_at_dp2, 2, str(tmp_path), timeout=120)
    micro_steps, state = run_distributed(_continue_at_dp1_ga2, 1, str(tmp_path), timeout=90)[0]
    assert micro_steps == 0
    for name, value in ref["state"].items():
        assert_rel_close(state[name], value, 1e-5, name)


def _load_from(directory):
    import contextlib
    import io

    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        result = engine.load_checkpoint(directory)
    engine.parallel_state.destroy()
    return result, err.getvalue()


def test_load_without_latest_returns_none_and_warns(tmp_path):
    """As DeepSpeed: ``(None, None)`` and a warning line, so a mistyped directory does not restart silently.
    It returned ``(None, {})``: a DeepSpeed script's ``if client_state is not None: step =
    client_state["step"]`` then raised KeyError instead of starting from scratch."""
    for directory, where in ((tmp_path / "typo", "does not exist"), (tmp_path, "has no 'latest' file")):
        result, err = run_distributed(_load_from, 1, str(directory), timeout=60)[0]
        assert result == (None, None)
        assert err.startswith(f"warning: load_checkpoint: {str(directory)!r} {where}; nothing was loaded"), err


def _save_one_step(kind, directory):
    engine, _, _, _ = megatron_core.initialize(make_model(kind), config=ds_config(1, 1, 1, kind),
                                               dist_init_required=False)
    run_steps(kind, engine, 0, 1)
    engine.save_checkpoint(directory)
    engine.parallel_state.destroy()


def _load_into(kind, directory, **sizes):
    import torch.distributed as dist
    model = make_model(kind) if not sizes else tiny_hf_gpt2(vocab_size=VOCAB, positions=16, **sizes)
    engine, _, _, _ = megatron_core.initialize(model, config=ds_config(dist.get_world_size(), 1, 1, kind),
                                               dist_init_required=False)
    try:
        return config_error(lambda: engine.load_checkpoint(directory))
    finally:
        engine.parallel_state.destroy()


def test_a_checkpoint_of_another_model_is_one_line(tmp_path):
    """A GPT-2 checkpoint loaded into a Llama engine, or into a wider GPT-2: torch's multi-line strict
    load_state_dict RuntimeError (hundreds of key names) became one ConfigError line with a first example."""
    run_distributed(_save_one_step, 1, "gpt2", str(tmp_path), timeout=120)
    path = tmp_path / "global_step1" / "mp_rank_00_model_states.pt"
    message = run_distributed(_load_into, 1, "llama", str(tmp_path), timeout=120)[0]
    assert message.startswith(f"load_checkpoint: {path} holds another model than this engine's (") \
        and "missing key(s), e.g. 'model.embed_tokens.weight'" in message \
        and "unexpected key(s), e.g. 'transformer.wte.weight'" in message \
        and message.endswith("); load it into the model it was saved from") and "\n" not in message, message
    message = run_distributed(_load_into, 1, "gpt2", str(tmp_path), hidden=64, layers=1, heads=4,
                              timeout=120)[0]
    assert "of another shape, e.g. transformer.wte.weight: [64, 32] saved, [64, 64] here" in message, message


def _save_with_a_full_disk_on_rank_1(directory):
    import resource
    import signal

    import torch.distributed as dist

    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, 2), dist_init_required=False)
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory)
    run_steps("mlp", engine, 1, 2)
    if dist.get_rank() == 1:  # a write past 1 KiB fails with EFBIG on this rank only, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        return config_error(lambda: engine.save_checkpoint(directory))
    finally:
        engine.parallel_state.destroy()


def test_a_write_failing_on_one_rank_is_one_line_on_every_rank(tmp_path):
    """Before, the failing rank raised torch's "unexpected pos 1280 vs 1174" and the other one a gloo error
    from the barrier; ``dist_init_required=False`` (DeepSpeed's) is accepted when the group exists."""
    directory = str(tmp_path / "ckpt")
    messages = run_distributed(_save_with_a_full_disk_on_rank_1, 2, directory, timeout=120)
    assert messages[0] == messages[1] and "\n" not in messages[0], messages
    assert messages[0].startswith(f"save_checkpoint: writing {os.path.join(directory, 'global_step2')!r} failed on "
                                  f"rank 1 (") and "'latest' still names the previous checkpoint" in messages[0]
    assert "File too large" in messages[0], messages  # the write's own error, not torch.save's "unexpected pos"
    assert sorted(os.listdir(directory)) == ["global_step1", "global_step2", "latest", "zero_to_fp32.py"]
    assert not [f for f in os.listdir(os.path.join(directory, "global_step2")) if ".tmp" in f]  # no partial file
    assert open(os.path.join(directory, "latest")).read() == "global_step1"
    consolidate_state_dict(directory)  # the previous checkpoint still reads


def _fp16_scale_round_trip(directory):
    config = ds_config(1, 1, 0, fp16={"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1})
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 2)
    saved = engine.optimizer.grad_scaler.scale
    engine.save_checkpoint(directory)
    engine.parallel_state.destroy()
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    fresh = engine.optimizer.grad_scaler.scale
    engine.load_checkpoint(directory)
    loaded = engine.optimizer.grad_scaler.scale
    engine.parallel_state.destroy()
    return fresh, saved, loaded


def test_fp16_dynamic_loss_scale_is_restored(tmp_path):
    """The loss scale grown by two clean steps (window 1) comes back with the checkpoint, not the initial 2^8.
    DeepSpeed's count: the first growth comes after window + 1 clean steps, so one doubling."""
    ((fresh, saved, loaded),) = run_distributed(_fp16_scale_round_trip, 1, str(tmp_path), timeout=60)
    assert fresh == 2.0**8 and saved == 2.0**9
    assert loaded == saved


def _cross_precision_load(directory):
    fp16 = ds_config(1, 1, 0, fp16={"enabled": True, "initial_scale_power": 8})
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=fp16)
    run_steps("mlp", engine, 0, 2)
    engine.save_checkpoint(directory)
    engine.parallel_state.destroy()
    weights, _ = consolidate_state_dict(directory)  # the fp32 main parameters, not their fp16 copies
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0))  # fp32: no scaler
    engine.load_checkpoint(directory)
    loaded = {k: v.detach().float() for k, v in engine.module.state_dict().items()}
    scaler = engine.optimizer.grad_scaler
    engine.parallel_state.destroy()
    return scaler, {k: torch.equal(weights[k], loaded[k]) for k in weights}


def test_an_fp16_checkpoint_loads_into_an_fp32_engine(tmp_path):
    """A run resumed without fp16 takes the checkpoint's fp32 main parameters as its weights and has no loss
    scaler to fill: the checkpoint's scaler state is left aside, not loaded into a scaler that does not exist."""
    ((scaler, same),) = run_distributed(_cross_precision_load, 1, str(tmp_path), timeout=60)
    assert scaler is None and same and all(same.values()), same


def _save_client_state(directory, client_state):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0))
    try:
        engine.save_checkpoint(directory, client_state=client_state)
        return "saved", engine.load_checkpoint(directory)[1]
    except ConfigError as exc:
        return "error", str(exc)
    finally:
        engine.parallel_state.destroy()


def test_client_state_must_be_readable_back(tmp_path):
    """DeepSpeed pickles any client_state; Megatron-DeepSpeed passes its argparse args there. Here every
    file is read with torch.load(weights_only=True): an object() was saved, and the checkpoint then failed
    to load with an UnpicklingError traceback; an argparse.Namespace too. Now a Namespace is read back, and
    anything else that cannot be is refused in one line at save time, before a file is written."""
    import argparse

    args = argparse.Namespace(lr=1e-3, name="run", layers=[1, 2])
    kind, client = run_distributed(_save_client_state, 1, str(tmp_path / "ns"), {"args": args, "step": 3},
                                   timeout=60)[0]
    assert kind == "saved" and client == {"args": args, "step": 3}, client
    state, _ = consolidate_state_dict(str(tmp_path / "ns"))  # the model file holds the Namespace too
    assert set(state) == set(make_model("mlp").state_dict())
    kind, message = run_distributed(_save_client_state, 1, str(tmp_path / "obj"), {"step": 3, "obj": object()},
                                    timeout=60)[0]
    assert (kind, message) == ("error", "save_checkpoint: client_state['obj'] (object) is not read back by "
                                        "torch.load(weights_only=True) (Unsupported global: GLOBAL object); "
                                        "keep tensors, numbers, strings, lists, dicts and argparse.Namespace in "
                                        "client_state"), message
    assert not (tmp_path / "obj").exists() or not os.listdir(tmp_path / "obj")


def _deepspeed_signatures(directory):
    """DeepSpeedExamples' ``save_checkpoint(dir, loss.item())`` (a float tag) and Hugging Face Trainer's
    ``load_checkpoint(dir, load_module_strict=..., load_optimizer_states=True, load_lr_scheduler_states=True)``."""
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 1))
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory, 1.25, {"step": 1}, True, exclude_frozen_parameters=False)
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.parallel_state.destroy()
    bigger = torch.nn.Sequential(*make_model("mlp"), torch.nn.Linear(4, 4))  # one more layer than saved
    engine, _, _, _ = megatron_core.initialize(bigger, config=ds_config(1, 1, 1))
    results: dict = {"strict": config_error(lambda: engine.load_checkpoint(
        directory, "1.25", load_module_strict=True, load_optimizer_states=False))}
    # DeepSpeed's third positional parameter is load_module_strict (here it was load_optimizer_states).
    results["loose"] = engine.load_checkpoint(directory, "1.25", False, False, False)
    results["same"] = all(torch.equal(engine.module.state_dict()[k], v) for k, v in weights.items())
    results["refused", True] = config_error(lambda: engine.load_checkpoint(directory, "1.25", custom_load_fn=print))
    engine.parallel_state.destroy()
    return results


def test_save_and_load_take_deepspeeds_parameters(tmp_path):
    """save_checkpoint(save_dir, tag, client_state, save_latest, exclude_frozen_parameters) with any tag
    DeepSpeed turns into str (a float tag was refused); load_checkpoint(load_dir, tag, load_module_strict,
    load_optimizer_states, load_lr_scheduler_states, load_module_only, custom_load_fn): the keyword
    load_module_strict was a TypeError, and a positional False landed on load_optimizer_states."""
    results = run_distributed(_deepspeed_signatures, 1, str(tmp_path), timeout=60)[0]
    assert os.path.isdir(tmp_path / "1.25") and (tmp_path / "latest").read_text() == "1.25"
    assert "holds another model than this engine's" in results["strict"], results
    assert results["loose"] == (os.path.join(str(tmp_path), "1.25", "mp_rank_00_model_states.pt"), {"step": 1})
    assert results["same"], results
    assert results["refused", True] == ("load_checkpoint: custom_load_fn is not implemented; load without it "
                                        "(weights, optimizer fragments and scheduler are restored as saved)")



def _loose_load_at_dp2(directory, stage):
    """Save the MLP at DP 2, then load it with load_module_strict=False into the MLP with one more layer."""
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, stage))
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory, "saved")
    engine.parallel_state.destroy()
    torch.manual_seed(7)
    bigger = torch.nn.Sequential(*make_model("mlp"), torch.nn.Linear(4, 4))
    engine, _, _, _ = megatron_core.initialize(bigger, config=sharded(ds_config(2, 1, stage)))
    # optimizer states too: the new layer has none
    refused = config_error(lambda: engine.load_checkpoint(directory, "saved", False))
    loaded = engine.load_checkpoint(directory, "saved", False, False)[0]
    run_steps("mlp", engine, 1, 2)  # the ranks are still in step
    engine.parallel_state.destroy()
    return refused, loaded


@pytest.mark.parametrize("stage", [1, 3])
def test_loose_load_of_a_layer_the_checkpoint_lacks_is_one_line_on_every_rank(tmp_path, stage):
    """load_module_strict=False (Hugging Face Trainer's for PEFT models) into a model with a parameter the
    checkpoint lacks, optimizer states asked: only the DP rank whose ZeRO shard held that parameter raised,
    and the other waited in the parameter all-gather until the group timeout (a hang), the message blaming
    a parameter frozen when saved. Now every rank raises one line naming it as not in the checkpoint;
    load_optimizer_states=False then loads."""
    directory = str(tmp_path)
    results = run_distributed(_loose_load_at_dp2, 2, directory, stage, timeout=90)
    for refused, loaded in results:
        assert refused == (f"load_checkpoint: {os.path.join(directory, 'saved')!r} has no optimizer state for "
                           f"'5.weight', a parameter the checkpoint does not hold; load it with "
                           f"load_optimizer_states=False (the optimizer starts afresh)"), refused
        assert loaded == os.path.join(directory, "saved", "mp_rank_00_model_states.pt")


def _load_without_tp_rank_1_model_file(directory):
    from test_engine_autotp_reshard import _config, _model

    engine, _, _, _ = megatron_core.initialize(_model("gpt2"), config=_config("gpt2", 2, 2, 0))
    run_steps("gpt2", engine, 0, 1)
    engine.save_checkpoint(directory, "saved")
    if engine.parallel_state.rank == 0:
        os.remove(os.path.join(directory, "saved", "mp_rank_01_model_states.pt"))
    engine.barrier()
    try:
        return config_error(lambda: engine.load_checkpoint(directory, "saved"))
    finally:
        engine.parallel_state.destroy()


def test_a_tp_ranks_missing_model_file_is_one_line_on_every_rank(tmp_path):
    """AutoTP 2: the TP rank whose model file is gone raised alone and TP rank 0 went on into the next
    collective, waiting for it until the group timeout. Every rank now raises the same line."""
    results = run_distributed(_load_without_tp_rank_1_model_file, 2, str(tmp_path), timeout=90)
    path = os.path.join(str(tmp_path), "saved", "mp_rank_01_model_states.pt")
    assert results == [f"load_checkpoint: {path} does not exist; is a TP rank's model file missing?"] * 2, results


def _module_only(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0))
    run_steps("mlp", engine, 0, 2)
    engine.save_checkpoint(directory, "saved")
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    engine.parallel_state.destroy()
    engine, _, _, _ = megatron_core.initialize(_other_weights("mlp"), config=ds_config(1, 1, 0))
    engine.load_checkpoint(directory, "saved", load_module_only=True)
    module_only = (engine.global_steps, engine.global_samples, engine.micro_steps)
    same = all(torch.equal(engine.module.state_dict()[k], v) for k, v in weights.items())
    engine.load_checkpoint(directory, "saved")
    full = (engine.global_steps, engine.global_samples, engine.micro_steps)
    engine.parallel_state.destroy()
    return module_only, same, full


def test_load_module_only_keeps_the_engines_counters(tmp_path):
    """DeepSpeed's load_module_only=True loads the weights alone (fine-tuning from a pretrained checkpoint):
    global_steps, global_samples, micro_steps and skipped_steps are left as they are (DeepSpeed restores the
    first, second and fourth only without it, and never micro_steps). They were the saving run's, so the next
    default tag was global_step{saved + N}."""
    module_only, same, full = run_distributed(_module_only, 1, str(tmp_path), timeout=60)[0]
    assert module_only == (0, 0, 0) and same, module_only
    assert full == (2, 2 * 2, 0), full  # micro_steps is never loaded


def _save_without_frozen(directory, stage):
    """The MLP with its first layer frozen (a PEFT-style base) at DP 2: save without the frozen layer, load
    into an engine whose trained layers differ, strictly and not."""
    def frozen_first(offset):
        model = _other_weights("mlp") if offset else make_model("mlp")
        model[0].load_state_dict(make_model("mlp")[0].state_dict())  # the same frozen base either way
        model[0].requires_grad_(False)
        return model

    config = ds_config(2, 1, stage)
    model = frozen_first(0)
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=[p for p in model.parameters()
                                                                        if p.requires_grad], config=config)
    run_steps("mlp", engine, 0, 2)
    engine.save_checkpoint(directory, "peft", exclude_frozen_parameters=True)
    saved = state_of(engine)
    engine.parallel_state.destroy()
    model = frozen_first(1)
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=[p for p in model.parameters()
                                                                        if p.requires_grad], config=config)
    strict = config_error(lambda: engine.load_checkpoint(directory, "peft"))
    engine.load_checkpoint(directory, "peft", load_module_strict=False)  # Hugging Face Trainer's for PEFT
    loaded = state_of(engine)
    losses, _ = run_steps("mlp", engine, 2, 3)  # the ranks are in step
    engine.parallel_state.destroy()
    return strict, saved, loaded, losses


@pytest.mark.parametrize("stage", [1, 3])
def test_save_checkpoint_excludes_frozen_parameters_as_deepspeed(tmp_path, stage):
    """save_checkpoint(exclude_frozen_parameters=True), what Hugging Face Trainer calls for a PEFT model once
    the signature has the parameter, was refused (so Trainer's checkpoints failed). As DeepSpeed: the model
    files leave the frozen parameters out, load_module_strict=False restores the rest (the frozen ones keep
    the model's own values), a strict load names the missing keys, and zero_to_fp32 leaves them out."""
    directory = str(tmp_path / "ckpt")
    results = run_distributed(_save_without_frozen, 2, directory, stage, timeout=120)
    base = make_model("mlp").state_dict()
    for strict, saved, loaded, _ in results:
        assert strict == (f"load_checkpoint: {os.path.join(directory, 'peft', 'mp_rank_00_model_states.pt')} was "
                          f"saved with exclude_frozen_parameters=True (2 frozen parameters left out, e.g. '0.weight'); "
                          f"load it with load_module_strict=False (the model keeps its own values of those)"), strict
        for key, value in saved.items():  # trained layers as saved; the frozen base as the model was built
            assert torch.equal(loaded[key], base[key] if key.startswith("0.") else value), key
    model_file = torch.load(os.path.join(directory, "peft", "mp_rank_00_model_states.pt"), weights_only=False)
    assert sorted(model_file["module"]) == ["2.bias", "2.weight", "4.bias", "4.weight"]
    consolidated, _ = consolidate_state_dict(directory, tag="peft")
    assert sorted(consolidated) == ["2.bias", "2.weight", "4.bias", "4.weight"]
    for key, value in consolidated.items():
        assert torch.equal(value, results[0][1][key].float()), key
