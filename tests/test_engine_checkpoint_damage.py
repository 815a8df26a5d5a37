"""Engine checkpoints damaged after the save: each load is one ConfigError line, the same on every rank,
naming the file and what to do (rules of the house: no traceback of ours, no rank left waiting).

- a truncated model-states file or a truncated rank's optimizer file (a copy cut short, a full disk when
  it was copied) raised torch's multi-line ``PytorchStreamReader failed reading zip archive`` traceback;
- a file holding a pickled class raised torch's multi-line ``Weights only load failed`` traceback;
- an empty ``latest`` read as the tag '' and blamed ``DIR/mp_rank_00_model_states.pt``; a ``latest``
  naming a folder that is gone named only the file inside it, not ``latest`` nor the tags there.
"""

import os

import pytest
import torch
from engine_common import ds_config, make_model, run_steps
from harness import run_distributed

import megatron_core
from megatron_core.errors import ConfigError


class _Payload:
    """Stands for any class pickled into a file (DeepSpeed pickles whatever client_state holds)."""


def _damage(directory, what):
    if what == "pickled":
        torch.save({"extra": _Payload()}, os.path.join(directory, "saved", "mp_rank_00_model_states.pt"))
    elif what == "model":
        os.truncate(os.path.join(directory, "saved", "mp_rank_00_model_states.pt"), 100)
    elif what == "optim":
        os.truncate(os.path.join(directory, "saved", "zero_pp_rank_1_mp_rank_00_optim_states.pt"), 100)
    elif what == "empty-latest":
        open(os.path.join(directory, "latest"), "w").close()
    elif what == "binary-latest":
        with open(os.path.join(directory, "latest"), "wb") as f:
            f.write(b"global_step\xff")
    elif what == "folder-latest":
        os.remove(os.path.join(directory, "latest"))
        os.mkdir(os.path.join(directory, "latest"))
    elif what == "deepspeed":  # the keys DeepSpeed 0.19.8 writes (CPU run, ZeRO-2, /tmp/peers-venv)
        path = os.path.join(directory, "saved", "mp_rank_00_model_states.pt")
        module = torch.load(path, weights_only=True)["module"]
        torch.save({"module": module, "buffer_names": [], "optimizer": None, "param_shapes": [], "frozen_param_shapes":
                    None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
                    "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
                    "global_steps": 1, "global_samples": 2, "dp_world_size": 2, "mp_world_size": 1,
                    "ds_config": {}, "ds_version": "0.19.8"}, path)
    elif what == "latest-to-gone":
        with open(os.path.join(directory, "latest"), "w") as f:
            f.write("global_step9")


def _save_damage_load(directory, what):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, 1))
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory, "saved")
    if engine.parallel_state.rank == 0:
        _damage(directory, what)
    engine.barrier()
    try:
        engine.load_checkpoint(directory, None if what.endswith("latest") or what == "latest-to-gone" else "saved")
    except ConfigError as exc:
        return str(exc)
    finally:
        engine.parallel_state.destroy()
    return None


@pytest.mark.parametrize("what,expected", [
    ("model", "load_checkpoint: checkpoint file {d}/saved/mp_rank_00_model_states.pt is damaged "
              "(PytorchStreamReader failed reading zip archive: failed finding central directory); save it again "
              "or load another tag"),
    ("optim", "load_checkpoint: checkpoint file {d}/saved/zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged "
              "(PytorchStreamReader failed reading zip archive: failed finding central directory); save it again "
              "or load another tag"),
    ("pickled", "load_checkpoint: checkpoint file {d}/saved/mp_rank_00_model_states.pt holds what "
                "torch.load(weights_only=True) does not read (Unsupported global: GLOBAL "
                "test_engine_checkpoint_damage._Payload); files are never unpickled with code"),
    ("empty-latest", "load_checkpoint: {d}/latest is empty; write the tag to load into it or pass tag= "
                     "(tags in {d}: saved)"),
    ("binary-latest", "load_checkpoint: {d}/latest is not a text file naming a tag (invalid start byte at byte "
                      "11); write the tag to load into it or pass tag="),
    ("folder-latest", None),  # DeepSpeed 0.19.8 checks os.path.isfile: nothing loaded, (None, None)
    # DeepSpeed's model states beside this engine's optimizer files (DeepSpeed's checkpoints load:
    # test_engine_deepspeed_checkpoint.py)
    ("deepspeed", "load_checkpoint: {d}/saved/zero_pp_rank_0_mp_rank_00_optim_states.pt is no DeepSpeed optimizer "
                  "file (no 'optimizer_state_dict') beside DeepSpeed's model states; save the checkpoint again or "
                  "load another tag"),
    ("latest-to-gone", "load_checkpoint: {d}/latest names the tag 'global_step9', which is not a folder of {d}; "
                       "write the tag to load into it or pass tag= (tags in {d}: saved)"),
])
def test_a_damaged_checkpoint_is_one_line_on_every_rank(tmp_path, what, expected):
    results = run_distributed(_save_damage_load, 2, str(tmp_path), what, timeout=90)
    assert results == [expected if expected is None else expected.format(d=str(tmp_path))] * 2, results


