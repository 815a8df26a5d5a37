"""Build this rank's GPTModel for generation from a training checkpoint or a Hugging Face directory.

A torch_dist checkpoint (:mod:`megatron_core.dist_checkpointing`) whose ``extra`` carries
``model_config`` (``TransformerConfig.to_dict()``) and ``model_info`` (vocab_size,
max_position_embeddings) is read slice by slice for this rank's layout (vocabulary padding included);
its tokenizer is the one the training run recorded (``--tokenizer-*`` flags), when its files are there
(a NullTokenizer run's needs none: its recorded ``--vocab-size``, :func:`recorded_tokenizer`).

A Megatron legacy checkpoint (``latest_checkpointed_iteration.txt`` + ``iter_*/mp_rank_*``, any TP/PP/VPP
it was saved with) is merged with :func:`megatron_core.checkpoint.convert.load_core` and cut again for
this run's TP x PP with :func:`megatron_core.checkpoint.sharding.rank_state_dict`: the layout of the
run that saved it does not matter. A directory with a ``config.json`` is read as a Hugging Face
``save_pretrained`` directory (GPT-2 or Llama). Every rank reads the whole model into CPU memory first,
which is fine for the models this framework trains on one node.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from megatron_core import device as device_mod
from megatron_core.checkpoint import megatron_lm_dist
from megatron_core.checkpoint.convert import FullModel, load_core, load_hf, tokenizer_from_flags
from megatron_core.checkpoint.core_format import TOKENIZER_FLAGS
from megatron_core.checkpoint.sharding import rank_state_dict
from megatron_core.dist_checkpointing import load_dist_checkpoint, read_common
from megatron_core.dist_checkpointing.full_model import is_torch_dist
from megatron_core.dist_checkpointing.serialization import FORMAT
from megatron_core.errors import ConfigError
from megatron_core.models.gpt.gpt_model import GPTModel
from megatron_core.parallel_state import ParallelState
from megatron_core.tokenizer.base import MegatronTokenizer
from megatron_core.tokenizer.build import build_tokenizer
from megatron_core.training.checkpoint_io import TRACKER_FILENAME as TRACKER
from megatron_core.training.checkpoint_io import foreign_checkpoint_hint
from megatron_core.transformer.config import TransformerConfig


@dataclass
class LoadedModel:
    """This rank's model chunk and what generation needs to know about it."""

    model: GPTModel
    vocab_size: int
    source: str  # "hf", "legacy" or "torch_dist"
    hf_family: str | None
    tokenizer: MegatronTokenizer | None  # the one saved with the model, if any


def _for_inference(config: TransformerConfig) -> TransformerConfig:
    """``config`` without sequence parallelism or activation recompute, whatever the training run used.

    Sequence parallelism only splits activations along the sequence to save training memory (the
    weights are the same); kept, it would refuse TP 1 and need every prompt length divisible by TP.
    Recompute saves activations for backward, which generation never runs; kept, block recompute of
    more layers than a chunk of the generation's pipeline split holds refused that split.
    """
    return dataclasses.replace(config, sequence_parallel=False, recompute_granularity=None, recompute_method=None,
                               recompute_num_layers=None)


def read_full_model(load: str, iteration: int | None = None) -> tuple[FullModel, str]:
    """``(whole model, "hf" | "legacy")`` from ``load``. Raises ConfigError naming --load when it is neither."""
    if not os.path.isdir(load):
        raise ConfigError(f"--load {load} is not a directory; pass a training checkpoint or a Hugging Face directory")
    if not os.path.isfile(os.path.join(load, "config.json")) and not os.path.isfile(os.path.join(load, TRACKER)):
        name, parent = os.path.basename(os.path.normpath(load)), os.path.dirname(os.path.normpath(load))
        step = f"; it is one iteration's directory: pass --load {parent} --load-iteration " \
               f"{name[len('iter_'):].lstrip('0') or '0'}" if name.startswith("iter_") else ""
        raise ConfigError(f"--load {load} is neither a Hugging Face folder (no config.json) nor a training checkpoint "
                          f"(no {TRACKER}){step or foreign_checkpoint_hint(load)}")
    try:
        if os.path.isfile(os.path.join(load, "config.json")):
            return load_hf(load), "hf"
        return load_core(load, iteration), "legacy"
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ConfigError(f"--load {load}: {exc}") from None


