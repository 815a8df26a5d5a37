"""Engine checkpoint consolidation: ``zero_to_fp32`` and ``save_16bit_model`` give the full weights.

- consolidation (function and ``tools/zero_to_fp32.py``) equals the model's full state dict exactly, and
  its Hugging Face folder loads with ``from_pretrained`` to the same weights (ZeRO 0, 2, 3 at DP 2);
- ``tools/zero_to_fp32.py`` takes DeepSpeed's current command line (output folder, safetensors, shards,
  frozen parameters left out) and its older one, and errors in one line;
- save_checkpoint leaves a runnable ``zero_to_fp32.py`` in the save directory, as DeepSpeed;
- ``engine.save_16bit_model`` writes the gathered bf16 weights under ZeRO-3, without the frozen parameters
  when asked (DeepSpeed's ``exclude_frozen_parameters``), also under its older name ``save_fp16_model``;
- ``--max_shard_size``'s units, and a safetensors output's permissions (the process umask left alone).

Resuming and loading are in ``test_engine_checkpoint.py``.
"""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from engine_common import config_error, ds_config, make_model, run_steps, sharded, state_of
from harness import run_distributed

import megatron_core
from megatron_core.checkpoint.hf_io import write_weights_dir
from megatron_core.engine.consolidate import consolidate_state_dict, parse_size, save_consolidated
from megatron_core.engine.consolidate import main as consolidate_main
from megatron_core.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_and_save(directory, kind, stage):
    engine, _, _, _ = megatron_core.initialize(make_model(kind), config=sharded(ds_config(2, 2, stage, kind)))
    run_steps(kind, engine, 0, 2)
    engine.save_checkpoint(directory)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return state


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_consolidation_equals_the_full_state_dict(tmp_path, stage):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    expected = run_distributed(_train_and_save, 2, str(tmp_path / "ckpt"), "gpt2", stage, timeout=120)[0]
    state, hf_config = consolidate_state_dict(str(tmp_path / "ckpt"))
    assert hf_config["model_type"] == "gpt2" and set(state) == set(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    hf_dir = save_consolidated(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), f"from_pretrained: {name}"
    out = tmp_path / "model.safetensors"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "zero_to_fp32.py"), str(tmp_path / "ckpt"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from_tool = load_file(str(out))
    assert set(from_tool) == set(expected) and all(torch.equal(from_tool[k], v) for k, v in expected.items())
    if stage == 0:
        # DeepSpeed's older usage, `zero_to_fp32.py CKPT pytorch_model.bin -t TAG`: one torch.save file.
        argv = [str(tmp_path / "ckpt"), str(tmp_path / "pytorch_model.bin"), "-t", "global_step2"]
        assert consolidate_main(argv) == 0
        from_bin = torch.load(str(tmp_path / "pytorch_model.bin"), weights_only=True)
        assert set(from_bin) == set(expected) and all(torch.equal(from_bin[k], v) for k, v in expected.items())


def test_consolidation_tool_errors_in_one_line(tmp_path):
    def consolidate():
        return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "zero_to_fp32.py"), str(tmp_path), "x"],
                              capture_output=True, text=True, timeout=60)

    proc = consolidate()
    assert proc.returncode == 2 and proc.stdout.count("\n") == 1 and "no 'latest' file" in proc.stdout
    # A pretrain_gpt.py checkpoint (Megatron's tracker file) is pointed at its own converter.
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1")
    proc = consolidate()
    assert proc.returncode == 2 and proc.stdout.count("\n") == 1 and "tools/checkpoint/convert.py" in proc.stdout


def _save_16bit(directory):
    import torch.distributed as dist

    config = ds_config(dist.get_world_size(), 1, 3, bf16={"enabled": True})
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    run_steps("mlp", engine, 0, 2)
    assert engine.save_16bit_model(directory) is True
    expected = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}  # gathered, every rank
    engine.parallel_state.destroy()
    if dist.get_rank() != 0:
        return None
    saved = torch.load(os.path.join(directory, "pytorch_model.bin"), weights_only=True)
    full_shapes = {k: v.shape for k, v in make_model("mlp").state_dict().items()}
    return {k: (v.dtype, torch.equal(v, expected[k]) and v.shape == full_shapes[k]) for k, v in saved.items()}, \
        sorted(full_shapes)


