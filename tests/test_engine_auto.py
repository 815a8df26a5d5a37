"""The ZeRO sizes' ``"auto"`` values taken from the model's width as Hugging Face's integration finds it
(``HfTrainerDeepSpeedConfig.trainer_config_finalize``): ``config.hidden_size``, else the largest of
``config.hidden_sizes`` (convolutional models), else the same of ``config.text_config`` (multimodal models).
test_engine_config.py has the values taken from the training arguments."""

import types

import pytest
from engine_common import config_with
from transformers import LlavaConfig, ResNetConfig

from megatron_core.engine import load_config
from megatron_core.errors import ConfigError

ZERO3_AUTO = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
              "stage3_param_persistence_threshold": "auto"}


@pytest.mark.parametrize("model_config, hidden", [
    (types.SimpleNamespace(hidden_size=32, hidden_sizes=[8, 64]), 32),  # hidden_size comes first
    (ResNetConfig(hidden_sizes=[8, 24, 16]), 24),
    (LlavaConfig(text_config={"model_type": "llama", "hidden_size": 40, "num_attention_heads": 4}), 40),
    (types.SimpleNamespace(text_config=types.SimpleNamespace(hidden_sizes=[12, 20])), 20),
], ids=["hidden_size", "resnet-hidden_sizes", "llava-text_config", "text_config-hidden_sizes"])
def test_zero_sizes_follow_hugging_faces_hidden_size_lookup(model_config, hidden):
    model = types.SimpleNamespace(config=model_config)
    zero = load_config(config_with(zero_optimization=dict(ZERO3_AUTO)), dp_size=1, model=model).zero_optimization
    assert (zero.reduce_bucket_size, zero.stage3_prefetch_bucket_size, zero.stage3_param_persistence_threshold) == (
        hidden * hidden, int(0.9 * hidden * hidden), 10 * hidden)


def test_a_model_without_a_width_leaves_auto_named():
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_labels=2))
    with pytest.raises(ConfigError, match="reduce_bucket_size"):
        load_config(config_with(zero_optimization=dict(ZERO3_AUTO)), dp_size=1, model=model)


AUTO_WARMUP = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto"}}


@pytest.mark.parametrize("training_args, warmup", [
    ({"warmup_steps": 5}, 5),
    ({"warmup_steps": 0}, 1),  # TrainingArguments' default: at least 1, as DeepSpeed >= 0.19.6 requires
    ({"warmup_steps": 0.1}, 10),  # transformers 5: a float below 1 is a ratio of the training steps
    ({"warmup_steps": 0, "warmup_ratio": 0.05}, 5),  # transformers 4's separate ratio
    ({"warmup_steps": 0.001}, 1),  # ceil(100 x 0.001) = 1
], ids=["steps", "none", "ratio-v5", "ratio-v4", "tiny-ratio"])
def test_warmup_steps_follow_hugging_faces_get_warmup_steps(training_args, warmup):
    """Hugging Face fills ``warmup_num_steps`` with ``max(1, args.get_warmup_steps(num_training_steps))``. Before,
    ``args.warmup_steps`` was copied as it was: its default 0 and a ratio (0.1) were errors naming the key, and
    ``warmup_ratio`` was not read."""
    args = types.SimpleNamespace(max_steps=100, **training_args)
    scheduler = load_config(config_with(scheduler=AUTO_WARMUP), dp_size=1, args=args).scheduler
    assert scheduler is not None and scheduler.params["warmup_num_steps"] == warmup
    assert scheduler.params["total_num_steps"] == 100


def test_a_warmup_ratio_without_max_steps_stays_auto_and_is_named():
    """A ratio needs the number of training steps, which only a positive ``max_steps`` gives here."""
    args = types.SimpleNamespace(max_steps=-1, warmup_steps=0.1)
    with pytest.raises(ConfigError, match="warmup_num_steps"):
        load_config(config_with(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}), dp_size=1,
                    args=args)
