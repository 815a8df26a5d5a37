"""Flags of Megatron-LM's example scripts (GPT-3, Llama, Mixtral) that have no counterpart elsewhere here.

Each is either accepted with its meaning (mapped onto this framework's options by ``apply``) or
refused at parse time with one line saying why, never argparse's bare "unrecognized arguments".
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from megatron_core.errors import ConfigError

# Kernel and overlap choices: this framework picks fused kernels at run time and falls back to torch
# per op with the same result, so turning one off (or on) changes nothing a user can observe but speed.
_KERNEL_CHOICES = ("--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                   "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion", "--no-rope-fusion",
                   "--no-persist-layer-norm", "--cross-entropy-loss-fusion",
                   "--no-async-tensor-model-parallel-allreduce",
                   "--no-create-attention-mask-in-dataloader", "--masked-softmax-fusion", "--bias-gelu-fusion")

_MOE = "mixture-of-experts (Mixtral-style) models are not supported yet; train a dense model (drop the MoE flags)"
_FP8 = "FP8 training needs Transformer Engine on FP8-capable GPUs and is not supported yet; use --bf16"
_REFUSED: dict[str, str] = {
    **{f: _MOE for f in ("--num-experts", "--moe-router-topk", "--moe-router-load-balancing-type",
                         "--moe-aux-loss-coeff", "--moe-z-loss-coeff", "--moe-grouped-gemm",
                         "--moe-token-dispatcher-type", "--expert-model-parallel-size", "--moe-router-pre-softmax",
                         "--moe-expert-capacity-factor", "--moe-pad-expert-input-to-capacity", "--moe-layer-freq",
                         "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size", "--moe-router-dtype",
                         "--moe-input-jitter-eps", "--expert-tensor-parallel-size")},
    **{f: _FP8 for f in ("--fp8-format", "--fp8-amax-history-len", "--fp8-amax-compute-algo", "--fp8-recipe",
                         "--fp8-param-gather", "--fp8-margin")},
    "--wandb-project": "Weights & Biases logging is not supported; log to TensorBoard with --tensorboard-dir DIR",
    "--wandb-exp-name": "Weights & Biases logging is not supported; log to TensorBoard with --tensorboard-dir DIR",
    "--wandb-save-dir": "Weights & Biases logging is not supported; log to TensorBoard with --tensorboard-dir DIR",
    "--context-parallel-size": "context parallelism is not supported yet; drop the flag (context parallel size 1)",
    "--use-legacy-models": "only megatron_core models exist here (--use-mcore-models is implied); drop the flag",
    "--tp-comm-overlap": "overlapping TP communication needs Transformer Engine userbuffers; not supported yet",
    "--use-torch-fsdp2": "FSDP2 is not used here; --data-parallel-sharding-strategy optim_grads_params (ZeRO-3) "
                         "shards parameters, gradients and optimizer state the same way",
    "--apply-query-key-layer-scaling": "query-key layer scaling is not supported; drop the flag (the attention "
                                       "softmax is computed in fp32, the overflow it guards against in fp16)",
}
# Refused flags whose one value means "off", as Megatron-LM's scripts spell it out (--context-parallel-size 1):
# accepted with that value, refused with any other.
_OFF_VALUES: dict[str, str] = {"--context-parallel-size": "1", "--expert-model-parallel-size": "1",
                               "--expert-tensor-parallel-size": "1"}
# Megatron-LM flags whose only setting is this framework's behaviour (flag -> help).
_NO_OPS: dict[str, str] = {
    "--no-query-key-layer-scaling": "accepted: query-key layer scaling is never applied (Megatron-LM's default)",
    "--attention-softmax-in-fp32": "accepted: the attention softmax is always computed in fp32",
    "--auto-detect-ckpt-format": "accepted: --load always detects the checkpoint format",
    # How Megatron-LM reads the .bin files and schedules torch_dist I/O: the samples and the checkpoint
    # files are the same either way (torch_dist here has every rank write and read its own shards).
    "--mmap-bin-files": "accepted: the .bin files are always memory-mapped",
    "--no-mmap-bin-files": "accepted: the .bin files are always memory-mapped (the same samples either way)",
    "--ckpt-fully-parallel-save": "accepted: every rank writes its own torch_dist shards",
    "--no-ckpt-fully-parallel-save": "accepted: every rank writes its own torch_dist shards",
    "--ckpt-fully-parallel-load": "accepted: every rank reads the torch_dist shards it needs",
    "--ckpt-assume-constant-structure": "accepted: Megatron-LM's caching of the save plan; no effect on the files",
    "--use-persistent-ckpt-worker": "accepted: --async-save writes from a background thread",
    "--overlap-p2p-communication": "accepted: the pipeline's sends and receives are batched per step",
}


class _Refuse(argparse.Action):
    """Consumes the flag and its values, then refuses it with the reason."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values == [_OFF_VALUES.get(str(option_string))]:
            return
        raise ConfigError(f"{option_string}: {_REFUSED[str(option_string)]}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM flags accepted with their meaning, and the ones refused with a reason."""
    g = parser.add_argument_group("Megatron-LM compatibility", "flags of Megatron-LM's example scripts")
    g.add_argument("--use-mcore-models", action="store_true", help="accepted: the models are always megatron_core's")
    g.add_argument("--transformer-impl", default=None, choices=["local", "transformer_engine"],
                   help="layer implementation: local (plain torch) or transformer_engine (needs it installed); "
                        "default: Transformer Engine when usable, else the fused-kernel spec")
    g.add_argument("--spec", nargs=2, default=None, metavar=("MODULE", "FUNCTION"),
                   help="custom transformer layer spec: MODULE.FUNCTION returns a ModuleSpec (or is one), e.g. "
                        "--spec models.custom_spec qk_norm_layer_spec")
    g.add_argument("--ckpt-format", default=None, choices=["torch", "torch_dist"],
                   help="checkpoint format written by --save: torch_dist (torch.distributed.checkpoint: resumes "
                        "under any TP/PP/VPP/DP/ZeRO layout) or torch (Megatron-LM's legacy per-rank files). "
                        "Default: torch_dist, except that a run resuming a legacy checkpoint keeps saving legacy. "
                        "A --load reads either, whatever this flag says")
    g.add_argument("--ckpt-convert-format", default=None, choices=["torch", "torch_dist"],
                   help="load --load, write it in this format to --ckpt-convert-save DIR/FORMAT and exit without "
                        "training (Megatron-LM's flag; torch_dist then resumes under any layout with its optimizer)")
    g.add_argument("--ckpt-convert-save", default=None, help="where --ckpt-convert-format writes (DIR/FORMAT)")
    g.add_argument("--async-save", action="store_true",
                   help="torch_dist: write checkpoints in the background while training goes on")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model and tokenizer flags from the torch_dist checkpoint in --load")
    g.add_argument("--use-flash-attn", action="store_true", help="same as --attention-backend flash")
    g.add_argument("--squared-relu", action="store_true", help="squared ReLU MLP activation (Primer, Nemotron)")
    g.add_argument("--no-position-embedding", action="store_true",
                   help="no learned position table: --position-embedding-type none, or nothing beside rope")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="same as --position-embedding-type rope")
    g.add_argument("--data-impl", default="mmap", choices=["mmap"],
                   help="accepted: datasets are Megatron-LM's mmap indexed format")
    g.add_argument("--dataloader-type", default="single", choices=["single"],
                   help="accepted: samples are read in order (Megatron-LM's single pass); cyclic is not supported")
    g.add_argument("--tiktoken-pattern", default=None, choices=["v1", "v2"],
                   help="accepted: Megatron-LM's TikTokenizer pattern, which no --tokenizer-type here uses")
    for flag, text in _NO_OPS.items():
        g.add_argument(flag, action="store_true", help=text)
    for flag in _KERNEL_CHOICES:
        g.add_argument(flag, action="store_true", help="accepted: fused kernels are chosen at run time, same result")
    for flag in _REFUSED:
        g.add_argument(flag, action=_Refuse, nargs="*", default=None, help=argparse.SUPPRESS)