@pytest.mark.parametrize("world", [1, 2])
def test_save_16bit_model_writes_the_gathered_weights(tmp_path, world):
    """DeepSpeed's engine.save_16bit_model (with stage3_gather_16bit_weights_on_model_save): one torch.save
    file of the full bf16 weights under ZeRO-3 at DP 2, and in one process."""
    saved, names = run_distributed(_save_16bit, world, str(tmp_path / "out"), timeout=120)[0]
    assert sorted(saved) == names and all(same for _, same in saved.values()), saved
    assert {dtype for dtype, _ in saved.values()} == {torch.bfloat16}


def _save_16bit_without_frozen(directory):
    import torch.distributed as dist

    model = make_model("mlp")
    model[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=trainable,
                                               config=ds_config(dist.get_world_size(), 1, 3))
    run_steps("mlp", engine, 0, 1)
    # DeepSpeed 0.19's signature: save_16bit_model(save_dir, save_filename, exclude_frozen_parameters), and
    # its older name save_fp16_model(save_dir, save_filename).
    assert engine.save_16bit_model(directory, "trainable.bin", exclude_frozen_parameters=True) is True
    assert engine.save_fp16_model(directory) is True
    engine.parallel_state.destroy()
    if dist.get_rank() != 0:
        return None
    load = lambda name: sorted(torch.load(os.path.join(directory, name), weights_only=True))  # noqa: E731
    return load("trainable.bin"), load("pytorch_model.bin"), sorted(make_model("mlp").state_dict())


def test_save_16bit_model_leaves_out_frozen_parameters_and_keeps_the_older_name(tmp_path):
    trainable, everything, names = run_distributed(_save_16bit_without_frozen, 2, str(tmp_path / "out"),
                                                   timeout=120)[0]
    assert everything == names
    assert trainable == [n for n in names if not n.startswith("0.")]


def _train_mlp_with_a_frozen_layer(directory):
    model = make_model("mlp")
    model[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = megatron_core.initialize(model, model_parameters=trainable, config=ds_config(1, 1, 2))
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return state


def test_consolidation_takes_deepspeeds_current_command_line(tmp_path, capsys):
    """DeepSpeed's zero_to_fp32.py (0.14 on): ``CHECKPOINT_DIR OUTPUT_DIR [--safe_serialization]
    [--max_shard_size 5GB] [--exclude_frozen_parameters] [-d]`` writes OUTPUT_DIR/pytorch_model.bin (or
    model.safetensors), in shards with an index past --max_shard_size. The flags were unrecognized, and a
    plain model's OUTPUT_DIR became one safetensors file of that name, which torch.load and
    OUTPUT_DIR/pytorch_model.bin could not read."""
    from safetensors.torch import load_file

    expected = run_distributed(_train_mlp_with_a_frozen_layer, 1, str(tmp_path / "ckpt"), timeout=60)[0]
    ckpt = str(tmp_path / "ckpt")

    def same(state, names):
        assert set(state) == set(names) and all(torch.equal(state[k], expected[k]) for k in names), sorted(state)

    assert consolidate_main([ckpt, str(tmp_path / "out"), "-d"]) == 0
    same(torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True), expected)
    assert consolidate_main([ckpt, str(tmp_path / "safe"), "--safe_serialization", "--exclude_frozen_parameters"]) == 0
    same(load_file(str(tmp_path / "safe" / "model.safetensors")), [k for k in expected if not k.startswith("0.")])
    # 1 KB shards: each tensor alone where it is larger, the index names every tensor's shard.
    assert consolidate_main([ckpt, str(tmp_path / "shards"), "--max_shard_size", "1KB"]) == 0
    index = json.loads((tmp_path / "shards" / "pytorch_model.bin.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"pytorch_model-00001-of-{len(files):05d}.bin", files
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in expected.values())
    merged = {}
    for name in files:
        merged.update(torch.load(tmp_path / "shards" / name, weights_only=True))
    same(merged, expected)
    assert {k: f for f in files for k in torch.load(tmp_path / "shards" / f, weights_only=True)} == index["weight_map"]
    capsys.readouterr()
    assert consolidate_main([ckpt, str(tmp_path / "bad"), "--max_shard_size", "5 parsecs"]) == 2
    assert capsys.readouterr().out == ("error: --max_shard_size '5 parsecs': give a size such as 5GB, 500MB or a "
                                       "number of bytes\n")


def _save_at_zero2(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, 2))
    run_steps("mlp", engine, 0, 1)
    saved = engine.save_checkpoint(directory)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return saved, state


