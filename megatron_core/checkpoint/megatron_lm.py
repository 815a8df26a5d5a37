"""Read checkpoints written by Megatron-LM's training loop (``megatron/training/checkpointing.py``).

Megatron-LM's legacy file (``--ckpt-format torch``; ``iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt``)
is the dict of its ``generate_state_dict``: ``args`` (the run's ``argparse.Namespace``),
``checkpoint_version`` (3.0), ``iteration``, ``model`` (or ``model0``, ``model1``, ... per virtual
stage: ``GPTModel.state_dict_for_save_checkpoint()``), and for training ``optimizer``,
``opt_param_scheduler``, ``rng_state`` (Python, NumPy, torch and CUDA generator states) and
``num_floating_point_operations_so_far``. Its ``common.pt`` of a ``torch_dist`` checkpoint holds the same
non-tensor entries. This module reads such a file without megatron-core installed and without running
code from it, and restates it in this framework's legacy entries (``config``, ``model_info``, tokenizer
flags; docs/design.md), so that ``--load``, ``--use-checkpoint-args`` and ``tools/checkpoint/convert.py``
read it as one of ours. Verified against the files megatron-core 0.16.1's ``GPTModel`` writes (local and
Transformer Engine layer names).
"""
from __future__ import annotations

import argparse
import io as _bytes_io
import os
from typing import Any

import numpy as np
import torch

from megatron_core.errors import ConfigError
from megatron_core.transformer.config import TransformerConfig

# NumPy 2 moved the array rebuild a pickle names (numpy.core -> numpy._core); a file may name either module.
_reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct

# The key a restated Megatron-LM state carries: its optimizer and RNG states (Megatron-LM's own layouts) are
# not restated, so a run resuming it must say so (--no-load-optim, or --finetune).
FROM_MEGATRON_LM = "from_megatron_lm"

# Transformer Engine's fused layers hold the pre-norms (megatron-core's TE spec, and every torch_dist
# checkpoint through the local spec's sharded_state_dict_keys_map); this framework's names are the local spec's.
_TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
# args fields Megatron-LM uses for features this framework does not build: (field, flag) refused by name.
_UNSUPPORTED = (("num_experts", "--num-experts"), ("multi_latent_attention", "--multi-latent-attention"),
                ("mtp_num_layers", "--mtp-num-layers"))

# Megatron-LM's other pipeline splits: (field, flag), refused for a legacy file cut into pipeline stages.
_SPLIT_FLAGS = (("account_for_embedding_in_pipeline_split", "--account-for-embedding-in-pipeline-split"),
                ("account_for_loss_in_pipeline_split", "--account-for-loss-in-pipeline-split"),
                ("pipeline_model_parallel_layout", "--pipeline-model-parallel-layout"))


class _Opaque:
    """Stands in for a class of the saving library pickled in a file (megatron-core's ``AttnBackend.auto`` in
    ``args``; DeepSpeed's ``ZeroStageEnum``, ``LossScaler``, ``fragment_address``): keeps its constructor
    arguments (``values``) and pickled state (``state``), runs nothing."""

    def __init__(self, *values: Any) -> None:
        self.values = values

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _safe_globals(path: str, prefix: str, what: str, found: list[str] | None = None) -> list[Any]:
    """The allow-list for ``path``: ``argparse.Namespace``, NumPy's array rebuild (the RNG states), ``BytesIO``
    (Transformer Engine's ``_extra_state``) and a stand-in for each class of the module tree ``prefix`` the
    pickle names (``found``: ``torch.serialization.get_unsafe_globals_in_checkpoint(path)``, read from the
    pickle without running it; scanned here when None). Raises ConfigError naming any other class; ``what`` says
    what such files are read for."""
    allowed: dict[str, Any] = {"argparse.Namespace": argparse.Namespace, "numpy.ndarray": np.ndarray,
                               "numpy.dtype": np.dtype, "_io.BytesIO": _bytes_io.BytesIO}
    for name in ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"):
        allowed[name] = _reconstruct
    if found is None:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    # an ndarray's dtype is built from its NumPy dtype class, which the scan above does not list
    chosen: list[Any] = [value for value in vars(np.dtypes).values() if isinstance(value, type)
                         and issubclass(value, np.dtype)] if "numpy.dtype" in found else []
    for name in found:
        if name in allowed:
            chosen.append((allowed[name], name))
        elif name.startswith(prefix):
            chosen.append((type(name.rsplit(".", 1)[1], (_Opaque,), {}), name))
        else:
            raise ConfigError(f"{path} pickles {name}, which is not loaded (it could run code): only {what} "
                              f"are read")
    return chosen


