"""torch_dist checkpoints (sync; async for PP2 x VPP2) resume under another layout.

Saved after 2 steps in layout A, the run resumed in layout B (from differently initialised weights,
so everything must come from the files) gives the losses, grad norms and parameters of continuing in
layout A for the 5 steps after the save (fp32, relative 1e-5; Adam eps 1e-4 as in test_ddp_gpt, where
the attention key bias's gradient is rounding noise). The learning-rate schedule (warmup + cosine)
must be restored too, or the losses differ.
"""
import functools

import pytest
import torch
from ddp_common import build, compare, result_of, train_step
from harness import run_distributed
from test_ddp_gpt import GPTSpec

from megatron_core.dist_checkpointing import load_dist_checkpoint, save_dist_checkpoint
from megatron_core.dist_checkpointing.optimizer_state import placed_state, steps_on_device
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.training.lr_scheduler import OptimizerParamScheduler

SAVE_AT, AFTER, GLOBAL_MICROBATCHES = 2, 5, 4
OPT = {"adam_eps": 1e-4}


class FourLayers(GPTSpec):
    """test_ddp_gpt's tiny GPT-2 / Llama with 4 layers (PP 4, PP 2 x VPP 2)."""

    def config(self):
        config = super().config()
        config.num_layers = 4
        return config

    def build_chunks(self, parallel_state):
        return build_gpt_model_chunks(self.config(), 64, 16, parallel_state, make_vocab_size_divisible_by=32)


def _scheduler(optimizer):
    return OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=0.01, min_lr=0.001, lr_warmup_steps=2,
                                   lr_decay_steps=8, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                   wd_incr_steps=8)


def _perturb(params):
    for p in params.values():
        p.data.add_(0.5)


