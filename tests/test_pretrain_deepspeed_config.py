"""pretrain_gpt.py --deepspeed-config FILE: the file's ZeRO, precision, clipping, batch and optimizer sections
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



def test_megatron_deepspeeds_switch_is_accepted(tmp_path):
    """Megatron-DeepSpeed's scripts pass ``--deepspeed --deepspeed_config FILE``; --deepspeed was an unrecognized
    argument. It changes nothing with the file, and alone (no file to apply) is one line."""
    path = _file(tmp_path, zero_optimization={"stage": 2})
    plain = config_from_args(validate_args(parse_args(BASE + ["--deepspeed_config", path]), world_size=2))
    switched = config_from_args(validate_args(parse_args(BASE + ["--deepspeed", "--deepspeed_config", path]),
                                              world_size=2))
    assert switched == plain and switched.ddp.zero_stage == 2
    with pytest.raises(ConfigError, match="--deepspeed needs --deepspeed_config FILE") as info:
        validate_args(parse_args(TINY + ["--deepspeed"]), world_size=2)
    assert "\n" not in str(info.value)


def test_consecutive_hysteresis_reaches_the_loss_scaler(tmp_path):
    """``fp16.consecutive_hysteresis`` (DeepSpeed's) was refused; from the file it sets --consecutive-hysteresis."""
    path = _file(tmp_path, fp16={"enabled": True, "consecutive_hysteresis": True})
    run = config_from_args(validate_args(parse_args(BASE + ["--deepspeed-config", path]), world_size=2))
    assert run.optimizer.fp16 and run.optimizer.consecutive_hysteresis
    flag = config_from_args(validate_args(parse_args(TINY + ["--fp16", "--consecutive-hysteresis"]), world_size=2))
    assert flag.optimizer.consecutive_hysteresis


@pytest.mark.parametrize("extra,needle", [
    (["--micro-batch-size", "4"], "--micro-batch-size 4 disagrees with the DeepSpeed config"),
    (["--data-parallel-sharding-strategy", "optim_grads"],
     "--data-parallel-sharding-strategy \\(ZeRO stage 2\\) disagrees with the DeepSpeed config"),
    (["--zero-stage", "3"], "--zero-stage 3 disagrees"),
    # The file has no stage3 key: DeepSpeed's defaults (5e7, 1e5) applied, and the flags were replaced silently.
    (["--stage3-prefetch-bucket-size", "1000"], "--stage3-prefetch-bucket-size 1000 disagrees with the DeepSpeed "
     "config, which sets stage3_prefetch_bucket_size = 50000000"),
    (["--stage3-param-persistence-threshold", "1200"], "--stage3-param-persistence-threshold 1200 disagrees"),
])
def test_flags_that_disagree_with_the_file_are_one_line_errors(tmp_path, extra, needle):
    path = _file(tmp_path, zero_optimization={"stage": 1})
    with pytest.raises(ConfigError, match=needle) as info:
        validate_args(parse_args(BASE + ["--deepspeed-config", path] + extra), world_size=2)
    assert "\n" not in str(info.value)


def test_a_flag_given_at_its_default_is_compared_with_the_file(tmp_path):
    """--clip-grad 1.0 is --clip-grad's default: taken for a flag left alone, the file's 0.5 replaced it silently."""
    path = _file(tmp_path, gradient_clipping=0.5)
    with pytest.raises(ConfigError, match="--clip-grad 1.0 disagrees with the DeepSpeed config"):
        validate_args(parse_args(BASE + ["--deepspeed-config", path, "--clip-grad", "1.0"]), world_size=2)
    run = config_from_args(validate_args(parse_args(BASE + ["--deepspeed-config", path]), world_size=2))
    assert run.optimizer.clip_grad == 0.5


@pytest.mark.parametrize("file_stage,extra,stage", [
    (1, ["--use-distributed-optimizer"], 1), (2, ["--use-distributed-optimizer"], 2),
    (3, ["--data-parallel-sharding-strategy", "optim_grads_params"], 3), (0, ["--use-distributed-optimizer"], None),
])
def test_megatron_zero_flags_that_agree_with_the_file_are_accepted(tmp_path, file_stage, extra, stage):
    """tools/autotune.py writes a torchrun line with --use-distributed-optimizer (its ZeRO-1 pick) and a DeepSpeed
    JSON with stage 1; run together they were refused ("--deepspeed-config sets the ZeRO stage"), though they
    agree. Agreeing is fine as for --zero-stage; stage 0 in the file contradicts the flag."""
    path = _file(tmp_path, zero_optimization={"stage": file_stage})
    argv = BASE + ["--deepspeed-config", path] + extra
    if stage is None:
        with pytest.raises(ConfigError, match=r"--use-distributed-optimizer \(ZeRO stage 1\) disagrees .*stage = 0"):
            validate_args(parse_args(argv), world_size=2)
        return
    assert config_from_args(validate_args(parse_args(argv), world_size=2)).ddp.zero_stage == stage


def test_training_from_the_file_equals_the_same_flags(tmp_path):
    path = _file(tmp_path, zero_optimization={"stage": 1})
    flags = _logged(run_distributed(_train, 2, TINY + ["--use-distributed-optimizer", "--train-iters", "4"],
                                    timeout=180))
    from_file = _logged(run_distributed(_train, 2, BASE + ["--deepspeed-config", path, "--train-iters", "4"],
                                        timeout=180))
    assert from_file.losses == flags.losses


NO_LR = [a for a in BASE]
del NO_LR[NO_LR.index("--lr"):NO_LR.index("--lr") + 2]


@pytest.mark.parametrize("section,expected", [
    ({"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.2}},
     dict(optimizer="adam", lr=1e-3, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, weight_decay=0.2)),
    ({"type": "SGD", "params": {"lr": 2e-3, "momentum": 0.5, "weight_decay": 0.0}},
     dict(optimizer="sgd", lr=2e-3, sgd_momentum=0.5, weight_decay=0.0)),
])
def test_the_optimizer_section_sets_the_optimizer(tmp_path, section, expected):
    # It was read and then dropped: the run used --lr and the flags' defaults (weight decay 0.01, betas 0.9/0.999).
    path = _file(tmp_path, optimizer=section)
    run = config_from_args(validate_args(parse_args(NO_LR + ["--deepspeed-config", path]), world_size=2))
    assert {name: getattr(run.optimizer, name) for name in expected} == expected


def test_a_flag_that_disagrees_with_the_optimizer_section_is_a_one_line_error(tmp_path):
    path = _file(tmp_path, optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match="--lr 0.003 disagrees with the DeepSpeed config") as info:
        validate_args(parse_args(BASE + ["--deepspeed-config", path]), world_size=2)
    assert "\n" not in str(info.value)
    agreeing = parse_args(NO_LR + ["--lr", "1e-3", "--deepspeed-config", path])
    run = config_from_args(validate_args(agreeing, world_size=2))
    assert run.optimizer.lr == 1e-3


def test_without_an_optimizer_section_the_flags_set_the_optimizer(tmp_path):
    path = _file(tmp_path)
    run = config_from_args(validate_args(parse_args(BASE + ["--weight-decay", "0.05", "--deepspeed-config", path]),
                                         world_size=2))
    assert (run.optimizer.lr, run.optimizer.weight_decay) == (3e-3, 0.05)


def test_the_scheduler_section_is_named_as_not_used(tmp_path, capsys):
    path = _file(tmp_path, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}})
    validate_args(parse_args(BASE + ["--deepspeed-config", path]), world_size=2)
    lines = [line for line in capsys.readouterr().err.splitlines() if "scheduler" in line]
    assert len(lines) == 1 and "--lr-decay-style" in lines[0], lines


