"""A tag saved again by a run of another layout: ``save_checkpoint(dir, tag="best")`` in a job rerun with fewer
ranks, or at ZeRO-0 after ZeRO-1. The new save overwrites the files of its own ranks and leaves the earlier
run's other ``zero_pp_rank_N`` files in the folder (DeepSpeed's save does not clean a tag folder either).

The load and ``zero_to_fp32`` must read the files the last save wrote, as DeepSpeed names them from the saved
``dp_world_size``: before, every ``zero_pp_rank_*`` file of the folder was read, the stale ones overlapped the
new ones, and the checkpoint just saved was refused ("parameter '0.weight' is not fully covered by the
optimizer files found (2); is a rank's file missing?" after ZeRO-1 then ZeRO-0 at DP 2), consolidation too.
"""

import os

import pytest
import torch
from engine_common import ds_config, make_model, run_steps, state_of
from harness import run_distributed

import megatron_core
from megatron_core.engine.consolidate import consolidate_state_dict


def engine_dp():
    """The data-parallel size of the test's runs: every rank of the job."""
    return torch.distributed.get_world_size()


def _train_and_save(directory, stage, steps):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(engine_dp(), 1, stage))
    run_steps("mlp", engine, 0, steps)
    engine.save_checkpoint(directory, "best")
    state = state_of(engine)
    engine.parallel_state.destroy()
    return state


def _load_and_step(directory, stage):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(engine_dp(), 1, stage))
    engine.load_checkpoint(directory, "best")
    loaded = state_of(engine)
    run_steps("mlp", engine, 3, 4)
    stepped = state_of(engine)
    engine.parallel_state.destroy()
    return loaded, stepped


@pytest.mark.parametrize(("first", "second"), [((4, 1), (2, 1)), ((2, 2), (2, 0))],
                         ids=["dp4-then-dp2", "zero1-then-zero0"])
def test_a_tag_saved_again_at_another_layout_loads_the_last_save(tmp_path, first, second):
    directory = str(tmp_path)
    run_distributed(_train_and_save, first[0], directory, first[1], 2, timeout=180)
    saved = run_distributed(_train_and_save, second[0], directory, second[1], 3, timeout=180)[0]
    files = sorted(f for f in os.listdir(tmp_path / "best") if f.startswith("zero_pp_rank_"))
    assert len(files) == first[0], files  # the earlier run's extra files are still there
    loaded, stepped = run_distributed(_load_and_step, second[0], directory, second[1], timeout=180)[0]
    consolidated, _ = consolidate_state_dict(directory)
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
        assert torch.equal(consolidated[name], value), name
    # The optimizer state is the last save's: one more step from it equals the second run's own next step.
    expected = run_distributed(_continue, second[0], directory, second[1], timeout=180)[0]
    for name, value in expected.items():
        torch.testing.assert_close(stepped[name], value, rtol=1e-6, atol=1e-7, msg=name)


def _continue(directory, stage):
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(engine_dp(), 1, stage))
    run_steps("mlp", engine, 0, 3)
    run_steps("mlp", engine, 3, 4)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return state
