"""OptimizerParamScheduler against hand-computed values of Megatron-LM's formulas."""
import math

import pytest
import torch

from megatron_core.training.arguments import parse_args
from megatron_core.training.arguments.to_config import scheduler_config
from megatron_core.training.arguments.validate import validate_args
from megatron_core.training.errors import ConfigError
from megatron_core.training.lr_scheduler import OptimizerParamScheduler


def _optimizer():
    w, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1.0)


def _scheduler(style, warmup=10, decay=110, init_lr=0.0, max_lr=1e-3, min_lr=1e-4, **kw):
    return OptimizerParamScheduler(_optimizer(), init_lr, max_lr, min_lr, warmup, decay, style,
                                   kw.pop("start_wd", 0.1), kw.pop("end_wd", 0.1), kw.pop("wd_steps", 100),
                                   kw.pop("wd_style", "constant"), **kw)


def _lr_at(sched, step):
    sched.step(step - sched.num_steps)
    return sched.optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("style", ["linear", "cosine", "constant", "inverse-square-root"])
def test_warmup_is_linear_from_init_lr(style):
    s = _scheduler(style, init_lr=1e-5)
    assert _lr_at(s, 0) == pytest.approx(1e-5)
    assert _lr_at(s, 5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert _lr_at(s, 10) == pytest.approx(1e-3)


def test_decay_styles_match_closed_forms():
    # Decay runs over steps 10..110; a quarter of the way is step 35, half is step 60.
    lin, cos = _scheduler("linear"), _scheduler("cosine")
    assert _lr_at(lin, 35) == pytest.approx(1e-4 + 0.75 * 9e-4)
    assert _lr_at(cos, 60) == pytest.approx((1e-3 + 1e-4) / 2)
    assert _lr_at(cos, 35) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    for s in (lin, cos):
        assert _lr_at(s, 110) == pytest.approx(1e-4)
        assert _lr_at(s, 500) == pytest.approx(1e-4)  # stays at --min-lr after the decay
    const = _scheduler("constant")
    assert _lr_at(const, 500) == pytest.approx(1e-3)
    isr = _scheduler("inverse-square-root")
    assert _lr_at(isr, 40) == pytest.approx(1e-3 * math.sqrt(10) / math.sqrt(40))


def test_weight_decay_increment_and_no_decay_group():
    s = _scheduler("linear", start_wd=0.0, end_wd=0.2, wd_steps=100, wd_style="linear")
    s.step(50)
    groups = s.optimizer.param_groups
    assert groups[0]["weight_decay"] == pytest.approx(0.1)
    assert groups[1]["weight_decay"] == 0.0  # biases and norms never decay


def test_state_dict_resumes_and_checks_settings():
    a = _scheduler("cosine")
    a.step(47)
    b = _scheduler("cosine")
    b.load_state_dict(a.state_dict())
    assert b.num_steps == 47
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(a.optimizer.param_groups[0]["lr"])
    other = _scheduler("cosine", max_lr=2e-3)
    with pytest.raises(ConfigError, match="max_lr.*override-opt-param-scheduler"):
        other.load_state_dict(a.state_dict())
    ours = _scheduler("cosine", max_lr=2e-3, override_opt_param_scheduler=True)
    ours.load_state_dict(a.state_dict())
    assert ours.max_lr == 2e-3 and ours.num_steps == 47


def _args(*extra, world=1):
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--mock-data",
            "--vocab-size", "128", *extra]
    return validate_args(parse_args(argv), world)


def test_schedule_is_counted_in_samples():
    c = scheduler_config(_args("--train-iters", "100", "--lr-warmup-iters", "10", "--lr-decay-iters", "80"))
    assert (c.lr_warmup_steps, c.lr_decay_steps, c.wd_incr_steps) == (80, 640, 800)
    c = scheduler_config(_args("--train-iters", "100", "--lr-warmup-fraction", "0.1"))
    assert c.lr_decay_steps == 800 and c.lr_warmup_steps == pytest.approx(80)
    c = scheduler_config(_args("--train-samples", "400", "--lr-warmup-samples", "40"))
    assert (c.lr_warmup_steps, c.lr_decay_steps) == (40, 400)
