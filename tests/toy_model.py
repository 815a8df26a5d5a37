"""The one tiny TP- and PP-composable language model of the DP / ZeRO / optimizer / memory tests (no tests here).

The pipeline-schedule tests use GPTModel itself.

Residual MLP blocks ``x + W2 gelu(W1 LayerNorm(x))`` (W1 column-, W2 row-parallel, the layernorm
replicated over TP), a vocab-parallel word embedding tied to the output layer (marked
``shared_embedding`` when first and last stage differ) and per-token cross entropy on the last
stage. Every component's full weight comes from its own seed, so any TP / PP split holds slices of
the same full model and can be compared with one process.
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

    num_layers: int = 2
    hidden_size: int = 32
    ffn_hidden_size: int = 64
    vocab_size: int = 64
    seq_length: int = 16
    sequence_parallel: bool = False
    init_seed: int = 1234

    # The interface ddp_common drives a test model through (GPT implements it too).
    def build_chunks(self, parallel_state: ParallelState) -> list[torch.nn.Module]:
        return build_toy_chunks(self, parallel_state)

    def serial(self) -> ToyConfig:
        """The same model for one process."""
        return dataclasses.replace(self, sequence_parallel=False)

    def global_parameters(self, chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
        return global_parameters(chunks)

    def microbatches(self, step: int, count: int, micro_batch_size: int) -> list[dict]:
        return microbatches(self, step, count, micro_batch_size)

    def forward_step(self, data_iterator, model):
        return forward_step(data_iterator, model)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return loss_func(batch["loss_mask"], model(batch["tokens"], batch["labels"]))[0]


@contextlib.contextmanager
def _seed(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ToyBlock(torch.nn.Module):
    """One residual MLP block; ``layer_number`` is global (split independent)."""

    def __init__(self, config: ToyConfig, layer_number: int, parallel_state: ParallelState) -> None:
        super().__init__()
        self.layer_number = layer_number
        sp, h = config.sequence_parallel, config.hidden_size
        with _seed(config.init_seed + 31 * (layer_number + 1)):
            self.norm = torch.nn.LayerNorm(h)
            with torch.no_grad():
                self.norm.weight.normal_(1.0, 0.1)
                self.norm.bias.normal_(0.0, 0.1)
            self.fc1 = ColumnParallelLinear(h, config.ffn_hidden_size, sequence_parallel=sp,
                                            init_method=init_method_normal(0.2), parallel_state=parallel_state)
            self.fc2 = RowParallelLinear(config.ffn_hidden_size, h, sequence_parallel=sp,
                                         init_method=init_method_normal(0.2), parallel_state=parallel_state)
            with torch.no_grad():  # full draws, cut to this TP rank's shard: the same at every TP size
                fc1_bias = 0.1 * torch.randn(config.ffn_hidden_size)
                self.fc1.bias.copy_(fc1_bias.chunk(parallel_state.tp_size)[parallel_state.tp_rank])
                self.fc2.bias.copy_(0.1 * torch.randn(h))
        for p in self.norm.parameters():
            p.sequence_parallel = sp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(self.norm(x))
        out, _ = self.fc2(F.gelu(h))
        return x + out


class ToyLM(torch.nn.Module):
    """One (virtual) pipeline stage of the toy language model."""

    def __init__(self, config: ToyConfig, parallel_state: ParallelState, pre_process: bool = True,
                 post_process: bool = True, vp_stage: int | None = None) -> None:
        super().__init__()
        self.config, self.parallel_state = config, parallel_state
        self.pre_process, self.post_process = pre_process, post_process
        counts = chunk_layer_counts(config.num_layers, parallel_state.pp_size, parallel_state.vpp_size)
        first, count = layer_range(counts, parallel_state.pp_size, parallel_state.pp_rank, vp_stage)
        h, vocab, sp = config.hidden_size, config.vocab_size, config.sequence_parallel
        if pre_process:
            with _seed(config.init_seed):
                self.embedding = VocabParallelEmbedding(vocab, h, init_method=init_method_normal(1.0),
                                                        reduce_scatter_embeddings=sp, parallel_state=parallel_state)
            self.embedding.weight.shared_embedding = parallel_state.pp_size > 1
        self.blocks = torch.nn.ModuleList(ToyBlock(config, first + i, parallel_state) for i in range(count))
        if post_process:
            self.final_norm = torch.nn.LayerNorm(h)
            for p in self.final_norm.parameters():
                p.sequence_parallel = sp
            self.head = ColumnParallelLinear(h, vocab, bias=False, sequence_parallel=sp, parallel_state=parallel_state)
            del self.head.weight  # logits use the tied word embedding
            if not pre_process:
                with _seed(config.init_seed):  # the same draw as the first stage's embedding
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
        for block in self.blocks:
            x = block(x)
        if not self.post_process:
            return x
        weight = self.embedding.weight if self.pre_process else self.output_weight
        logits, _ = self.head(self.final_norm(x), weight=weight)
        return vocab_parallel_cross_entropy(logits, labels.t().contiguous(), self.parallel_state.tp_group).t()  # [b, s]


def build_toy_chunks(config: ToyConfig, parallel_state: ParallelState) -> list[ToyLM]:
    """This rank's chunks, one per virtual pipeline stage."""
    stages = [None] if parallel_state.vpp_size is None else list(range(parallel_state.vpp_size))
    return [ToyLM(config, parallel_state, parallel_state.is_pipeline_first_stage(v),
                  parallel_state.is_pipeline_last_stage(v), v) for v in stages]


def global_parameters(chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Parameters by split-independent names (``blocks.<global layer>.<name>``; the tied output
    weight of a separate last stage under the embedding's name)."""
    named = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if name.startswith("blocks."):
                _, local, rest = name.split(".", 2)
                name = f"blocks.{chunk.blocks[int(local)].layer_number}.{rest}"
            elif name == "output_weight":
                name = "embedding.weight"
            named[name] = p
    return named


def microbatches(config: ToyConfig, step: int, count: int, micro_batch_size: int) -> list[dict]:
    """Deterministic microbatches with a loss mask (a prefix of a longer draw is the same batches)."""
    g = torch.Generator().manual_seed(4242 + step)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, config.vocab_size, (micro_batch_size, config.seq_length), generator=g)
        labels = torch.randint(0, config.vocab_size, (micro_batch_size, config.seq_length), generator=g)
        mask = (torch.rand(micro_batch_size, config.seq_length, generator=g) > 0.25).float()
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask})
    return out


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = next(data_iterator)
    return model(batch["tokens"], batch["labels"]), functools.partial(loss_func, batch["loss_mask"])