def _steps(ps, spec, wrapped, optimizer, scheduler, first, count):
    losses, norms = [], []
    for step in range(first, first + count):
        step_losses, (ok, norm, _) = train_step(ps, spec, wrapped, optimizer, step, GLOBAL_MICROBATCHES // ps.dp_size)
        assert ok
        scheduler.step(1)
        losses.append(step_losses)
        norms.append(norm)
    return losses, norms


def _original(layout, spec, ddp, directory, async_save=False, dtype=torch.float32, opt=OPT):
    ps, chunks, wrapped, optimizer = build(layout, spec, ddp, opt, dtype)
    scheduler = _scheduler(optimizer)
    _steps(ps, spec, wrapped, optimizer, scheduler, 0, SAVE_AT)
    request = save_dist_checkpoint(directory, SAVE_AT, wrapped, optimizer, scheduler, ps,
                                   extra={"consumed_train_samples": 123}, async_save=async_save)
    # Async: training goes on while the copies are written; the save must hold the step-2 state.
    losses, norms = _steps(ps, spec, wrapped, optimizer, scheduler, SAVE_AT, AFTER)
    request.wait()
    result = result_of(ps, spec, chunks, losses, norms)
    result["loss_scale"] = optimizer.get_loss_scale()
    ps.destroy()
    return result


def _resumed(layout, spec, ddp, directory, dtype=torch.float32, opt=OPT):
    ps, chunks, wrapped, optimizer = build(layout, spec, ddp, opt, dtype, prepare=_perturb)
    scheduler = _scheduler(optimizer)
    logged = []
    common = load_dist_checkpoint(directory, wrapped, optimizer, scheduler, ps, printer=logged.append)
    assert common["iteration"] == SAVE_AT and common["extra"]["consumed_train_samples"] == 123
    assert scheduler.num_steps == SAVE_AT
    losses, norms = _steps(ps, spec, wrapped, optimizer, scheduler, SAVE_AT, AFTER)
    result = result_of(ps, spec, chunks, losses, norms)
    result["loss_scale"] = optimizer.get_loss_scale()
    result["log"] = logged
    ps.destroy()
    return result


def _full(results):
    """The TP = 1 parameters, merged from the shards of the DP-rank-0 results; per-step global losses.
    (A tied embedding appears on the first and last stage; the copies are equal, the first is taken.)"""
    params = {}
    for name in {n for r in results for n in r["params"]}:
        by_tp = {}
        for r in results:
            if name in r["params"] and r["dp"][0] == 0:
                by_tp.setdefault(r["tp"][0], (r["params"][name], r["shard"][name]))
        tensors = [by_tp[t][0] for t in sorted(by_tp)]
        shard = by_tp[0][1]
        if shard is None:
            params[name] = tensors[0]
            continue
        dim, stride = shard
        pieces = [t.chunk(stride, dim=dim) for t in tensors]
        params[name] = torch.cat([p[i] for i in range(stride) for p in pieces], dim=dim)
    last = sorted(((r["dp"][0], r["losses"]) for r in results if r["last_stage"]), key=lambda x: x[0])
    losses = [[x for _, ls in last for x in ls[s]] for s in range(AFTER)]
    return {"params": params, "losses": losses, "norms": results[0]["norms"]}


CASES = {
    "tp2pp2-to-tp1": ("llama", {"tp": 2, "pp": 2}, 4, {}, {}, 1, {}),
    "tp1-to-tp2dp2-zero1": ("llama", {}, 1, {}, {"tp": 2}, 4, {"zero_stage": 1}),
    "pp2vpp2-to-pp4": ("gpt2", {"pp": 2, "vpp": 2}, 2, {}, {"pp": 4}, 4, {}),
    "dp2zero2-to-dp4zero1": ("gpt2", {}, 2, {"zero_stage": 2}, {}, 4, {"zero_stage": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_under_another_layout(case, tmp_path):
    preset, layout_a, world_a, ddp_a, layout_b, world_b, ddp_b = CASES[case]
    spec = FourLayers(preset)
    original = run_distributed(_original, world_a, layout_a, spec, ddp_a, str(tmp_path),
                               async_save=case == "pp2vpp2-to-pp4", timeout=120)
    resumed = run_distributed(_resumed, world_b, layout_b, spec, ddp_b, str(tmp_path), timeout=120)
    reference = _full(original)
    compare(resumed, reference, GLOBAL_MICROBATCHES // (world_b // (layout_b.get("tp", 1) * layout_b.get("pp", 1))),
            what=case)
    assert any("reseeded" in line for r in resumed for line in r["log"]), "the RNG reseed must be logged"


def test_same_layout_restores_rng_and_loads_without_optimizer(tmp_path):
    spec = FourLayers("gpt2")
    run_distributed(_original, 2, {"pp": 2}, spec, {}, str(tmp_path), timeout=120)
    resumed = run_distributed(_resumed, 2, {"pp": 2}, spec, {}, str(tmp_path), timeout=120)
    assert all(r["log"] == [] for r in resumed)
    (only_model,) = run_distributed(functools.partial(_model_only, spec), 1, str(tmp_path), timeout=60)
    assert only_model


def _model_only(spec, directory):
    ps, chunks, wrapped, optimizer = build({}, spec, {}, OPT, prepare=_perturb)
    load_dist_checkpoint(directory, wrapped, optimizer, None, ps, load_optim=False)
    ok = all(torch.equal(main, model) for main, model in optimizer.pairs)  # fp32: the main params are the model's
    ps.destroy()
    return ok


@pytest.mark.parametrize("dtype,zero_stage,world", [(torch.bfloat16, 1, 2), (torch.bfloat16, 0, 1),
                                                    (torch.float16, 0, 1)])
def test_low_precision_main_parameters_round_trip(tmp_path, dtype, zero_stage, world):
    """bf16/fp16 weights: the fp32 main parameters (ZeRO-1's shards or, without ZeRO, whole copies) are
    saved apart from the weights and restored, with fp16's dynamic loss scale; in the same layout the
    resumed run repeats the continued one exactly."""
    spec = FourLayers("gpt2")
    args = ({}, spec, {"zero_stage": zero_stage}, str(tmp_path))
    # fp16: the scale doubles after every step without overflow (1 to 2**7, no overflow on the way), so a
    # scaler not restored ends elsewhere.
    opt = {**OPT, "initial_loss_scale": 1.0, "loss_scale_window": 1}
    original = run_distributed(_original, world, *args, dtype=dtype, opt=opt, timeout=120)
    resumed = run_distributed(_resumed, world, *args, dtype=dtype, opt=opt, timeout=120)
    for a, b in zip(original, resumed, strict=True):
        assert a["losses"] == b["losses"] and a["norms"] == b["norms"]
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert a["loss_scale"] == b["loss_scale"], (a["loss_scale"], b["loss_scale"])
        if dtype == torch.float16:
            assert a["loss_scale"] == 2.0 ** (SAVE_AT + AFTER), "the scale must have moved for the check to bite"


def test_loaded_optimizer_state_goes_where_torch_puts_it():
    """Loaded CPU state lands on the parameter's device (here 'meta', standing in for CUDA); ``step``
    stays a CPU scalar unless the group is fused or capturable, as torch's load_state_dict does."""
    main = torch.empty(3, device="meta")
    entry = {"exp_avg": torch.ones(3), "step": torch.tensor(4.0)}
    plain = placed_state(entry, main, step_on_device=False)
    assert plain["exp_avg"].device.type == "meta" and plain["step"].device.type == "cpu"
    fused = placed_state(entry, main, step_on_device=True)
    assert fused["exp_avg"].device.type == "meta" and fused["step"].device.type == "meta"
    param = torch.nn.Parameter(torch.zeros(3))
    for options, on_device in (({}, False), ({"fused": True}, True), ({"capturable": True}, True)):
        assert steps_on_device(torch.optim.AdamW([param], **options)) == {id(param): on_device}, options
    cpu = placed_state(entry, torch.empty(3), step_on_device=True)
    assert cpu["exp_avg"].data_ptr() != entry["exp_avg"].data_ptr(), "copies, not the loaded tensors"


def _load_into_another_model(directory):
    from megatron_core import parallel_state
    from megatron_core.models.gpt import GPTModel
    from megatron_core.models.presets import gpt2_config

    ps = parallel_state.initialize_model_parallel(1)
    model = GPTModel(gpt2_config(2, 32, 4), 64, 16, parallel_state=ps, make_vocab_size_divisible_by=8)
    save_dist_checkpoint(directory, 1, [model], None, None, ps).wait()
    other = GPTModel(gpt2_config(2, 32, 4, ffn_hidden_size=96), 64, 16, parallel_state=ps,
                     make_vocab_size_divisible_by=8)
    try:
        load_dist_checkpoint(directory, [other], None, None, ps, load_rng=False, printer=lambda _: None)
        return None
    except ValueError as exc:
        return str(exc)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    """Only the vocabulary tables may differ in shape (another TP padding, clipped on load): an MLP of
    another width is an error naming the tensor and --use-checkpoint-args, never a silently clipped load."""
    (message,) = run_distributed(_load_into_another_model, 1, str(tmp_path), timeout=60)
    assert message is not None and "mlp.linear_fc1.weight: saved with shape (128, 32)" in message, message
    assert "the checkpoint is of another model (--use-checkpoint-args)" in message


def _save_tiny(directory, keys):
    from megatron_core import parallel_state
    from megatron_core.models.gpt import GPTModel
    from megatron_core.models.presets import gpt2_config

    ps = parallel_state.initialize_model_parallel(1)
    config = gpt2_config(2, 32, 4)
    model = GPTModel(config, 64, 16, parallel_state=ps, make_vocab_size_divisible_by=8)
    extra = {"model_config": config.to_dict(), "model_info": {"vocab_size": 64}}
    save_dist_checkpoint(directory, 1, [model], None, None, ps, extra={k: extra[k] for k in keys}).wait()


@pytest.mark.parametrize("keys", [("model_config",), ("model_info",)])
def test_whole_model_read_needs_the_model_config_and_info(tmp_path, keys):
    """The whole-model reader (convert.py's) rebuilds the model from both records; either one missing is
    the one ConfigError, not a KeyError later."""
    from megatron_core.dist_checkpointing.full_model import load_full_model
    from megatron_core.errors import ConfigError

    run_distributed(_save_tiny, 1, str(tmp_path), keys, timeout=60)
    with pytest.raises(ConfigError, match="records no model_config/model_info"):
        load_full_model(str(tmp_path))


def _load_into_existing_state(directory):
    spec = FourLayers("gpt2")
    ps, _, wrapped, optimizer = build({}, spec, {}, OPT)
    _steps(ps, spec, wrapped, optimizer, _scheduler(optimizer), 0, 1)
    save_dist_checkpoint(directory, 1, wrapped, optimizer, None, ps).wait()
    held = [(main, key, tensor, tensor.clone()) for main, state in optimizer.inner.state.items()
            for key, tensor in state.items()]
    for _, _, tensor, _ in held:
        tensor.add_(1.0)
    load_dist_checkpoint(directory, wrapped, optimizer, None, ps, load_rng=False, printer=lambda _: None)
    same_tensors = all(optimizer.inner.state[main][key] is tensor for main, key, tensor, _ in held)
    restored = all(torch.equal(tensor, saved) for _, _, tensor, saved in held)
    ps.destroy()
    return len(held), same_tensors, restored


def test_load_writes_existing_optimizer_state_in_place(tmp_path):
    """Where the optimizer already has state of the right shapes, loading copies into those tensors
    (under NVMe offload they are views of the swap buffers the step keeps using), restoring the values."""
    ((count, same_tensors, restored),) = run_distributed(_load_into_existing_state, 1, str(tmp_path), timeout=60)
    assert count > 0 and same_tensors and restored


def test_whole_model_read_of_a_truncated_tensor_file_is_one_line(tmp_path):
    """convert.py's reader on a checkpoint whose manifest is gone and a tensor file truncated: one
    ConfigError line naming the iteration directory and the first line of DCP's error."""
    import os
    import re

    from megatron_core.dist_checkpointing.full_model import load_full_model
    from megatron_core.errors import ConfigError

    run_distributed(_save_tiny, 1, str(tmp_path), ("model_config", "model_info"), timeout=60)
    directory = tmp_path / "iter_0000001"
    os.remove(directory / "manifest.json")
    with open(directory / "__0_0.distcp", "r+b") as f:
        f.truncate(os.path.getsize(directory / "__0_0.distcp") // 2)
    with pytest.raises(ConfigError) as error:
        load_full_model(str(tmp_path))
    message = str(error.value)
    found = re.fullmatch(rf"checkpoint file {re.escape(str(directory))} holds an unreadable tensor file \((.+)\) "
                         r"\(iteration 1 is damaged\); .*", message)
    assert found and found.group(1).startswith("CheckpointException"), message


@pytest.mark.parametrize("names,expected", [((".metadata",), True), (("common.pt",), True), (("__1_0.distcp",), True),
                                            (("mp_rank_00",), False), ((), False)])
def test_any_one_file_of_the_format_marks_a_dist_directory(tmp_path, names, expected):
    """A torch_dist iteration directory is recognised by any one of its files (the others may have been
    deleted, and the manifest with them), so its loader, not the legacy one, reports what is missing."""
    from megatron_core.dist_checkpointing.serialization import is_dist_dir

    for name in names:
        if name.startswith("mp_rank"):  # the legacy format's per-rank folder
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(b"")
    assert is_dist_dir(str(tmp_path)) is expected


@pytest.mark.parametrize("case", ["no format", "another format", "no iteration"])
def test_a_common_file_that_is_not_our_record_is_refused(tmp_path, case):
    """``common.pt`` must be the dict a torch_dist save writes (its format tag and the iteration)."""
    from megatron_core.dist_checkpointing.serialization import FORMAT, read_checkpoint_common
    from megatron_core.errors import ConfigError

    record = {"no format": {"iteration": 1}, "another format": {"format": "other", "iteration": 1},
              "no iteration": {"format": FORMAT}}[case]
    torch.save(record, tmp_path / "common.pt")
    with pytest.raises(ConfigError, match="is not the record a torch_dist save writes"):
        read_checkpoint_common(str(tmp_path), 1, str(tmp_path))


def test_whole_model_read_in_one_process_passes_on_no_dcp_warning(tmp_path):
    """convert.py reads a torch_dist checkpoint in one process on purpose: DCP's 'torch.distributed is
    disabled ... assuming the intent is to load in a single process' warning is not shown to the user."""
    import warnings

    from megatron_core.dist_checkpointing.full_model import load_full_model

    run_distributed(_save_tiny, 1, str(tmp_path), ("model_config", "model_info"), timeout=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = load_full_model(str(tmp_path))
    assert full.iteration == 1 and full.state["embedding.word_embeddings.weight"].shape == (64, 32)
    shown = [str(w.message) for w in caught]
    assert not [m for m in shown if "torch.distributed is disabled" in m], shown


def test_a_tracker_naming_a_missing_iteration_is_one_error_line(tmp_path):
    """read_common (and load_dist_checkpoint) at a directory whose tracker names an iteration that has no
    directory: the one ConfigError, not a TypeError from the manifest check of a path that is None."""
    from megatron_core.dist_checkpointing import read_common
    from megatron_core.errors import ConfigError
    from megatron_core.training import checkpoint_io as io

    (tmp_path / io.TRACKER_FILENAME).write_text("3")
    with pytest.raises(ConfigError, match=f"--load {tmp_path}: iteration 3 is not a torch_dist checkpoint"):
        read_common(str(tmp_path))