def load_with_stand_ins(path: str, prefix: str, what: str, found: list[str] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` allowing :func:`_safe_globals` (classes under ``prefix`` read as
    :class:`_Opaque` stand-ins; ``found``: the caller's scan of the pickle's classes, if it made one). Raises
    ConfigError naming a class outside that list."""
    with torch.serialization.safe_globals(_safe_globals(path, prefix, what, found)):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_megatron_lm_file(path: str, found: list[str] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` with Megatron-LM's args, RNG states and megatron-core's classes
    (stand-ins) allowed; ``found`` as for :func:`load_with_stand_ins`."""
    return load_with_stand_ins(path, "megatron.", "Megatron-LM's args, RNG states and megatron-core enums", found)


def is_megatron_lm_state(state: Any) -> bool:
    """A dict as Megatron-LM saves it: its run's ``args`` Namespace, none of this framework's ``config``."""
    return isinstance(state, dict) and isinstance(state.get("args"), argparse.Namespace) and "config" not in state


def _arg(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return default if value is None else value


def config_from_args(args: argparse.Namespace, where: str, pipeline_split: bool = False) -> TransformerConfig:
    """The TransformerConfig of Megatron-LM's ``args`` (its ``core_transformer_config_from_args``, for the
    fields that shape the weights and the forward pass); ``pipeline_split``: also its uneven pipeline split
    (``--decoder-first/last-pipeline-num-layers``), which cuts a legacy file's layers per stage (a torch_dist
    checkpoint stores whole tensors). Raises ConfigError for a feature not built here."""
    for name, flag in _UNSUPPORTED:
        if getattr(args, name, None):
            raise ConfigError(f"{where}: the Megatron-LM run used {flag} {getattr(args, name)}, which this "
                              f"framework does not build; it cannot load this checkpoint")
    split = {"num_layers_in_first_pipeline_stage": getattr(args, "decoder_first_pipeline_num_layers", None),
             "num_layers_in_last_pipeline_stage": getattr(args, "decoder_last_pipeline_num_layers", None)}
    pp = _arg(args, "pipeline_model_parallel_size", 1)
    for name, flag in _SPLIT_FLAGS if pipeline_split and pp > 1 else ():
        if getattr(args, name, None):
            raise ConfigError(f"{where}: the Megatron-LM run cut its {pp} pipeline stages with {flag}, which this "
                              f"framework does not read; save it as torch_dist (whole tensors) and convert that")
    if not pipeline_split:
        split = {}
    elif any(split.values()) and (getattr(args, "virtual_pipeline_model_parallel_size", None) or 1) > 1:
        # megatron-core splits the first stage's count over its virtual stages; here it is the first chunk's
        raise ConfigError(f"{where}: the Megatron-LM run used --decoder-first/last-pipeline-num-layers with virtual "
                          f"pipeline stages, whose split is not read; convert it with Megatron-LM's "
                          f"tools/checkpoint/convert.py (or save it as torch_dist) first")
    activation = ("swiglu" if _arg(args, "swiglu", False) else "gelu_tanh" if _arg(args, "openai_gelu", False)
                  else "squared_relu" if _arg(args, "squared_relu", False) else "gelu")
    dtype = _arg(args, "params_dtype", torch.float32)
    values = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=_arg(args, "ffn_hidden_size"), kv_channels=_arg(args, "kv_channels"),
        num_query_groups=args.num_query_groups if _arg(args, "group_query_attention", False) else None,
        normalization=_arg(args, "normalization", "LayerNorm"),
        layernorm_epsilon=_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5)),
        layernorm_zero_centered_gamma=_arg(args, "apply_layernorm_1p", False), activation=activation,
        add_bias_linear=_arg(args, "add_bias_linear", True), add_qkv_bias=_arg(args, "add_qkv_bias", False),
        qk_layernorm=_arg(args, "qk_layernorm", False),
        position_embedding_type=_arg(args, "position_embedding_type", "learned_absolute"),
        rotary_base=float(_arg(args, "rotary_base", 10000)), rotary_percent=float(_arg(args, "rotary_percent", 1.0)),
        rope_scaling=_arg(args, "use_rope_scaling", False),
        rope_scaling_factor=float(_arg(args, "rope_scaling_factor", 8.0)),
        seq_len_interpolation_factor=getattr(args, "rotary_seq_len_interpolation_factor", None),
        share_embeddings_and_output_weights=not _arg(args, "untie_embeddings_and_output_weights", False),
        hidden_dropout=_arg(args, "hidden_dropout", 0.1), attention_dropout=_arg(args, "attention_dropout", 0.1),
        init_method_std=_arg(args, "init_method_std", 0.02),
        fp32_residual_connection=_arg(args, "fp32_residual_connection", False),
        params_dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32, **split)
    try:
        return TransformerConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: Megatron-LM's args describe a model this framework refuses: {exc}") from None


def model_info_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """This framework's ``model_info`` from Megatron-LM's ``args``. The true vocabulary is the tokenizer's,
    which ``args`` does not record: the padded table size stands for it (no row is dropped)."""
    padded = args.padded_vocab_size
    positions = _arg(args, "max_position_embeddings", _arg(args, "seq_length"))
    return {"vocab_size": padded, "padded_vocab_size": padded,
            "make_vocab_size_divisible_by": _arg(args, "make_vocab_size_divisible_by", 128),
            "seq_length": _arg(args, "seq_length", positions), "max_position_embeddings": positions,
            "position_embedding_type": _arg(args, "position_embedding_type", "learned_absolute"),
            "share_embeddings_and_output_weights": not _arg(args, "untie_embeddings_and_output_weights", False),
            "tensor_model_parallel_size": _arg(args, "tensor_model_parallel_size", 1),
            "pipeline_model_parallel_size": _arg(args, "pipeline_model_parallel_size", 1),
            "virtual_pipeline_model_parallel_size": getattr(args, "virtual_pipeline_model_parallel_size", None)}


def tokenizer_flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--tokenizer-*`` flags Megatron-LM's run was given (core_format.TOKENIZER_FLAGS' keys)."""
    names = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "vocab_size",
             "make_vocab_size_divisible_by")
    return {name: getattr(args, name, None) for name in names}


