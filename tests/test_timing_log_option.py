"""``--timing-log-option {max,minmax,all}`` (Megatron-LM's ``Timers.log`` options) with ``--timing-log-level 1``.

Two forked ranks: the gathered table holds each rank's own timer values exactly, and the three blocks show
them as Megatron-LM prints them (each rank's, the max, the min and max; a rank that never ran a timer is
left out). Through ``pretrain_gpt`` on two pipeline stages, each option prints its block after every log
line (without the flag: minmax, Megatron-LM's default), and the values agree with the slowest rank's time
the run writes to TensorBoard (Megatron-LM's ``Timers.write``). Values are cross-checked against each other,
never against wall-clock bounds.
"""
import re

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from test_pretrain import TINY, _train
from test_tensorboard import _scalars

from megatron_core.training.config import LoggingConfig
from megatron_core.training.timers import Timers, slowest, timing_block

NAMES = ["forward-backward", "optimizer"]


def _gathered():
    """Each rank times some work (rank 1 never runs "optimizer"); returns its own seconds per iteration
    (normalizer 2), the gathered table and the three blocks."""
    timers = Timers()
    rank = dist.get_rank()
    x = torch.randn(200, 200, generator=torch.Generator().manual_seed(rank))
    for name in NAMES if rank == 0 else NAMES[:1]:
        timers(name).start()
        for _ in range(5 + 20 * rank):
            x = torch.tanh(x @ x)
        timers(name).stop()
    own = [timers(n).elapsed(reset=False) / 2 for n in NAMES]  # rank 1's "optimizer": created now, at zero
    table = timers.gather_means(NAMES, dist.group.WORLD, normalizer=2)
    assert timers("forward-backward").elapsed(reset=False) == 0.0, "the gather resets the timers"
    return own, table, {option: timing_block(NAMES, table, option) for option in ("all", "max", "minmax")}


def test_the_gathered_table_and_blocks_hold_each_ranks_times():
    (own0, table, blocks), (own1, table1, blocks1) = run_distributed(_gathered, 2, timeout=60)
    assert table == table1 == [own0, own1] and blocks == blocks1
    assert own1[1] == 0.0 and min(own0 + own1[:1]) > 0.0
    ms = [[f"{v * 1000.0:.2f}" for v in row] for row in (own0, own1)]
    assert blocks["all"] == "\n".join(["times across ranks (ms):", "  forward-backward:",
                                       f"     rank  0: {ms[0][0]}", f"     rank  1: {ms[1][0]}", "  optimizer:",
                                       f"     rank  0: {ms[0][1]}"])
    fb = [own0[0] * 1000.0, own1[0] * 1000.0]
    dots = "forward-backward ".ljust(48, "."), "optimizer ".ljust(48, ".")
    assert blocks["max"] == (f"max time across ranks (ms):\n    {dots[0]}: {max(fb):.2f}\n"
                             f"    {dots[1]}: {own0[1] * 1000.0:.2f}")
    assert blocks["minmax"] == (f"(min, max) time across ranks (ms):\n    {dots[0]}: ({min(fb):.2f}, {max(fb):.2f})\n"
                                f"    {dots[1]}: ({ms[0][1]}, {ms[0][1]})")


def test_no_timer_run_is_no_block_and_an_unknown_option_is_refused():
    assert timing_block(NAMES, [[0.0, 0.0], [0.0, 0.0]], "all") == ""
    with pytest.raises(ValueError, match="timing log option 'min' is not one of max, minmax, all"):
        timing_block(NAMES, [[1.0, 1.0]], "min")
    with pytest.raises(ValueError, match=r"timing_log_option \(--timing-log-option\) 'min' is not one of"):
        LoggingConfig(timing_log_option="min")


_HEADS = {"all": "times across ranks (ms):", "max": "max time across ranks (ms):",
          "minmax": "(min, max) time across ranks (ms):"}


