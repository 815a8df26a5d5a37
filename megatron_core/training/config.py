"""The typed configuration tree of a training run: ``RunConfig`` and the sections only the trainer reads.

``pretrain_gpt.py``'s flags are parsed and validated once
(``megatron_core.training.arguments.config_from_args``) into a :class:`RunConfig`; a DeepSpeed-style
JSON config builds the same dataclasses. Nothing below the entry point sees ``argparse``. The
model, optimizer and data-parallel sections are the library's own dataclasses
(``TransformerConfig``, ``OptimizerConfig``, ``DistributedDataParallelConfig``); the others are here.
Units: iterations unless a name says samples; the schedule (``SchedulerConfig``) is in samples, as
Megatron-LM's ``OptimizerParamScheduler``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_core.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megatron_core.optimizer.optimizer_config import OptimizerConfig
from megatron_core.transformer.config import TransformerConfig


@dataclass
class TrainingConfig:
    """Batch sizes, length of training, evaluation cadence and when to stop."""

    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    rampup_batch_size: list[int] | None = None
    train_samples: int | None = None
    eval_interval: int = 1000
    eval_iters: int = 100
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = True
    skip_train: bool = False
    eval_at_start: bool = False
    seed: int = 1234
    deterministic_mode: bool = False
    check_for_nan_in_loss_and_grad: bool = True  # Megatron-LM's flag; stop before a non-finite step lands
    max_skipped_iters_at_min_loss_scale: int = 10  # fp16: stop after this many skips at the lowest scale (0: never)
    # Megatron-LM's per-iteration extras (megatron_core.training.iteration_hooks)
    manual_gc: bool = False
    manual_gc_interval: int = 0
    manual_gc_eval: bool = True
    empty_unused_memory_level: int = 0
    profile: bool = False
    use_pytorch_profiler: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class DataConfig:
    """Where samples come from and how they are tokenized."""

    seq_length: int
    data_path: list[str] | None = None
    train_data_path: list[str] | None = None  # per-split prefixes (Megatron-LM's flags), instead of data_path
    valid_data_path: list[str] | None = None
    test_data_path: list[str] | None = None
    mock_data: bool = False
    split: str = "969,30,1"
    data_cache_path: str | None = None
    num_workers: int = 2
    eod_mask_loss: bool = False
    reset_position_ids: bool = False  # positions restart at 0 after each EOD (Megatron-LM's flag)
    reset_attention_mask: bool = False  # tokens after an EOD attend only to their own document
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 128

    @property
    def every_chunk_reads_data(self) -> bool:
        """Whether every pipeline chunk reads the samples, not only the first and the last: the middle ones
        need the per-document position ids (RoPE) and attention mask of each micro batch."""
        return self.reset_position_ids or self.reset_attention_mask


@dataclass
class CheckpointConfig:
    """Where checkpoints go, how often, and what a load restores."""

    save: str | None = None
    save_interval: int | None = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    load: str | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    ckpt_step: int | None = None
    exit_on_missing_checkpoint: bool = False
    # torch_dist: torch.distributed.checkpoint, resumes under any layout; torch: Megatron-LM's legacy per-rank
    # files. None: torch_dist, except a run resuming a legacy checkpoint keeps saving legacy
    # (dist_checkpoint.save_format). A load reads either format.
    ckpt_format: str | None = None
    async_save: bool = False  # torch_dist: write in the background while training goes on
    # Megatron-LM's --ckpt-convert-format / --ckpt-convert-save: write the loaded checkpoint in that format to
    # CKPT_CONVERT_SAVE/FORMAT and stop (a legacy distributed optimizer's shards become loadable at any DP size).
    ckpt_convert_format: str | None = None
    ckpt_convert_save: str | None = None


TIMING_LOG_OPTIONS = ("max", "minmax", "all")
"""Megatron-LM's ``--timing-log-option`` choices (``Timers.log``)."""


@dataclass
class LoggingConfig:
    """Log-line cadence and TensorBoard."""

    log_interval: int = 100
    log_throughput: bool = False
    timing_log_level: int = 0
    # With timing_log_level >= 1, Megatron-LM's block after the line: the times of every rank, gathered, shown
    # as the slowest (max), the fastest and slowest (minmax, Megatron-LM's default) or each rank's (all)
    timing_log_option: str = "minmax"
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1
    tensorboard_queue_size: int = 1000
    log_params_norm: bool = False
    log_timers_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    log_world_size_to_tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.timing_log_option not in TIMING_LOG_OPTIONS:
            raise ValueError(f"timing_log_option (--timing-log-option) {self.timing_log_option!r} is not one of "
                             f"{', '.join(TIMING_LOG_OPTIONS)}")


@dataclass
class SchedulerConfig:
    """The learning-rate / weight-decay schedule, in samples (Megatron-LM's OptimizerParamScheduler)."""

    lr: float
    min_lr: float
    lr_decay_style: str
    lr_warmup_init: float
    lr_warmup_steps: float
    lr_decay_steps: float
    start_weight_decay: float
    end_weight_decay: float
    wd_incr_steps: float
    weight_decay_incr_style: str = "constant"
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    wsd_decay_steps: float | None = None  # lr_decay_style "WSD": the anneal's length in samples
    lr_wsd_decay_style: str = "exponential"


@dataclass
class ParallelConfig:
    """The parallel layout and process-group options (Megatron-LM's distributed flags).

    ``world_size`` = TP x PP x DP; ranks are laid out ``tp-cp-ep-dp-pp`` by ``ParallelState``.
    """

    world_size: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    distributed_backend: str = "gloo"
    distributed_timeout_minutes: int = 10

    @property
    def data_parallel_size(self) -> int:
        """Ranks holding the same model shard: world size / (TP x PP)."""
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


@dataclass
class ModelConfig:
    """What builds the GPT besides the transformer: the position table and the architecture's spec.

    ``spec`` is ``(module, function)`` of a custom layer spec (Megatron-LM's ``--spec``), or None
    for the built-in one chosen by ``transformer.attention_backend``.
    """

    transformer: TransformerConfig
    max_position_embeddings: int
    spec: tuple[str, str] | None = None


@dataclass
class ModelInfo:
    """The ``model_info`` entry of a checkpoint (docs/design.md): what a load checks besides the
    transformer config. Stored as a plain dict (``to_dict``) so checkpoints hold no pickled classes."""

    vocab_size: int
    padded_vocab_size: int
    seq_length: int
    max_position_embeddings: int
    position_embedding_type: str
    share_embeddings_and_output_weights: bool
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    make_vocab_size_divisible_by: int = 128

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (loadable with ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    """Everything a training run needs, one typed section per concern.

    Built from ``pretrain_gpt.py``'s flags by ``megatron_core.training.arguments.config_from_args``
    (or by hand: every section has defaults except the model, the batch and the schedule).
    """

    model: ModelConfig
    training: TrainingConfig
    data: DataConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    ddp: DistributedDataParallelConfig = field(default_factory=DistributedDataParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def model_info(self, vocab_size: int, padded_vocab_size: int) -> ModelInfo:
        """The checkpoint's ``model_info`` for a tokenizer of ``vocab_size`` tokens padded to ``padded_vocab_size``."""
        t, p = self.model.transformer, self.parallel
        return ModelInfo(
            vocab_size=vocab_size, padded_vocab_size=padded_vocab_size, seq_length=self.data.seq_length,
            max_position_embeddings=self.model.max_position_embeddings,
            position_embedding_type=t.position_embedding_type,
            share_embeddings_and_output_weights=t.share_embeddings_and_output_weights,
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            make_vocab_size_divisible_by=self.data.make_vocab_size_divisible_by)
