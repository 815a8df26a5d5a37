"""A tiny tensor- and pipeline-parallel language model for fast tests of schedules and gradient sync.

It follows the model contract of docs/design.md (pre_process / post_process, set_input_tensor,
[s, b, h] activations, per-token loss on the last stage, tied embeddings marked
``shared_embedding``) with residual MLP blocks instead of attention. Every component's full
weight is drawn from its own seed, so any TP / PP / virtual-stage split holds slices of the same
full model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from megatron_core.parallel_state import ParallelState
from megatron_core.pipeline_parallel.layer_split import chunk_layer_counts, layer_range
from megatron_core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_method_normal,
    vocab_parallel_cross_entropy,
)
from megatron_core.tensor_parallel.utils import sharded_parameter


@dataclasses.dataclass
class ToyConfig:
    """Sizes of the toy model (``hidden_size`` and ``sequence_parallel`` are read by the schedules)."""

    num_layers: int = 8
    hidden_size: int = 32
    ffn_hidden_size: int = 64
    vocab_size: int = 64
    seq_length: int = 16
    sequence_parallel: bool = False
    first_stage_layers: int | None = None  # lighter first / last stages (pipeline runs only)
    last_stage_layers: int | None = None
    init_seed: int = 1234


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw a component's weights from its own seed, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ToyLayer(torch.nn.Module):
    """x + W2 gelu(W1 LayerNorm(x)) with W1 column- and W2 row-parallel."""

    def __init__(self, config: ToyConfig, layer_number: int, parallel_state: ParallelState) -> None:
        super().__init__()
        self.layer_number = layer_number
        sp, h = config.sequence_parallel, config.hidden_size
        with _seeded(config.init_seed + 17 * (layer_number + 1)):
            self.norm = torch.nn.LayerNorm(h)
            with torch.no_grad():
                self.norm.weight.normal_(1.0, 0.1)
                self.norm.bias.normal_(0.0, 0.1)
            self.fc1 = ColumnParallelLinear(h, config.ffn_hidden_size, sequence_parallel=sp,
                                            init_method=init_method_normal(0.2), parallel_state=parallel_state)
            self.fc2 = RowParallelLinear(config.ffn_hidden_size, h, sequence_parallel=sp,
                                         init_method=init_method_normal(0.2), parallel_state=parallel_state)
        for p in self.norm.parameters():
            p.sequence_parallel = sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.fc1(self.norm(x))
        z, _ = self.fc2(F.gelu(y))
        return x + z


class ToyModel(torch.nn.Module):
    """One (virtual) pipeline stage of the toy language model."""

    def __init__(self, config: ToyConfig, parallel_state: ParallelState, pre_process: bool, post_process: bool,
                 vp_stage: int | None = None) -> None:
        super().__init__()
        self.config, self.parallel_state = config, parallel_state
        self.pre_process, self.post_process = pre_process, post_process
        counts = chunk_layer_counts(config.num_layers, parallel_state.pp_size, parallel_state.vpp_size,
                                    first_stage_layers=config.first_stage_layers,
                                    last_stage_layers=config.last_stage_layers)
        offset, count = layer_range(counts, parallel_state.pp_size, parallel_state.pp_rank, vp_stage)
        sp, h, vocab = config.sequence_parallel, config.hidden_size, config.vocab_size
        tied_across_ranks = parallel_state.pp_size > 1
        if pre_process:
            with _seeded(config.init_seed):
                self.embedding = VocabParallelEmbedding(vocab, h, init_method=init_method_normal(1.0),
                                                        reduce_scatter_embeddings=sp, parallel_state=parallel_state)
            self.embedding.weight.shared_embedding = tied_across_ranks
        self.layers = torch.nn.ModuleList(ToyLayer(config, offset + i, parallel_state) for i in range(count))
        if post_process:
            self.final_norm = torch.nn.LayerNorm(h)
            for p in self.final_norm.parameters():
                p.sequence_parallel = sp
            self.output_layer = ColumnParallelLinear(h, vocab, bias=False, sequence_parallel=sp, parallel_state=parallel_state)
            del self.output_layer.weight  # the logits use the (tied) word embedding
            if not pre_process:
                # Same seeded draw as the first stage's embedding, so the two copies start equal.
                with _seeded(config.init_seed):
                    self.output_weight = sharded_parameter((vocab, h), 0, init_method_normal(1.0), stride=1,
                                                           rank=parallel_state.tp_rank, world=parallel_state.tp_size,
                                                           dtype=torch.float32, device=torch.device("cpu"))
                self.output_weight.shared_embedding = True
        self.input_tensor: torch.Tensor | None = None

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        self.input_tensor = tensor

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_process:
            x = self.embedding(tokens)
            if not self.config.sequence_parallel:
                x = x.transpose(0, 1).contiguous()  # [b, s, h] -> [s, b, h]
        else:
            x = self.input_tensor
        for layer in self.layers:
            x = layer(x)
        if not self.post_process:
            return x
        weight = self.embedding.weight if self.pre_process else self.output_weight
        logits, _ = self.output_layer(self.final_norm(x), weight=weight)  # [s, b, vocab / TP]
        return vocab_parallel_cross_entropy(logits, labels.t().contiguous(), self.parallel_state.tp_group).t()  # [b, s]


def build_toy_chunks(config: ToyConfig, parallel_state: ParallelState) -> list[ToyModel]:
    """This rank's model chunks (one per virtual stage)."""
    vpp = parallel_state.vpp_size or 1
    return [ToyModel(config, parallel_state, pre_process=parallel_state.is_pipeline_first_stage(v if vpp > 1 else None),
                     post_process=parallel_state.is_pipeline_last_stage(v if vpp > 1 else None),
                     vp_stage=v if vpp > 1 else None) for v in range(vpp)]


def global_parameters(chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Parameters by a split-independent name (``layers.<global number>.<name>``)."""
    named = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if name.startswith("layers."):
                _, local, rest = name.split(".", 2)
                name = f"layers.{chunk.layers[int(local)].layer_number}.{rest}"
            named[name] = p
    return named


# ---- data and the user's forward step --------------------------------------------------------
def microbatches(config: ToyConfig, step: int, num_microbatches: int, micro_batch_size: int) -> list[dict]:
    """Deterministic microbatches; a few labels are masked so token counts differ between them."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, config.vocab_size, (micro_batch_size, config.seq_length), generator=g)
        labels = torch.randint(0, config.vocab_size, (micro_batch_size, config.seq_length), generator=g)
        mask = (torch.rand(micro_batch_size, config.seq_length, generator=g) > 0.3).float()
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask})
    return out


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def loss_func_per_token(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss_sum = (per_token_loss * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int64)
    return loss_sum, num_tokens, {"lm loss": (loss_sum.detach(), num_tokens)}


def forward_step(data_iterator: Iterator[dict], model: ToyModel, per_token: bool = False):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["labels"])
    return output, functools.partial(loss_func_per_token if per_token else loss_func, batch["loss_mask"])