def _save_expecting_an_error(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 0))
    try:
        return config_error(lambda: engine.save_checkpoint(directory))
    finally:
        engine.parallel_state.destroy()


def test_a_recovery_script_that_cannot_be_replaced_is_one_line_and_leaves_no_temporary(tmp_path):
    """A directory where save_checkpoint puts zero_to_fp32.py: the copy's rename fails (EISDIR), save_checkpoint
    says so in one line, and the copied temporary is removed (it was left in the save directory)."""
    save_dir = tmp_path / "ckpt"
    (save_dir / "zero_to_fp32.py").mkdir(parents=True)
    (message,) = run_distributed(_save_expecting_an_error, 1, str(save_dir), timeout=120)
    assert message is not None and message.startswith(
        f"save_checkpoint: writing {str(save_dir / 'global_step0')!r} failed on rank 0 (") \
        and "Is a directory" in message and "\n" not in message, message
    assert sorted(os.listdir(save_dir)) == ["global_step0", "zero_to_fp32.py"]  # no temporary, no 'latest'
    assert (save_dir / "zero_to_fp32.py").is_dir()


def test_save_checkpoint_leaves_a_runnable_zero_to_fp32_script(tmp_path):
    """As DeepSpeed's save_checkpoint (_copy_recovery_script): the save directory gets an executable
    zero_to_fp32.py, written by rank 0, that takes DeepSpeed's command line from any working directory and
    writes the engine's weights exactly. Without megatron_core importable it says in one line to install
    the project. No script was written, and save_checkpoint returned the tag folder, not True."""
    save_dir = tmp_path / "ckpt"
    results = run_distributed(_save_at_zero2, 2, str(save_dir), timeout=120)
    assert [saved for saved, _ in results] == [True, True]
    script = save_dir / "zero_to_fp32.py"
    assert script.is_file() and os.stat(script).st_mode & stat.S_IXUSR
    assert sorted(os.listdir(save_dir)) == ["global_step1", "latest", "zero_to_fp32.py"]  # no temporary left
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Relative paths from another directory; megatron_core from this checkout (PYTHONPATH) or an install.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, os.path.join("..", "ckpt", "zero_to_fp32.py"), os.path.join("..", "ckpt"),
                           os.path.join("..", "out")], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    expected = results[0][1]
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert written[name].dtype == torch.float32 and torch.equal(written[name], value), name
    # `python -S` without PYTHONPATH: neither an install nor the checkout is on the path.
    env.pop("PYTHONPATH")
    proc = subprocess.run([sys.executable, "-S", str(script), str(save_dir), str(tmp_path / "out2")], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "" and proc.stdout.count("\n") == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith("error: zero_to_fp32.py needs the megatron_core package") \
        and "pip install" in proc.stdout, proc.stdout
    assert not (tmp_path / "out2").exists()


def test_max_shard_size_takes_bytes_and_decimal_and_binary_units():
    """``--max_shard_size`` as DeepSpeed and Hugging Face write it: a bare number and ``B`` are bytes, KB/MB/GB/TB
    powers of 1000, KiB/MiB/GiB/TiB powers of 1024, any case, a fraction allowed; zero is refused."""
    assert parse_size("1000") == parse_size("1000B") == parse_size(" 1000 b ") == 1000
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5MB") == 1_500_000 and parse_size("2kb") == 2000
    assert parse_size("1KiB") == 1024 and parse_size("3MiB") == 3 * 2**20 and parse_size("1TiB") == 2**40
    for bad in ("0", "0GB", "5 parsecs", "-1GB", "GB"):
        with pytest.raises(ConfigError, match="--max_shard_size"):
            parse_size(bad)


def test_a_safetensors_output_is_readable_as_the_umask_allows_and_the_umask_is_kept(tmp_path):
    """safetensors writes its file 0o600; the tool gives it the mode a plain ``open()`` would (0o644 under umask
    0o022), reading the umask without leaving it changed for the rest of the process."""
    previous = os.umask(0o022)
    try:
        state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
        write_weights_dir(state, str(tmp_path / "out"), safe=True, max_shard_bytes=None)
        after = os.umask(0o022)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "model.safetensors").st_mode) == 0o644
    assert after == 0o022, oct(after)