def apply(args: argparse.Namespace) -> None:
    """Map the accepted flags onto this framework's options (before the rest of ``validate_args``)."""
    if args.async_save:
        if args.ckpt_format == "torch":
            raise ConfigError("--async-save writes torch_dist checkpoints; drop --ckpt-format torch")
        args.ckpt_format = "torch_dist"
    if (args.ckpt_convert_format is None) != (args.ckpt_convert_save is None) or \
            (args.ckpt_convert_format is not None and args.load is None):
        raise ConfigError("--ckpt-convert-format FORMAT converts the checkpoint in --load to --ckpt-convert-save "
                          "DIR/FORMAT: give all three (as Megatron-LM)")
    if args.use_flash_attn:
        if args.attention_backend not in ("auto", "flash"):
            raise ConfigError(f"--use-flash-attn contradicts --attention-backend {args.attention_backend}")
        args.attention_backend = "flash"
    if args.reset_attention_mask and args.no_create_attention_mask_in_dataloader:
        # Megatron-LM then builds no mask and silently trains with plain causal attention.
        raise ConfigError("--reset-attention-mask builds each micro batch's document mask (Megatron-LM in the data "
                          "loader, this project on the training rank); drop --no-create-attention-mask-in-dataloader "
                          "(or --reset-attention-mask)")
    if args.squared_relu:
        if args.swiglu or args.openai_gelu:
            raise ConfigError("give only one of --squared-relu, --swiglu and --openai-gelu")
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    if args.spec is None and args.transformer_impl is not None:
        name = "get_gpt_layer_local_spec" if args.transformer_impl == "local" else "get_gpt_layer_te_spec"
        if args.transformer_impl == "transformer_engine":
            from megatron_core.transformer.te_spec import HAVE_TE, TE_IMPORT_ERROR

            if not HAVE_TE:  # before any process group or model, naming the flag given
                raise ConfigError(f"--transformer-impl transformer_engine: transformer_engine failed to import "
                                  f"({TE_IMPORT_ERROR}); install it on a CUDA machine or pass --transformer-impl local")
        args.spec = ["megatron_core.transformer.layer_specs", name]


def apply_no_position_embedding(args: argparse.Namespace) -> None:
    """``--no-position-embedding`` (Megatron-LM's: no learned position table) after ``--use-checkpoint-args`` has
    given the checkpoint's type: beside RoPE (Llama scripts pass both) it changes nothing, and the type must stay,
    as "none" would train with no position information at all; otherwise it means ``--position-embedding-type
    none``."""
    if args.no_position_embedding and args.position_embedding_type == "learned_absolute":
        args.position_embedding_type = "none"


def refused_flags() -> Sequence[str]:
    """Every flag refused with a reason (for tests and documentation)."""
    return tuple(_REFUSED)