def _blocks(out, option):
    """The block after each iteration line: {timer: [ms values]} per line. The first line's theoretical memory
    and memory reports (rank 0's, every DP rank 0's) come between the line and its block: they are left out."""
    lines = [line for line in out.splitlines() if not line.startswith(("[Rank ", "Theoretical memory footprints: "))]
    found: list = []
    for i, line in enumerate(lines):
        if re.search(r"iteration +\d+/ +4 \|", line):
            assert not line.rstrip().endswith("ms)") and "time (ms) |" not in line, "the line keeps no timing part"
            assert lines[i + 1] == _HEADS[option], lines[i + 1]
            values: dict[str, list[float]] = {}
            name = None
            for row in lines[i + 2:]:
                if option == "all" and re.fullmatch(r"  \S+:", row):
                    name = row.strip(" :")
                elif option == "all" and (m := re.fullmatch(r"     rank +(\d+): ([\d.]+)", row)):
                    values.setdefault(name, []).append(float(m.group(2)))
                    assert int(m.group(1)) == len(values[name]) - 1  # rank 0, then rank 1
                elif m := re.fullmatch(r"    (\S+) \.+: \(?([\d.]+)(?:, ([\d.]+)\))?", row):
                    values[m.group(1)] = [float(v) for v in m.groups()[1:] if v is not None]
                else:
                    break
            found.append(values)
    return found


@pytest.mark.parametrize("option", ["all", "max", "minmax", None])
def test_pretrain_prints_the_block_of_the_option_after_each_line(tmp_path, capfd, option):
    # None: no --timing-log-option, Megatron-LM's default (minmax)
    argv = TINY + ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "2", "--timing-log-level", "1",
                   "--pipeline-model-parallel-size", "2",
                   "--tensorboard-dir", str(tmp_path / "tb"), "--log-timers-to-tensorboard"]
    if option is None:
        option = "minmax"
    else:
        argv += ["--timing-log-option", option]
    run_distributed(_train, 2, argv, timeout=180)
    blocks = _blocks(capfd.readouterr().out, option)
    scalars = _scalars(tmp_path / "tb")
    assert len(blocks) == 2  # iterations 2 and 4, printed once (by the logging rank)
    for (iteration, block) in zip((2, 4), blocks, strict=True):
        assert sorted(block) == NAMES
        for name, values in block.items():
            # --log-timers-to-tensorboard writes the slowest rank's seconds per iteration
            slowest = dict(scalars[f"{name}-time"])[iteration] * 1000.0
            expected = {"all": 2, "max": 1, "minmax": 2}[option]
            assert len(values) == expected, (name, values)
            if option == "minmax":
                assert values[0] <= values[1], (name, values)
            assert abs(max(values) - slowest) <= 0.005 + 1e-6 * slowest, (iteration, name, values, slowest)


def test_slowest_is_each_timers_max_over_the_ranks_that_ran_it():
    """Megatron-LM's ``Timers.write``: the max over the ranks; a timer no rank ran (0.0 everywhere) is left out."""
    assert slowest(["a", "b", "c"], [[0.5, 0.0, 0.0], [0.25, 0.0, 0.75]]) == {"a": 0.5, "c": 0.75}


@pytest.mark.parametrize("level,world", [(0, 1), (1, 2)], ids=["level0", "level1-pp2"])
def test_timer_scalars_follow_the_tensorboard_log_interval(tmp_path, level, world):
    """--log-timers-to-tensorboard writes every --tensorboard-log-interval iterations, as Megatron-LM's
    training_log calls Timers.write (normalised by the iterations since the last line, not reset), like every
    other scalar; the timers were written at the log line's iterations only (2 and 4 here, not 1 to 4)."""
    argv = TINY + ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "2", "--timing-log-level", str(level),
                   "--tensorboard-dir", str(tmp_path / "tb"), "--tensorboard-log-interval", "1",
                   "--log-timers-to-tensorboard"] + (["--pipeline-model-parallel-size", "2"] if world == 2 else [])
    run_distributed(_train, world, argv, timeout=180)
    scalars = _scalars(tmp_path / "tb")
    for name in NAMES:
        steps = dict(scalars[f"{name}-time"])
        assert sorted(steps) == [1, 2, 3, 4] and min(steps.values()) > 0.0, (name, steps)
