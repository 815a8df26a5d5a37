"""Resolve ``"auto"`` values of a DeepSpeed config as Hugging Face's integration does.

Source: ``transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig`` (``trainer_config_process``
and ``trainer_config_finalize``). Values come from ``args`` (a ``TrainingArguments``, an argparse
namespace or a dict with the same attribute names) and from the model's ``config.hidden_size`` (else the largest
of ``config.hidden_sizes``, else the same of ``config.text_config``, in Hugging Face's order):

================================================  ===============================================
key                                               source
================================================  ===============================================
train_micro_batch_size_per_gpu                    args.per_device_train_batch_size
gradient_accumulation_steps                       args.gradient_accumulation_steps
train_batch_size                                  solved from the other two and the DP size
gradient_clipping                                 args.max_grad_norm
optimizer.params.lr / betas / eps / weight_decay  args.learning_rate / (adam_beta1, adam_beta2) /
                                                  adam_epsilon / weight_decay
scheduler.params.warmup_min_lr                    0
scheduler.params.warmup_max_lr                    args.learning_rate
scheduler.params.warmup_num_steps                 max(1, args.warmup_steps), or a ratio of max_steps
                                                  (warmup_steps < 1, or warmup_ratio), rounded up
scheduler.params.total_num_steps                  args.max_steps
fp16.enabled / bf16.enabled                       args.fp16 / args.bf16
zero_optimization.reduce_bucket_size              hidden_size ** 2
zero_optimization.stage3_prefetch_bucket_size     int(0.9 * hidden_size ** 2)
zero_optimization.stage3_param_persistence_thr.   10 * hidden_size
================================================  ===============================================

A value that cannot be resolved stays ``"auto"`` and :func:`~.config.parse_config` names it.
"""

from __future__ import annotations

import math
from typing import Any

_MISSING = object()


def _arg(args: Any, name: str) -> Any:
    if args is None:
        return _MISSING
    if isinstance(args, dict):
        return args.get(name, _MISSING)
    value = getattr(args, name, _MISSING)
    return _MISSING if value is None else value


def _positive(value: Any) -> Any:
    return value if value is _MISSING or (isinstance(value, (int, float)) and value > 0) else _MISSING


# Where each resolvable "auto" comes from, for the error naming one that stayed unresolved.
ARG_OF_KEY = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
    "optimizer.params.lr": "learning_rate",
    "optimizer.params.betas": "adam_beta1 and adam_beta2",
    "optimizer.params.eps": "adam_epsilon",
    "optimizer.params.weight_decay": "weight_decay",
    "scheduler.params.warmup_max_lr": "learning_rate",
    "scheduler.params.warmup_num_steps": "warmup_steps (a ratio below 1 needs a positive max_steps)",
    "scheduler.params.total_num_steps": "max_steps (a positive number of optimizer steps)",
    "fp16.enabled": "fp16",
    "bf16.enabled": "bf16",
}


def _warmup_steps(args: Any, total: Any) -> Any:
    """``max(1, args.get_warmup_steps(total))``, Hugging Face's fill: ``warmup_steps`` when >= 1, else a ratio of the
    training steps (``warmup_steps`` below 1 in transformers 5, ``warmup_ratio`` in transformers 4), rounded up;
    at least 1 (DeepSpeed >= 0.19.6 refuses 0). A ratio without a known ``total`` stays unresolved."""
    steps = _arg(args, "warmup_steps")
    if steps is _MISSING or isinstance(steps, bool) or not isinstance(steps, (int, float)):
        return steps
    if steps >= 1:
        return int(steps)
    ratio = steps if steps > 0 else _arg(args, "warmup_ratio")
    ratio = 0.0 if ratio is _MISSING else ratio
    if not ratio:
        return 1
    return _MISSING if total is _MISSING else max(1, math.ceil(total * ratio))


def _hidden_size(model: Any) -> Any:
    """The model's width as Hugging Face's integration finds it: ``config.hidden_size``, else the largest of
    ``config.hidden_sizes`` (convolutional models), else the same two of ``config.text_config`` (the language
    model of a multimodal one, such as Llava)."""
    config = getattr(model, "config", None)
    for node in (config, getattr(config, "text_config", None)):
        hidden = getattr(node, "hidden_size", None)
        sizes = getattr(node, "hidden_sizes", None)
        if hidden is None and sizes:
            hidden = max(sizes)
        if hidden is not None:
            return int(hidden)
    return _MISSING


def _set(section: dict | None, key: str, value: Any) -> None:
    if isinstance(section, dict) and section.get(key) == "auto" and value is not _MISSING:
        section[key] = value


def _section(raw: dict, key: str) -> dict:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _sources(model: Any, args: Any) -> dict[str, Any]:
    hidden = _hidden_size(model)
    # Trainer's default max_steps -1 means "from the epochs": a count this function cannot know.
    total = _positive(_arg(args, "max_steps"))
    beta1, beta2 = _arg(args, "adam_beta1"), _arg(args, "adam_beta2")
    return {
        "micro": _arg(args, "per_device_train_batch_size"),
        "gas": _arg(args, "gradient_accumulation_steps"),
        "clip": _arg(args, "max_grad_norm"),
        "lr": _arg(args, "learning_rate"),
        "betas": _MISSING if _MISSING in (beta1, beta2) else [beta1, beta2],
        "eps": _arg(args, "adam_epsilon"),
        "wd": _arg(args, "weight_decay"),
        "warmup": _warmup_steps(args, total),
        "total": total,
        "fp16": _arg(args, "fp16"),
        "bf16": _arg(args, "bf16"),
        "bucket": _MISSING if hidden is _MISSING else hidden * hidden,
        "prefetch": _MISSING if hidden is _MISSING else int(0.9 * hidden * hidden),
        "persistence": _MISSING if hidden is _MISSING else 10 * hidden,
    }


def resolve_auto(raw: dict, model: Any = None, args: Any = None) -> dict:
    """Replace the ``"auto"`` values of ``raw`` (in place, and returned) that ``model``/``args`` determine."""
    src = _sources(model, args)
    _set(raw, "train_micro_batch_size_per_gpu", src["micro"])
    _set(raw, "gradient_accumulation_steps", src["gas"])
    if raw.get("train_batch_size") == "auto" and raw.get("train_micro_batch_size_per_gpu") != "auto":
        raw["train_batch_size"] = None  # solved from the other two and the DP size
    _set(raw, "gradient_clipping", src["clip"])
    opt = _section(raw, "optimizer").get("params")
    for key, name in (("lr", "lr"), ("betas", "betas"), ("eps", "eps"), ("weight_decay", "wd")):
        _set(opt, key, src[name])
    sched = _section(raw, "scheduler").get("params")
    _set(sched, "warmup_min_lr", 0.0)
    for key, name in (("warmup_max_lr", "lr"), ("warmup_num_steps", "warmup"), ("total_num_steps", "total")):
        _set(sched, key, src[name])
    _set(raw.get("fp16"), "enabled", src["fp16"])
    _set(raw.get("bf16"), "enabled", src["bf16"])
    zero = raw.get("zero_optimization")
    for key, name in (
        ("reduce_bucket_size", "bucket"),
        ("stage3_prefetch_bucket_size", "prefetch"),
        ("stage3_param_persistence_threshold", "persistence"),
    ):
        _set(zero, key, src[name])
    return raw
