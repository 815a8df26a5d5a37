"""Checkpoints in the exact on-disk structure Megatron-LM writes, built without megatron-core.

Mirrors what was verified against megatron-core 0.16.1 (``GPTModel`` with the local layer spec, on a
CPU) and Megatron-LM's ``megatron/training/checkpointing.py`` (``generate_state_dict``):

- legacy (``--ckpt-format torch``): ``iter_0000010/mp_rank_00/model_optim_rng.pt`` holding ``args`` (an
  ``argparse.Namespace`` with Megatron-LM's flag names, including ``attention_backend``, an
  ``AttnBackend`` enum of ``megatron.core.transformer.enums``), ``checkpoint_version`` 3.0,
  ``iteration``, ``model`` (``state_dict_for_save_checkpoint()``: the local spec's names, one
  ``._extra_state`` entry (None) per linear layer and ``output_layer._extra_state``), ``rng_state``
  (Python, NumPy and torch generator states) and ``num_floating_point_operations_so_far``;
  ``latest_checkpointed_iteration.txt`` holds ``10``.
- torch_dist (``dist_checkpointing.save(model.sharded_state_dict())``): ``metadata.json``
  (``{"sharded_backend": "torch_dist", ...}``), ``common.pt`` (``args``, ``checkpoint_version``,
  ``iteration``, ``num_floating_point_operations_so_far``) and DCP's ``.metadata`` / ``__0_0.distcp``:
  the layers stacked on a leading axis (``decoder.layers.self_attention.linear_qkv.weight``
  [num_layers, ...]), the pre-norms under Transformer Engine's names
  (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``) and each
  ``_extra_state`` as bytes per layer (``..._extra_state/shard_I_N``).
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import io
import json
import os
import random
import sys
import types
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from megatron_core.transformer.config import TransformerConfig

ITERATION = 10
_LINEARS = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
_TE_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
             "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias"}
_ENUMS = "megatron.core.transformer.enums"


@contextlib.contextmanager
def megatron_enums():
    """``megatron.core.transformer.enums.AttnBackend`` importable while a file is pickled (megatron-core is not
    installed here; the file must name the class exactly as Megatron-LM's does)."""
    names = ["megatron", "megatron.core", "megatron.core.transformer", _ENUMS]
    saved = {name: sys.modules.get(name) for name in names}
    module = types.ModuleType(_ENUMS)
    backend = enum.Enum("AttnBackend", [("flash", 1), ("fused", 2), ("unfused", 3), ("local", 4), ("auto", 5)],
                        module=_ENUMS)
    module.AttnBackend = backend  # type: ignore[attr-defined]
    for name in names[:-1]:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[_ENUMS] = module
    try:
        yield backend
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def megatron_lm_args(config: TransformerConfig, vocab_size: int, padded: int, seq: int, attn_backend,
                     tokenizer_type: str = "NullTokenizer") -> argparse.Namespace:
    """Megatron-LM's ``args`` for ``config`` (its flag names, as ``arguments.py`` stores them)."""
    gqa = config.num_query_groups not in (None, config.num_attention_heads)
    return argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads, kv_channels=config.kv_channels, group_query_attention=gqa,
        num_query_groups=config.num_query_groups if gqa else 1, max_position_embeddings=seq, seq_length=seq,
        position_embedding_type=config.position_embedding_type, rotary_percent=1.0, rotary_base=10000,
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        swiglu=config.activation == "swiglu", openai_gelu=False, squared_relu=False,
        add_bias_linear=config.add_bias_linear, add_qkv_bias=False, qk_layernorm=False, apply_layernorm_1p=False,
        untie_embeddings_and_output_weights=not config.share_embeddings_and_output_weights,
        padded_vocab_size=padded, vocab_size=vocab_size, make_vocab_size_divisible_by=128,
        tokenizer_type=tokenizer_type, tokenizer_model=None, vocab_file=None, merge_file=None,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        params_dtype=torch.float32, fp16=False, bf16=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=0.02, fp32_residual_connection=False, num_experts=None, transformer_impl="local",
        attention_backend=attn_backend.auto, iteration=ITERATION, consumed_train_samples=80, ckpt_format="torch")


def _rng_state() -> list[dict]:
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
             "rng_tracker_states": {}}]


def _with_extra_state(state: dict[str, torch.Tensor], num_layers: int) -> dict:
    out: dict = dict(state)
    for layer in range(num_layers):
        for linear in _LINEARS:
            out[f"decoder.layers.{layer}.{linear}._extra_state"] = None
    out["output_layer._extra_state"] = None
    return out


def write_legacy(root: str, state: dict[str, torch.Tensor], config: TransformerConfig, vocab_size: int,
                 padded: int, seq: int) -> None:
    """Megatron-LM's legacy checkpoint of the model weights ``state`` (local spec names) under ``root``."""
    with megatron_enums() as backend:
        file = {"args": megatron_lm_args(config, vocab_size, padded, seq, backend), "checkpoint_version": 3.0,
                "iteration": ITERATION, "model": _with_extra_state(state, config.num_layers),
                "rng_state": _rng_state(), "num_floating_point_operations_so_far": 0}
        rank_dir = os.path.join(root, f"iter_{ITERATION:07d}", "mp_rank_00")
        os.makedirs(rank_dir)
        torch.save(file, os.path.join(rank_dir, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATION))


def _stacked(state: dict[str, torch.Tensor], num_layers: int) -> dict:
    """megatron-core's sharded_state_dict keys: layers stacked, TE's norm names, bytes extra states."""
    out: dict = {}
    prefix = "decoder.layers.0."
    for name, value in state.items():
        if not name.startswith("decoder.layers."):
            out[name] = value
        if not name.startswith(prefix):  # layers 1, 2, ...: stacked with layer 0
            continue
        rest = name[len(prefix):]
        out["decoder.layers." + _TE_NORMS.get(rest, rest)] = torch.stack(
            [state[f"decoder.layers.{i}.{rest}"] for i in range(num_layers)])
    for linear in _LINEARS:
        for layer in range(num_layers):
            out[f"decoder.layers.{linear}._extra_state/shard_{layer}_{num_layers}"] = io.BytesIO()
    return out


def write_torch_dist(root: str, state: dict[str, torch.Tensor], config: TransformerConfig, vocab_size: int,
                     padded: int, seq: int) -> None:
    """megatron-core's torch_dist checkpoint of ``state`` (local spec names) under ``root``, with the
    ``common.pt`` entries Megatron-LM's training loop adds."""
    path = os.path.join(root, f"iter_{ITERATION:07d}")
    os.makedirs(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.save(_stacked(state, config.num_layers), storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    with megatron_enums() as backend:
        args = megatron_lm_args(config, vocab_size, padded, seq, backend)
        args.ckpt_format = "torch_dist"
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                    "num_floating_point_operations_so_far": 0}, os.path.join(path, "common.pt"))
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, f)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(ITERATION))