def recorded_tokenizer(flags: dict[str, Any]) -> MegatronTokenizer | None:
    """The tokenizer a training run recorded (its ``--tokenizer-*`` flags; None when its files are gone).

    A NullTokenizer run's (``--mock-data``, or data of ids) is rebuilt from its recorded ``--vocab-size``, as
    Megatron-LM's generation builds it from the run's args: its prompts are ids as text ("1 2 3") and its EOD
    (id ``vocab_size``) ends a sequence. The converter leaves it out (a Hugging Face directory cannot hold it).
    """
    if flags.get("tokenizer_type") == "NullTokenizer" and flags.get("vocab_size"):
        return build_tokenizer("NullTokenizer", vocab_size=int(flags["vocab_size"]))
    return tokenizer_from_flags(flags)


def _build_from_dist(load: str, parallel_state: ParallelState, iteration: int | None,
                     make_vocab_size_divisible_by: int) -> LoadedModel:
    extra = read_common(load, iteration)["extra"]
    if "model_config" not in extra or "model_info" not in extra:
        raise ConfigError(f"--load {load}: this torch_dist checkpoint records no model_config/model_info, "
                          f"so the model cannot be rebuilt; save it with them in `extra`")
    config, info = _for_inference(TransformerConfig.from_dict(extra["model_config"])), extra["model_info"]
    model = GPTModel(config, info["vocab_size"], info["max_position_embeddings"], parallel_state=parallel_state,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    load_dist_checkpoint(load, [model], None, None, parallel_state, iteration, load_rng=False)
    model.to(device_mod.current_device()).eval()
    # pretrain_gpt.py records its --tokenizer-* flags: text prompts need no tokenizer flags then.
    return LoadedModel(model, info["vocab_size"], FORMAT, None, recorded_tokenizer(extra.get("tokenizer") or {}))


def build_inference_model(load: str, parallel_state: ParallelState, iteration: int | None = None,
                          make_vocab_size_divisible_by: int = 128) -> LoadedModel:
    """This rank's GPTModel (eval mode, on the current device) filled from ``load``; see the module doc."""
    # the format of that iteration (a directory may hold both); megatron-core's own torch_dist is read whole
    if is_torch_dist(load, iteration) and not megatron_lm_dist.is_megatron_core_checkpoint(load, iteration):
        return _build_from_dist(load, parallel_state, iteration, make_vocab_size_divisible_by)
    full, source = read_full_model(load, iteration)
    config = _for_inference(full.config)
    try:
        config.validate_parallel(parallel_state.tp_size, parallel_state.pp_size, None)
    except ValueError as exc:
        raise ConfigError(f"--tensor-model-parallel-size {parallel_state.tp_size} / --pipeline-model-parallel-size "
                          f"{parallel_state.pp_size} do not fit the model in {load}: {exc}") from None
    model = GPTModel(config, full.vocab_size, full.max_position_embeddings, parallel_state=parallel_state,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    state = rank_state_dict(full.state, config, full.vocab_size, make_vocab_size_divisible_by,
                            parallel_state.tp_size, parallel_state.tp_rank, parallel_state.pp_size,
                            parallel_state.pp_rank)
    model.load_state_dict(state, strict=True)
    model.to(device_mod.current_device()).eval()
    tokenizer = full.tokenizer or recorded_tokenizer(full.train_state.get(TOKENIZER_FLAGS) or {})
    return LoadedModel(model, full.vocab_size, source, full.hf_family, tokenizer)


def inference_tokenizer(load: str, saved: MegatronTokenizer | None, tokenizer_type: str | None,
                        tokenizer_model: str | None = None, vocab_file: str | None = None,
                        merge_file: str | None = None, vocab_size: int | None = None) -> MegatronTokenizer:
    """The tokenizer named by the ``--tokenizer-*`` flags, else ``saved`` (the one stored with the model).

    Raises ConfigError when neither is available (a training checkpoint of either format records its
    ``--tokenizer-*`` flags, used when the files are still there; one of an older legacy run records none).
    """
    if tokenizer_type is not None:
        try:
            return build_tokenizer(tokenizer_type, tokenizer_model=tokenizer_model, vocab_file=vocab_file,
                                   merge_file=merge_file, vocab_size=vocab_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if saved is not None:
        return saved
    raise ConfigError(f"--load {load} gives no tokenizer (a training checkpoint "
                      f"records its run's tokenizer files, which are not at the recorded paths from here): pass "
                      f"--tokenizer-type and --tokenizer-model (or --vocab-file/--merge-file), or use "
                      f"--prompt-tokens with token ids")
