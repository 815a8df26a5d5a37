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


@pytest.mark.parametrize("wsd_style,coeff", [
    # Megatron-LM's OptimizerParamScheduler.get_lr, lr_decay_style "WSD": r = steps into the anneal / its length.
    ("exponential", lambda r: 2.0 * 0.5 ** r - 1.0),
    ("linear", lambda r: 1.0 - r),
    ("cosine", lambda r: 0.5 * (math.cos(math.pi * r) + 1.0)),
    ("minus_sqrt", lambda r: 1.0 - math.sqrt(r)),
])
def test_wsd_holds_the_peak_then_anneals_over_its_last_samples(wsd_style, coeff):
    """Megatron-LM's warmup-stable-decay (--lr-decay-style WSD --lr-wsd-decay-style S --lr-wsd-decay-iters N):
    warmup, --lr until the last N x global batch samples of the decay, then S down to --min-lr."""
    max_lr, min_lr = 1e-3, 1e-4
    sched = _scheduler("WSD", warmup=10, decay=110, max_lr=max_lr, min_lr=min_lr, wsd_decay_steps=40,
                       lr_wsd_decay_style=wsd_style)
    assert _lr_at(sched, 5) == pytest.approx(0.5 * max_lr)
    for step in (10, 40, 70):  # the stable phase ends where the anneal starts: 110 - 40
        assert _lr_at(sched, step) == pytest.approx(max_lr, rel=1e-12)
    for step in (71, 85, 100, 110):
        assert _lr_at(sched, step) == pytest.approx(min_lr + coeff((step - 70) / 40) * (max_lr - min_lr), rel=1e-12)
    assert _lr_at(sched, 150) == pytest.approx(min_lr)


def test_wsd_flags_and_checkpoint():
    c = scheduler_config(_args("--train-iters", "100", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20",
                               "--lr-wsd-decay-style", "linear"))
    assert (c.lr_decay_style, c.wsd_decay_steps, c.lr_wsd_decay_style) == ("WSD", 160, "linear")
    c = scheduler_config(_args("--train-samples", "400", "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "100"))
    assert (c.wsd_decay_steps, c.lr_wsd_decay_style) == (100, "exponential")  # Megatron-LM's default style
    with pytest.raises(ConfigError, match="^--lr-decay-style WSD needs --lr-wsd-decay-iters"):
        _args("--train-iters", "100", "--lr-decay-style", "WSD")
    with pytest.raises(ConfigError, match="^with --train-samples give the schedule in samples"):
        _args("--train-samples", "400", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "10")
    with pytest.raises(ConfigError, match="^--lr-wsd-decay-iters 200 is longer than the decay"):
        _args("--train-iters", "100", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "200")
    # Resumed: the anneal's length and style are part of the saved schedule.
    a = _scheduler("WSD", wsd_decay_steps=40, lr_wsd_decay_style="cosine")
    a.step(90)
    b = _scheduler("WSD", wsd_decay_steps=40, lr_wsd_decay_style="cosine")
    b.load_state_dict(a.state_dict())
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]
    with pytest.raises(ConfigError, match="wsd_decay_steps = 40 but the flags give 20"):
        _scheduler("WSD", wsd_decay_steps=20, lr_wsd_decay_style="cosine").load_state_dict(a.state_dict())
    _scheduler("cosine").load_state_dict(_scheduler("cosine").state_dict())  # no anneal: nothing to compare
