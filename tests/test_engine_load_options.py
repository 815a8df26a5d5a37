"""Engine load_checkpoint's options beyond a full resume: a weights-only load, and the optimizer groups' values.

Split from test_engine_checkpoint.py (kept under 500 lines); each test kills a mutant of
megatron_core/engine/checkpoint.py's load (scripts/mutation_check.py, sample of the sixth session).
"""

import torch
from engine_common import ds_config, make_model, run_steps, state_of
from harness import run_distributed

import megatron_core


def _step_after_a_load(directory, load_optimizer):
    """One SGD step after loading the checkpoint into an engine whose own weights differ (each one moved by 1)."""
    config = ds_config(1, 1, 1, optimizer={"type": "SGD", "params": {"lr": 0.05}})
    model = make_model("mlp")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    engine, _, _, _ = megatron_core.initialize(model, config=config)
    engine.load_checkpoint(directory, "saved", load_optimizer_states=load_optimizer)
    run_steps("mlp", engine, 1, 2)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return state


def _save_after_one_sgd_step(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(
        1, 1, 1, optimizer={"type": "SGD", "params": {"lr": 0.05}}))
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory, "saved")
    engine.parallel_state.destroy()


def test_a_weights_only_load_steps_from_the_loaded_weights(tmp_path):
    """load_optimizer_states=False at ZeRO-1: the optimizer's fp32 main copy takes the loaded weights, so the
    next step starts from them; with SGD (no state) it equals the step after a full load."""
    directory = str(tmp_path)
    run_distributed(_save_after_one_sgd_step, 1, directory, timeout=60)
    full = run_distributed(_step_after_a_load, 1, directory, True, timeout=60)[0]
    weights_only = run_distributed(_step_after_a_load, 1, directory, False, timeout=60)[0]
    assert sorted(full) == sorted(weights_only)
    for name, value in full.items():
        assert torch.equal(weights_only[name], value), name


def _lr_set_by_hand_round_trip(directory):
    """No scheduler; the learning rate set by hand in the optimizer's groups before saving, as DeepSpeed
    users do; what a fresh engine's groups hold after loading."""
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0))
    run_steps("mlp", engine, 0, 1)
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.003
    engine.save_checkpoint(directory, "saved")
    engine.parallel_state.destroy()
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0))
    fresh = engine.get_lr()
    engine.load_checkpoint(directory, "saved")
    loaded = engine.get_lr()
    engine.parallel_state.destroy()
    return fresh, loaded


def test_the_optimizer_groups_learning_rate_is_restored(tmp_path):
    """As DeepSpeed's optimizer state_dict: the groups' values (a learning rate no scheduler sets) come back."""
    fresh, loaded = run_distributed(_lr_set_by_hand_round_trip, 1, str(tmp_path), timeout=60)[0]
    assert fresh != loaded and set(loaded) == {0.003}, (fresh, loaded)