def test_reduce_bucket_size_sets_the_gradient_buckets(tmp_path):
    """``zero_optimization.reduce_bucket_size`` was parsed and dropped: the run kept 40M-element buckets, so a
    model under that size stayed one bucket under ZeRO-3 (its whole parameters gathered at once), silently."""
    path = _file(tmp_path, zero_optimization={"stage": 3, "reduce_bucket_size": 2_000_000})
    run = config_from_args(validate_args(parse_args(BASE + ["--deepspeed-config", path]), world_size=2))
    assert run.ddp.bucket_size == 2_000_000
    unset = _file(tmp_path, zero_optimization={"stage": 3})  # DeepSpeed's default, as for the other keys
    run = config_from_args(validate_args(parse_args(BASE + ["--deepspeed-config", unset]), world_size=2))
    assert run.ddp.bucket_size == 500_000_000


def test_ddp_bucket_size_flag_sets_the_buckets_and_is_compared_with_the_file(tmp_path):
    """Megatron-LM's ``--ddp-bucket-size`` (elements) was an unrecognized argument."""
    run = config_from_args(validate_args(parse_args(TINY + ["--zero-stage", "3", "--ddp-bucket-size", "1000"]),
                                         world_size=2))
    assert run.ddp.bucket_size == 1000
    assert config_from_args(validate_args(parse_args(TINY), world_size=2)).ddp.bucket_size == 40_000_000
    with pytest.raises(ConfigError, match=r"\(--ddp-bucket-size\) must be >= 1") as info:
        config_from_args(validate_args(parse_args(TINY + ["--ddp-bucket-size", "0"]), world_size=2))
    assert "\n" not in str(info.value)
    path = _file(tmp_path, zero_optimization={"stage": 3, "reduce_bucket_size": 2_000_000})
    with pytest.raises(ConfigError, match=r"--ddp-bucket-size 1000 disagrees with the DeepSpeed config, which sets "
                                          r"zero_optimization.reduce_bucket_size = 2000000") as info:
        validate_args(parse_args(BASE + ["--deepspeed-config", path, "--ddp-bucket-size", "1000"]), world_size=2)
    assert "\n" not in str(info.value)
    agreeing = BASE + ["--deepspeed-config", path, "--ddp-bucket-size", "2000000"]
    assert config_from_args(validate_args(parse_args(agreeing), world_size=2)).ddp.bucket_size == 2_000_000