def local_layer_names(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``state`` under the local spec's names: Transformer Engine's fused pre-norms renamed, the ``_extra_state``
    entries (None for local layers, FP8 metadata for TE's) dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.endswith("._extra_state") or not isinstance(value, torch.Tensor):
            continue
        for te_name, local in _TE_NORM_NAMES.items():
            if name.endswith(te_name):
                name = name[:-len(te_name)] + local
                break
        out[name] = value
    return out


def from_megatron_lm(state: dict[str, Any], path: str) -> dict[str, Any]:
    """Restate Megatron-LM's legacy file ``state`` (read from ``path``) in this framework's entries: ``config``,
    ``model_info``, tokenizer flags, ``iteration``, ``consumed_train_samples`` and the ``model``/``modelN`` weights;
    its optimizer, scheduler and RNG states are left out and :data:`FROM_MEGATRON_LM` is set."""
    from megatron_core.checkpoint.core_format import CHECKPOINT_VERSION, TOKENIZER_FLAGS
    args = state["args"]
    version = state.get("checkpoint_version", 0)
    if version < CHECKPOINT_VERSION:
        raise ConfigError(f"{path} has checkpoint_version {version}: Megatron-LM's pre-3.0 (legacy model) QKV "
                          f"layout is not read; resave it with a current Megatron-LM")
    config = config_from_args(args, path, pipeline_split=True)  # the split cuts the layers of its per-stage files
    out: dict[str, Any] = {"checkpoint_version": version, "iteration": state.get("iteration", 0),
                           "config": config.to_dict(), "model_info": model_info_from_args(args),
                           TOKENIZER_FLAGS: tokenizer_flags_from_args(args),
                           "consumed_train_samples": _arg(args, "consumed_train_samples", 0), FROM_MEGATRON_LM: True}
    for key, value in state.items():
        if key == "model" or (key.startswith("model") and key[len("model"):].isdigit()):
            out[key] = local_layer_names(value)
    return out


def megatron_lm_hint(path: str) -> str:
    """What to do with Megatron-LM's ``path`` when its optimizer state was asked for."""
    return (f"{os.path.dirname(path)} is Megatron-LM's checkpoint: its model weights load, its optimizer and RNG "
            f"states (Megatron-LM's layouts) do not: add --no-load-optim --no-load-rng, or --finetune")