def test_shards_group_the_tensors_as_huggingface_hub_does(tmp_path):
    """``--max_shard_size`` cuts as DeepSpeed's zero_to_fp32.py (``huggingface_hub.split_torch_state_dict_into_shards``)
    when no tensor alone exceeds it: in key order, a shard filled to exactly the limit keeps its last tensor."""
    from huggingface_hub import split_torch_state_dict_into_shards

    state = {k: torch.full((n,), float(i)) for i, (k, n) in enumerate(zip("abcde", (4, 4, 8, 2, 2), strict=True))}
    for limit in (32, 40, 48):  # bytes: 32 and 48 are filled exactly (a + b, c + d + e)
        out = tmp_path / str(limit)
        write_weights_dir(state, str(out), safe=False, max_shard_bytes=limit)
        hub = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                                 max_shard_size=limit)
        index = json.loads((out / "pytorch_model.bin.index.json").read_text())
        assert index["weight_map"] == hub.tensor_to_filename, limit
        for file, keys in hub.filename_to_tensors.items():
            assert sorted(torch.load(out / file, weights_only=True)) == sorted(keys), (limit, file)


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """An output under a file (or in a folder that cannot hold it) was the OSError's traceback, or safetensors'
    SafetensorError's for a .safetensors file."""
    run_distributed(_train_mlp_with_a_frozen_layer, 1, str(tmp_path / "ckpt"), timeout=60)
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    for output, reason in ((tmp_path / "afile" / "x.bin", f"File exists: {tmp_path / 'afile'}"),
                           (tmp_path / "afile" / "out_dir", f"Not a directory: {tmp_path / 'afile' / 'out_dir'}"),
                           (tmp_path / "afile" / "x.safetensors", f"File exists: {tmp_path / 'afile'}")):
        assert consolidate_main([str(tmp_path / "ckpt"), str(output)]) == 2
        assert capsys.readouterr().out == (f"error: writing {str(output)!r} failed ({reason}); give an output path "
                                           f"in a writable directory\n"), output


def _queries_and_consolidation(stage):
    import torch.distributed as dist

    zero = {"stage": stage, "reduce_bucket_size": 700, "stage3_gather_16bit_weights_on_model_save": stage == 3,
            **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(
        dist.get_world_size(), 1, stage, bf16={"enabled": True}, zero_optimization=zero, steps_per_print=7))
    run_steps("mlp", engine, 0, 2)
    queries = (engine.steps_per_print(), engine.zero_optimization(), engine.zero_optimization_partition_gradients(),
               engine.zero_optimization_partition_weights(), engine.zero_gather_16bit_weights_on_model_save(),
               engine.optimizer_name())
    expected = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}  # gathered, every rank
    consolidated = engine._zero3_consolidated_16bit_state_dict()
    same = None if consolidated is None else {
        k: v.dtype == torch.bfloat16 and v.device.type == "cpu" and torch.equal(v, expected[k])
        for k, v in consolidated.items()}
    engine.ddp.gather_all_params()
    engine.empty_partition_cache()
    weight = engine.module[0].weight
    freed = weight.untyped_storage().nbytes() < weight.numel() * weight.element_size()
    run_steps("mlp", engine, 2, 3)  # training goes on after the cache is emptied
    engine.parallel_state.destroy()
    return queries, same, sorted(expected), freed


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_queries_and_the_consolidated_16bit_state_dict(stage):
    """The DeepSpeed engine calls Accelerate's get_state_dict and HF's Trainer make (they were AttributeErrors):
    the ZeRO queries, empty_partition_cache (frees the gathered ZeRO-3 buckets) and
    _zero3_consolidated_16bit_state_dict (the full bf16 weights on the CPU on rank 0, None on the others)."""
    results = run_distributed(_queries_and_consolidation, 2, stage, timeout=120)
    for rank, (queries, same, names, freed) in enumerate(results):
        assert queries == (7, True, stage >= 2, stage == 3, stage == 3, "adamw")
        assert (same is None) == (rank != 0)
        if same is not None:
            assert sorted(same) == names and all(same.values()), same
        assert freed == (stage == 3)
