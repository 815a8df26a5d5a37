"""The model shape and parallel layout the autotuner reasons about (plain data, no process groups)."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from megatron_core.transformer.config import TransformerConfig

if TYPE_CHECKING:
    from megatron_core.training.config import RunConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    """One candidate parallel layout (Megatron-LM's flag in brackets).

    ``vpp`` is the number of virtual pipeline stages per rank (None: no interleaving; derived from
    ``--num-layers-per-virtual-pipeline-stage``). ``zero_stage`` is DeepSpeed's ZeRO stage (1 is
    Megatron's ``--use-distributed-optimizer``); ``offload`` moves fp32 main parameters and optimizer
    state to host memory (DeepSpeed's ``offload_optimizer``). ``recompute``: None, ``selective`` or
    ``full``; with ``full``, ``recompute_method`` (``--recompute-method``: ``uniform`` checkpoints groups of
    ``recompute_num_layers`` layers, ``block`` the first ``recompute_num_layers`` layers of each model chunk)
    and ``recompute_num_layers`` (``--recompute-num-layers``); the search's layouts use uniform, 1.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vpp: int | None = None
    zero_stage: int = 0
    micro_batch_size: int = 1
    recompute: str | None = None
    sequence_parallel: bool = False
    offload: bool = False
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1

    @property
    def world_size(self) -> int:
        """Ranks the layout spans: TP x PP x DP."""
        return self.tp * self.pp * self.dp

    def describe(self) -> str:
        """Short form for tables: ``tp2 pp2 v2 dp1 z1 mb2 sel sp``."""
        parts = [f"tp{self.tp}", f"pp{self.pp}"] + ([f"v{self.vpp}"] if self.vpp else []) + [
            f"dp{self.dp}", f"z{self.zero_stage}", f"mb{self.micro_batch_size}"]
        if self.recompute:
            parts.append({"selective": "sel", "full": "full"}[self.recompute])
        if self.recompute == "full" and (self.recompute_method, self.recompute_num_layers) != ("uniform", 1):
            parts.append(f"{self.recompute_method}{self.recompute_num_layers}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.offload:
            parts.append("off")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What fixes the parameter and activation sizes: the transformer config (its parallel and
    recompute fields are ignored: the layout sets them), the vocabulary before padding
    (``--make-vocab-size-divisible-by`` x TP pads it, as pretrain_gpt.py does), positions and sequence.
    ``document_mask``: ``--reset-attention-mask``, each micro batch's [b, 1, s, s] bool document mask, with
    which attention takes its masked path (see :mod:`.activations`). ``rampup_batch_size``:
    ``--rampup-batch-size`` (start, increment, samples), or None (:meth:`batch_sizes`)."""

    config: TransformerConfig
    vocab_size: int
    seq_length: int
    max_position_embeddings: int
    global_batch_size: int
    make_vocab_size_divisible_by: int = 128
    bytes_per_param: int = 4
    grad_bytes: int = 4
    document_mask: bool = False
    rampup_batch_size: tuple[int, int, int] | None = None

    def padded_vocab(self, tp: int) -> int:
        """Megatron-LM's padding: the next multiple of ``make_vocab_size_divisible_by * TP``."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def ffn_hidden_size(self) -> int:
        """The MLP width the config resolved (``TransformerConfig`` fills in 4h when unset)."""
        return int(self.config.ffn_hidden_size or 4 * self.config.hidden_size)

    @property
    def num_query_groups(self) -> int:
        """Key/value heads (the number of query heads without grouped-query attention)."""
        return int(self.config.num_query_groups or self.config.num_attention_heads)

    @property
    def kv_channels(self) -> int:
        """Per-head size."""
        return int(self.config.kv_channels or self.config.hidden_size // self.config.num_attention_heads)

    def batch_sizes(self) -> list[int]:
        """Every global batch the run trains with: ``rampup_batch_size`` (``--rampup-batch-size`` start,
        increment, samples) ramps from start by increment up to ``global_batch_size``, as Megatron-LM's."""
        if self.rampup_batch_size is None:
            return [self.global_batch_size]
        start, increment, _ = self.rampup_batch_size
        return list(range(start, self.global_batch_size, increment)) + [self.global_batch_size]

    def num_microbatches(self, layout: Layout) -> int:
        """Microbatches per iteration on each DP rank: global batch / (micro batch x DP)."""
        return self.global_batch_size // (layout.micro_batch_size * layout.dp)


def from_run_config(config: RunConfig, vocab_size: int,
                    global_batch_size: int | None = None) -> tuple[ModelSpec, Layout]:
    """The model and layout a training run's typed config describes: the one mapping from a
    :class:`~megatron_core.training.config.RunConfig` to the autotuner's terms (``tools/autotune.py``
    and pretrain's theoretical-memory line both use it).

    ``vocab_size``: the model's vocabulary in tokens, before or after padding (padding a padded size
    changes nothing). The ZeRO stage is ``DistributedDataParallelConfig.zero_stage`` (1 for
    ``--use-distributed-optimizer``); gradients are 4 bytes when reduced in fp32 (``grad_reduce_in_fp32``:
    ``--bf16`` without ``--grad-reduce-in-bf16``, or ``--accumulate-allreduce-grads-in-fp32``), else the
    parameters' size; ``recompute`` is the config's ``recompute_granularity``, with its method and number of
    layers under ``full``. ``global_batch_size``: the batch that sets the microbatches (None: the final
    ``--global-batch-size``, with ``--rampup-batch-size`` as the spec's ``rampup_batch_size``, every batch of
    which a layout must split; during the ramp pretrain's theoretical-memory line passes the batch of the
    iteration it is printed at, as Megatron-LM's ``get_num_microbatches()`` there).
    """
    t, p = config.model.transformer, config.parallel
    nbytes = t.params_dtype.itemsize
    rampup = config.training.rampup_batch_size
    ramp = None if rampup is None or global_batch_size else (rampup[0], rampup[1], rampup[2])
    spec = ModelSpec(t, vocab_size, config.data.seq_length, config.model.max_position_embeddings,
                     global_batch_size or config.training.global_batch_size, config.data.make_vocab_size_divisible_by,
                     nbytes, 4 if config.ddp.grad_reduce_in_fp32 else nbytes,
                     document_mask=config.data.reset_attention_mask, rampup_batch_size=ramp)
    layout = Layout(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, dp=p.data_parallel_size,
                    vpp=p.virtual_pipeline_model_parallel_size, zero_stage=config.ddp.zero_stage,
                    micro_batch_size=config.training.micro_batch_size, recompute=t.recompute_granularity,
                    sequence_parallel=t.sequence_parallel, offload=config.optimizer.optimizer_cpu_offload)
    if t.recompute_granularity == "full":  # TransformerConfig has checked both are set
        layout = dataclasses.replace(layout, recompute_method=t.recompute_method or "uniform",
                                     recompute_num_layers=t.recompute_num_layers or 1)
    return spec, layout
