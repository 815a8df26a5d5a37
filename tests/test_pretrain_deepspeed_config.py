"""pretrain_gpt.py --deepspeed-config FILE: the file's ZeRO, precision, clipping and batch sections
become the run's typed config (through the engine's DeepSpeed parser); disagreeing flags are refused."""
import json

import pytest
from harness import run_distributed
from test_pretrain import TINY, _logged, _train

from megatron_core.errors import ConfigError
from megatron_core.training.arguments import config_from_args, parse_args
from megatron_core.training.arguments.validate import validate_args

BASE = [a for a in TINY]  # micro 2, global 8 in TINY: the file below says the same
for flag in ("--micro-batch-size", "--global-batch-size"):
    i = BASE.index(flag)
    del BASE[i:i + 2]


def _file(tmp_path, **sections):
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
              **sections}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_file_sections_become_the_typed_config(tmp_path):
    path = _file(tmp_path, zero_optimization={"stage": 2, "overlap_comm": True}, bf16={"enabled": True})
    run = config_from_args(validate_args(parse_args(BASE + ["--deepspeed-config", path]), world_size=2))
    assert (run.training.micro_batch_size, run.training.global_batch_size) == (2, 8)  # 2 x 2 x DP 2
    assert (run.ddp.zero_stage, run.ddp.overlap_grad_reduce, run.optimizer.bf16, run.optimizer.clip_grad) == \
        (2, True, True, 1.0)


@pytest.mark.parametrize("extra,needle", [
    (["--micro-batch-size", "4"], "--micro-batch-size 4 disagrees with the DeepSpeed config"),
    (["--use-distributed-optimizer"], "--deepspeed-config sets the ZeRO stage"),
    (["--zero-stage", "3"], "--zero-stage 3 disagrees"),
])
def test_flags_that_disagree_with_the_file_are_one_line_errors(tmp_path, extra, needle):
    path = _file(tmp_path, zero_optimization={"stage": 1})
    with pytest.raises(ConfigError, match=needle) as info:
        validate_args(parse_args(BASE + ["--deepspeed-config", path] + extra), world_size=2)
    assert "\n" not in str(info.value)


def test_training_from_the_file_equals_the_same_flags(tmp_path):
    path = _file(tmp_path, zero_optimization={"stage": 1})
    flags = _logged(run_distributed(_train, 2, TINY + ["--use-distributed-optimizer", "--train-iters", "4"],
                                    timeout=180))
    from_file = _logged(run_distributed(_train, 2, BASE + ["--deepspeed-config", path, "--train-iters", "4"],
                                        timeout=180))
    assert from_file.losses == flags.losses