def test_auto_values_take_the_runs_flags_as_hugging_faces_integration_does(tmp_path):
    """A Hugging Face-style file (``"auto"`` for the batch, clipping, precision and ZeRO-3 sizes) was refused with
    "pass args= ... to initialize()", which a pretrain_gpt.py user cannot do. The flags now fill them in, with
    Hugging Face's rules for the sizes (hidden_size ** 2, 0.9 x that, 10 x hidden_size; TINY's hidden size 32)."""
    path = _file(tmp_path, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                 gradient_clipping="auto", bf16={"enabled": "auto"},
                 zero_optimization={"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                    "stage3_param_persistence_threshold": "auto"})
    run = config_from_args(validate_args(parse_args(TINY + ["--clip-grad", "0.5", "--deepspeed-config", path]),
                                         world_size=2))
    assert (run.training.micro_batch_size, run.training.global_batch_size, run.optimizer.clip_grad) == (2, 8, 0.5)
    assert not run.optimizer.bf16
    assert (run.ddp.bucket_size, run.ddp.stage3_prefetch_bucket_size, run.ddp.stage3_param_persistence_threshold) \
        == (32 * 32, int(0.9 * 32 * 32), 320)


def test_an_auto_no_flag_fills_names_the_flag_not_initialize(tmp_path):
    """``total_num_steps: "auto"`` in a run counted in samples (no --train-iters): the error said "pass args= with
    args.max_steps ... to initialize()", the engine's advice, which a pretrain_gpt.py user cannot follow."""
    path = _file(tmp_path, scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}})
    i = BASE.index("--train-iters")
    by_samples = BASE[:i] + ["--train-samples", "160"] + BASE[i + 2:]
    with pytest.raises(ConfigError, match=r'^--deepspeed-config: scheduler.params.total_num_steps is "auto" and no '
                                          r"flag of this run fills it; give --train-iters, or write the value in the "
                                          r"file$"):
        validate_args(parse_args(by_samples + ["--deepspeed-config", path]), world_size=2)
    unknown = _file(tmp_path, optimizer={"type": "auto"})
    with pytest.raises(ConfigError, match=r'optimizer.type is "auto" and no flag of this run fills it; write the '
                                          r"value in the file$"):
        validate_args(parse_args(BASE + ["--deepspeed-config", unknown]), world_size=2)


def test_an_auto_a_flag_fills_with_a_refused_value_names_the_flag(tmp_path):
    """An "auto" filled from a flag with a value the file's check refuses names that flag, which the file does not
    show. Hugging Face's ZeRO files say ``"warmup_num_steps": "auto"``: --lr-warmup-iters' default 0 filled it and was
    refused ("must be > 0, got 0") for a scheduler section pretrain_gpt.py does not even use; it is now filled as
    Hugging Face fills it, ``max(1, warmup)``."""
    path = _file(tmp_path, optimizer={"type": "AdamW", "params": {"eps": "auto"}})
    with pytest.raises(ConfigError, match=r"^DeepSpeed config: optimizer.params.eps must be >= 0.0, got -1.0 "
                                          r'\(its "auto" took --adam-eps: give that flag, or write the value '
                                          r"in the file\)$"):
        validate_args(parse_args(BASE + ["--adam-eps", "-1", "--deepspeed-config", path]), world_size=2)
    path = _file(tmp_path, scheduler={"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto",
                                                                          "total_num_steps": "auto"}})
    i = BASE.index("--lr-warmup-iters")
    no_warmup = BASE[:i] + BASE[i + 2:]
    validate_args(parse_args(no_warmup + ["--deepspeed-config", path]), world_size=2)
    run = config_from_args(validate_args(parse_args(BASE + ["--deepspeed-config", path]), world_size=2))
    assert run.training.global_batch_size == 8