def _save_as_deepspeed(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 1))
    run_steps("mlp", engine, 0, 1)
    engine.save_checkpoint(directory, "saved")
    _damage(directory, "deepspeed")
    engine.parallel_state.destroy()


def test_consolidating_a_damaged_deepspeed_checkpoint_is_one_line(tmp_path):
    """tools/zero_to_fp32.py (consolidate_state_dict) on a checkpoint DeepSpeed wrote was "KeyError: 'tp_size'"
    with a traceback; DeepSpeed's model states beside optimizer files that are not DeepSpeed's is one line."""
    from megatron_core.engine.consolidate import consolidate_state_dict

    run_distributed(_save_as_deepspeed, 1, str(tmp_path), timeout=60)
    with pytest.raises(ConfigError, match=r"^zero_to_fp32: .*/saved/zero_pp_rank_0_mp_rank_00_optim_states.pt is no "
                                          r"DeepSpeed optimizer file \(no 'optimizer_state_dict'\) beside DeepSpeed's "
                                          r"model states; save the checkpoint again or load another tag$"):
        consolidate_state_dict(str(tmp_path), "saved")


def _save_under_reserved_tags(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 1))
    run_steps("mlp", engine, 0, 1)
    refused = {}
    for tag in (".", "..", "latest", "zero_to_fp32.py"):
        try:
            engine.save_checkpoint(directory, tag)
        except ConfigError as exc:
            refused[tag] = str(exc)
    engine.parallel_state.destroy()
    return refused


def test_a_tag_that_is_no_folder_of_its_own_is_refused_before_writing(tmp_path):
    """tag '..' wrote the checkpoint's files into the save directory's parent, '.' into the directory itself;
    'latest' and 'zero_to_fp32.py' failed on the file of that name, blaming the disk ('give a directory this job
    can write to, with free space')."""
    directory = tmp_path / "ckpt"
    refused = run_distributed(_save_under_reserved_tags, 1, str(directory), timeout=60)[0]
    for tag in (".", "..", "latest", "zero_to_fp32.py"):
        assert refused.get(tag, "").startswith(f"save_checkpoint: tag {tag!r} is not a folder of its own under "
                                               f"{str(directory)!r}"), refused
    assert not list(tmp_path.rglob("*.pt")), list(tmp_path.rglob("*"))  # nothing written, in or beside it


def _save_under_unloadable_tags(directory):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(1, 1, 1))
    refused = {}
    for tag in ("a\0b", " t", "t\n", " "):
        try:
            engine.save_checkpoint(directory, tag)
        except (ConfigError, ValueError) as exc:
            refused[tag] = f"{type(exc).__name__}: {exc}"
    engine.parallel_state.destroy()
    return refused


def test_a_tag_latest_cannot_name_is_refused_before_writing(tmp_path):
    """A NUL in the tag was os's ValueError; ' t' and 't\\n' were saved, and the load through 'latest' (stripped, as
    DeepSpeed's) looked for 't' and failed."""
    directory = tmp_path / "ckpt"
    refused = run_distributed(_save_under_unloadable_tags, 1, str(directory), timeout=60)[0]
    for tag in ("a\0b", " t", "t\n", " "):
        assert refused.get(tag, "").startswith(f"ConfigError: save_checkpoint: tag {tag!r} has a NUL character or "
                                               f"white space at either end"), refused
    assert not list(tmp_path.rglob("*.pt")), list(tmp_path.rglob("*"))
