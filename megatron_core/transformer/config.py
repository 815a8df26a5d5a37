"""``TransformerConfig``: every knob of the transformer, checked once where it is built.

Field names follow Megatron-core's ``TransformerConfig`` (the command-line flag is given where it
differs). Checks that need the parallel layout (tensor/pipeline sizes) live in
:meth:`TransformerConfig.validate_parallel`, called by the model with its ``ParallelState``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from megatron_core.errors import ConfigError
from megatron_core.pipeline_parallel.layer_split import chunk_layer_counts
from megatron_core.tensor_parallel.utils import InitMethod
from megatron_core.transformer.enums import AttnBackend
from megatron_core.transformer.init import seeded_normal_init

_ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "silu", "relu", "squared_relu")
_NORMS = ("LayerNorm", "RMSNorm")
_POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")


def resolved(value: int | None, field: str) -> int:
    """A ``TransformerConfig`` size that ``__post_init__`` fills in when left None (``ffn_hidden_size``,
    ``num_query_groups``, ``kv_channels``). Raises ConfigError naming the field when it is still None."""
    if value is None:
        raise ConfigError(f"TransformerConfig.{field} is None; TransformerConfig.__post_init__ fills it in, so "
                          "build the config with TransformerConfig(...) instead of resetting the field afterwards")
    return value


@dataclass
class TransformerConfig:
    """Shape, architecture, regularisation, initialisation, parallelism and recompute of a transformer."""

    # ---- shape ---------------------------------------------------------------------------------
    num_layers: int = 2
    """Transformer layers in the whole model (``--num-layers``)."""
    hidden_size: int = 64
    """Width of the residual stream (``--hidden-size``)."""
    num_attention_heads: int = 4
    """Query heads (``--num-attention-heads``)."""
    ffn_hidden_size: int | None = None
    """MLP inner width (``--ffn-hidden-size``); None means 4 x hidden_size."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention (``--num-query-groups``); None means one per
    query head (plain multi-head attention), 1 means multi-query attention."""
    kv_channels: int | None = None
    """Per-head size (``--kv-channels``); None means hidden_size / num_attention_heads."""

    # ---- architecture --------------------------------------------------------------------------
    normalization: str = "LayerNorm"
    """``LayerNorm`` or ``RMSNorm`` (``--normalization``)."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every norm (``--norm-epsilon``)."""
    layernorm_zero_centered_gamma: bool = False
    """Store every norm's weight centred on zero (initialised to zeros) and apply it as ``1 + weight``
    (``--apply-layernorm-1p``; LayerNorm and RMSNorm, as Transformer Engine's ``zero_centered_gamma``).
    Like every 1-D parameter the weight gets no weight decay, as in Megatron-core."""
    activation: str = "gelu"
    """MLP activation: ``gelu`` (exact erf), ``gelu_tanh`` (GPT-2's tanh approximation), ``swiglu``
    (gated SiLU, ``--swiglu``), ``silu`` or ``relu``."""
    add_bias_linear: bool = True
    """Biases on every linear layer (``--disable-bias-linear`` turns them off)."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection even when ``add_bias_linear`` is off (``--add-qkv-bias``)."""
    qk_layernorm: bool = False
    """A norm (``normalization``) over each head's queries and keys before the scores (``--qk-layernorm``;
    Dehghani et al. 2023, OLMo 2, Qwen3): the built-in layer specs add ``q_layernorm``/``k_layernorm``."""
    position_embedding_type: str = "learned_absolute"
    """``learned_absolute``, ``rope`` or ``none`` (``--position-embedding-type``)."""
    rotary_base: float = 10000.0
    """RoPE base period (``--rotary-base``)."""
    rotary_percent: float = 1.0
    """Fraction of each head's channels that RoPE rotates (``--rotary-percent``)."""
    rope_scaling: bool = False
    """Llama 3.x's RoPE frequency scaling (``--use-rope-scaling``; Hugging Face's ``rope_type`` "llama3"):
    frequencies whose wavelength exceeds 8192 positions are divided by ``rope_scaling_factor``, those
    below 2048 kept, the band between interpolated (low/high frequency factors 1 and 4, Megatron-LM's)."""
    rope_scaling_factor: float = 8.0
    """Llama 3.x's scaling factor (``--rope-scaling-factor``): 8 for Llama 3.1, 32 for Llama 3.2."""
    seq_len_interpolation_factor: float | None = None
    """Linear position interpolation (Chen et al. 2023; ``--rotary-seq-len-interpolation-factor``, Hugging
    Face's ``rope_type`` "linear"): positions are divided by it, so a model trained on s positions reads
    factor x s. None: off."""
    share_embeddings_and_output_weights: bool = True
    """Tie the output layer to the word embedding (``--untie-embeddings-and-output-weights`` unties)."""
    attention_backend: str = "auto"
    """Core attention implementation (``--attention-backend``): auto|flash (SDPA), fused|unfused|local
    (explicit scaled-masked softmax; ``fused`` uses a fused softmax kernel when one is found)."""
    attention_softmax_in_fp32: bool = True
    """Compute the explicit path's softmax in fp32 for low-precision params."""
    masked_softmax_fusion: bool = True
    """Allow a fused softmax kernel on the explicit attention path when one is found."""

    # ---- regularisation ------------------------------------------------------------------------
    hidden_dropout: float = 0.1
    """Dropout on the residual branches' outputs and the embeddings (``--hidden-dropout``)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (``--attention-dropout``)."""

    # ---- initialisation ------------------------------------------------------------------------
    init_method_std: float = 0.02
    """Std of the normal init of every weight matrix (``--init-method-std``)."""
    use_scaled_init_method: bool = True
    """Init the residual branches' output projections with std / sqrt(2 * num_layers)."""
    init_seed: int = 1234
    """Seed of the per-component weight init: the same seed gives the same full weights at every
    TP size and pipeline split (see docs/design.md)."""

    # ---- parallelism ---------------------------------------------------------------------------
    sequence_parallel: bool = False
    """Split activations outside the TP regions along the sequence (``--sequence-parallel``)."""
    num_layers_in_first_pipeline_stage: int | None = None
    """Layers of the first pipeline chunk when it should be lighter (embedding cost)."""
    num_layers_in_last_pipeline_stage: int | None = None
    """Layers of the last pipeline chunk when it should be lighter (output layer and loss cost)."""

    # ---- recompute -----------------------------------------------------------------------------
    recompute_granularity: str | None = None
    """None, ``full`` (whole layers) or ``selective`` (core attention only) (``--recompute-granularity``)."""
    recompute_method: str | None = None
    """With ``full``: ``uniform`` (checkpoint groups of ``recompute_num_layers`` layers) or ``block``
    (checkpoint the first ``recompute_num_layers`` layers of each chunk) (``--recompute-method``); a
    count above a chunk's layers covers them all, as in Megatron-LM."""
    recompute_num_layers: int | None = None
    """Layers per checkpointed group (uniform) or checkpointed layers per chunk (block)."""

    # ---- precision -----------------------------------------------------------------------------
    params_dtype: torch.dtype = torch.float32
    """Dtype the parameters are created in (``--bf16`` / ``--fp16`` set it)."""
    pipeline_dtype: torch.dtype | None = None
    """Dtype of activations sent between pipeline stages; None means params_dtype (float32 with
    ``fp32_residual_connection``, whose stream the stages pass on): see ``pipeline_communication_dtype``."""
    fp32_residual_connection: bool = False
    """Keep the residual stream in fp32 under low-precision params (``--fp32-residual-connection``): the
    embedding output is cast to fp32, each residual add is done in fp32, and each norm takes the fp32
    stream and returns the params dtype (Megatron-LM's placement of the casts). No effect with fp32 params."""

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                                  f"({self.num_attention_heads}); set kv_channels (--kv-channels) explicitly")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        self._validate_shape()
        self._validate_attention()
        self._validate_mlp_and_norm()
        self._validate_position_embedding()
        self._validate_regularisation()
        self._validate_recompute()
        self._validate_precision()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def gated_linear_unit(self) -> bool:
        """True when fc1 holds [gate; up] (SwiGLU)."""
        return self.activation == "swiglu"

    @property
    def query_projection_size(self) -> int:
        """Output features of the query projection: kv_channels x num_attention_heads."""
        return resolved(self.kv_channels, "kv_channels") * self.num_attention_heads

    @property
    def kv_projection_size(self) -> int:
        """Output features of the key (or the value) projection: kv_channels x num_query_groups."""
        return resolved(self.kv_channels, "kv_channels") * resolved(self.num_query_groups, "num_query_groups")

    @property
    def rotary_dim(self) -> int:
        """Channels per head that RoPE rotates (even)."""
        return int(resolved(self.kv_channels, "kv_channels") * self.rotary_percent) // 2 * 2

    @property
    def qkv_bias(self) -> bool:
        """Whether the QKV projection has a bias (``add_bias_linear`` or ``add_qkv_bias``)."""
        return self.add_bias_linear or self.add_qkv_bias

    @property
    def pipeline_communication_dtype(self) -> torch.dtype:
        """Dtype of the hidden states sent between pipeline stages: ``pipeline_dtype`` when set, else float32
        with ``fp32_residual_connection`` (the stream is fp32 there), else ``params_dtype`` (Megatron-core's
        inference wrapper's name and rule)."""
        if self.pipeline_dtype is not None:
            return self.pipeline_dtype
        return torch.float32 if self.fp32_residual_connection else self.params_dtype

    @property
    def attn_backend(self) -> AttnBackend:
        """``attention_backend`` as an :class:`AttnBackend`."""
        return AttnBackend(self.attention_backend)

    # ---- initialisation ------------------------------------------------------------------------
    def init_method(self, component: str) -> InitMethod:
        """N(0, init_method_std) drawn from the generator of ``component`` (e.g. ``layers.3.mlp.linear_fc1``)."""
        return seeded_normal_init(self.init_method_std, self.init_seed, component)

    def output_init_method(self, component: str) -> InitMethod:
        """Init of a residual branch's output projection (scaled by 1/sqrt(2 L) when configured)."""
        std = self.init_method_std
        if self.use_scaled_init_method:
            std = std / math.sqrt(2.0 * self.num_layers)
        return seeded_normal_init(std, self.init_seed, component)

    # ---- validation by concern -----------------------------------------------------------------
    def _validate_shape(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "kv_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"TransformerConfig.{name} must be a positive integer, got {value!r}")

    def _validate_attention(self) -> None:
        groups = resolved(self.num_query_groups, "num_query_groups")
        if groups < 1 or self.num_attention_heads % groups != 0:
            raise ConfigError(
                f"num_query_groups ({groups}) must divide num_attention_heads "
                f"({self.num_attention_heads}): each key/value head serves a whole number of query heads")
        if self.attention_backend not in AttnBackend.__members__:
            raise ConfigError(f"attention_backend={self.attention_backend!r} is not one of "
                              f"{'|'.join(AttnBackend.__members__)}")

    def _validate_mlp_and_norm(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r} is not one of {', '.join(_ACTIVATIONS)}")
        if self.normalization not in _NORMS:
            raise ConfigError(f"normalization={self.normalization!r} is not one of {', '.join(_NORMS)}")
        if not self.layernorm_epsilon > 0:
            raise ConfigError(f"layernorm_epsilon must be > 0, got {self.layernorm_epsilon}")

    def _validate_position_embedding(self) -> None:
        if self.position_embedding_type not in _POSITION_EMBEDDINGS:
            raise ConfigError(f"position_embedding_type={self.position_embedding_type!r} is not one of "
                              f"{', '.join(_POSITION_EMBEDDINGS)}")
        if self.position_embedding_type == "rope":
            if not 0.0 < self.rotary_percent <= 1.0:
                raise ConfigError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
            if self.rotary_dim < 2:
                raise ConfigError(f"rotary_percent={self.rotary_percent} of kv_channels={self.kv_channels} "
                                  f"leaves fewer than 2 channels to rotate; raise rotary_percent")
            if not self.rotary_base > 0:
                raise ConfigError(f"rotary_base must be > 0, got {self.rotary_base}")
            if not self.rope_scaling_factor > 0:
                raise ConfigError(f"rope_scaling_factor (--rope-scaling-factor) must be > 0, got "
                                  f"{self.rope_scaling_factor}")
            if self.seq_len_interpolation_factor is not None and not self.seq_len_interpolation_factor > 0:
                raise ConfigError(f"seq_len_interpolation_factor (--rotary-seq-len-interpolation-factor) must be > 0, "
                                  f"got {self.seq_len_interpolation_factor}")
        elif self.rope_scaling or self.seq_len_interpolation_factor is not None:
            flag = "--use-rope-scaling" if self.rope_scaling else "--rotary-seq-len-interpolation-factor"
            raise ConfigError(f"{flag} scales RoPE, but position_embedding_type is "
                              f"{self.position_embedding_type!r}; add --position-embedding-type rope or drop {flag}")

    def _validate_regularisation(self) -> None:
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if not self.init_method_std > 0:
            raise ConfigError(f"init_method_std must be > 0, got {self.init_method_std}")

    def _validate_recompute(self) -> None:
        g, m, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if g not in (None, "full", "selective"):
            raise ConfigError(f"recompute_granularity={g!r} must be None, 'full' or 'selective'")
        if g == "full":
            if m not in ("uniform", "block"):
                raise ConfigError("recompute_granularity='full' needs recompute_method 'uniform' or 'block' "
                                  "(--recompute-method)")
            # No upper bound, as Megatron-LM: more layers than a chunk holds recomputes all of them
            # (uniform: one group; block: every layer), which a re-shard to smaller chunks relies on.
            if n is None or n < 1:
                raise ConfigError(f"recompute_granularity='full' needs recompute_num_layers >= 1 "
                                  f"(--recompute-num-layers), got {n}")
        elif m is not None or n is not None:
            raise ConfigError(f"recompute_method={m!r} / recompute_num_layers={n!r} apply only with "
                              f"recompute_granularity='full' (got {g!r})")

    def validate_parallel(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int = 1,
                          virtual_pipeline_model_parallel_size: int | None = None) -> None:
        """Checks that need the parallel layout: TP divisibility, the pipeline layer split."""
        tp = tensor_model_parallel_size
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_query_groups", resolved(self.num_query_groups, "num_query_groups")),
                            ("ffn_hidden_size", resolved(self.ffn_hidden_size, "ffn_hidden_size"))):
            if value % tp != 0:
                raise ConfigError(f"{name} ({value}) is not divisible by --tensor-model-parallel-size ({tp}): "
                                  f"each TP rank must hold a whole number of them; change {name} or the TP size")
        if self.sequence_parallel and tp == 1:
            raise ConfigError("sequence_parallel=True needs --tensor-model-parallel-size > 1")
        # Raises ConfigError naming the flags for a split that does not fit num_layers.
        chunk_layer_counts(self.num_layers, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size,
                           self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage)

    def layer_counts(self, pipeline_model_parallel_size: int,
                     virtual_pipeline_model_parallel_size: int | None = None) -> list[int]:
        """Layer counts of every pipeline chunk in model order."""
        return chunk_layer_counts(self.num_layers, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size,
                                  self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage)

    def _validate_precision(self) -> None:
        if self.fp32_residual_connection and self.pipeline_dtype not in (None, torch.float32):
            raise ConfigError(f"fp32_residual_connection (--fp32-residual-connection) sends the fp32 residual stream "
                              f"between pipeline stages, but pipeline_dtype is {self.pipeline_dtype}; leave "
                              f"pipeline_dtype None (float32 is used)")

    # ---- (de)serialisation for checkpoints ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain values only (dtypes as strings such as ``"float32"``), for ``torch.load(weights_only=True)``."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides: Any) -> TransformerConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown TransformerConfig fields {unknown} (checkpoint from another version?)")
        merged = {**values, **overrides}
        for name in ("params_dtype", "pipeline_dtype"):
            if isinstance(merged.get(name), str):
                merged[name] = getattr(torch, merged[name].removeprefix("torch."))
        return cls(**merged)
