"""Autoregressive generation with a GPTModel under TP and PP, with or without a KV cache.

Batched prompts of different lengths follow Megatron-LM's ``generate_tokens_probs_and_return_on_first_stage``:
prompts are right-padded, decoding starts at the shortest prompt's length, and a sequence still inside
its prompt keeps its prompt token instead of the sampled one. Causal attention makes each sequence's
tokens independent of the padding of the others, so the batch gives the same tokens as one prompt at
a time. Every rank runs this function: TP ranks gather the vocabulary-split logits and draw the same
token from the same seeded generator; under PP the hidden states go stage to stage and the last
stage broadcasts the chosen tokens to the pipeline.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_core.errors import ConfigError
from megatron_core.inference.context import InferenceContext
from megatron_core.inference.sampling import SamplingParams, sample
from megatron_core.models.gpt.gpt_model import GPTModel
from megatron_core.parallel_state import ParallelState, get_parallel_state


@dataclass
class GenerationOutput:
    """Per prompt: ``tokens`` = prompt + generated ids (up to and including EOD); ``generated`` counts the new ones.

    ``log_probs`` (with ``return_log_probs``): per prompt, ``len(tokens) - 1`` natural-log probabilities,
    entry ``i`` = log P(tokens[i + 1] | tokens[: i + 1]) under the model's own distribution (no temperature,
    top-k or top-p; TP padding ids excluded), as Megatron-LM's ``logprobs``; None otherwise.
    """

    tokens: list[list[int]]
    generated: list[int]
    log_probs: list[list[float]] | None = None


def _gather_vocab(logits: torch.Tensor, parallel_state: ParallelState) -> torch.Tensor:
    """[b, V / TP] -> [b, V] over the TP group (no autograd: inference only)."""
    if parallel_state.tp_size == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(parallel_state.tp_size)]
    dist.all_gather(parts, logits.contiguous(), group=parallel_state.tp_group)
    return torch.cat(parts, dim=-1)


def _stage_forward(model: GPTModel, tokens: torch.Tensor, positions: torch.Tensor,
                   context: InferenceContext | None, parallel_state: ParallelState,
                   every_position: bool = False) -> torch.Tensor | None:
    """One forward pass of this pipeline stage over ``tokens`` [b, s_new]; logits [b, V] of the last
    position (``every_position``: [b, s_new, V]) on the last stage, None elsewhere."""
    extra = {} if context is None else {"inference_context": context}
    pp = parallel_state.pp_size
    if pp > 1 and not parallel_state.is_pipeline_first_stage():
        shape = (tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        # float32 for an fp32 residual stream (fp32_residual_connection), else the params dtype
        hidden = torch.empty(shape, dtype=model.config.pipeline_communication_dtype, device=tokens.device)
        # On the pipeline group (src/dst are global ranks), not the default one: the server's requests and
        # failure agreement use that, with another timeout (inference/server.py).
        dist.recv(hidden, src=parallel_state.prev_pipeline_rank, group=parallel_state.pp_group)
        model.set_input_tensor(hidden)
    out = model(tokens, position_ids=positions, **extra)
    if pp > 1 and not parallel_state.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=parallel_state.next_pipeline_rank, group=parallel_state.pp_group)
        return None
    return _gather_vocab((out if every_position else out[:, -1, :]).float(), parallel_state)


def _token_log_probs(logits: torch.Tensor | None, targets: torch.Tensor, vocab_size: int,
                     parallel_state: ParallelState) -> torch.Tensor:
    """log P(targets) [b, n] from ``logits`` [b, n, V_padded] (last stage), on every pipeline rank."""
    out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    if logits is not None:
        log_probs = logits[..., :vocab_size].log_softmax(dim=-1)  # TP padding ids are no tokens
        out = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if parallel_state.pp_size > 1:
        dist.broadcast(out, src=parallel_state.pp_ranks[-1], group=parallel_state.pp_group)
    return out


def _next_tokens(logits: torch.Tensor | None, batch: int, params: SamplingParams, vocab_size: int,
                 generator: torch.Generator, parallel_state: ParallelState, device: torch.device) -> torch.Tensor:
    chosen = torch.empty(batch, dtype=torch.long, device=device)
    if logits is not None:
        logits[:, vocab_size:] = float("-inf")  # TP padding rows of the vocabulary are never generated
        chosen = sample(logits, params, generator)
    if parallel_state.pp_size > 1:
        dist.broadcast(chosen, src=parallel_state.pp_ranks[-1], group=parallel_state.pp_group)
    return chosen


def _check(model: GPTModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, vocab_size: int,
           parallel_state: ParallelState) -> int:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts: every prompt needs at least one token (nothing to condition on otherwise)")
    bad = next((t for p in prompts for t in p if not 0 <= t < vocab_size), None)
    if bad is not None:  # caught here, on every rank alike, not as an embedding error inside the forward
        raise ConfigError(f"prompt token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                          f"give ids the model's tokenizer produces")
    if max_new_tokens < 0:
        raise ConfigError(f"tokens_to_generate must be >= 0, got {max_new_tokens}")
    if parallel_state.vpp_size is not None:
        raise ConfigError("generation runs without virtual pipeline stages: load the model with "
                          "--virtual-pipeline-model-parallel-size unset (checkpoints reshard on load)")
    longest = max(len(p) for p in prompts)
    total, limit = longest + max_new_tokens, model.max_sequence_length
    if total > limit:
        fix = (f"shorten the prompt to at most {limit} tokens" if longest > limit else
               f"ask for at most {limit - longest} tokens" + (" (0 with logprobs scores the prompt)"
                                                             if longest == limit else ""))
        raise ConfigError(f"longest prompt ({longest} tokens) + tokens_to_generate ({max_new_tokens}) = {total} "
                          f"exceeds the model's --max-position-embeddings {limit}; {fix}")
    return total


@torch.no_grad()
def generate(model: GPTModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             eod_id: int | None, vocab_size: int, sampling: SamplingParams | None = None,
             use_kv_cache: bool = True, parallel_state: ParallelState | None = None,
             return_log_probs: bool = False) -> GenerationOutput:
    """Continue each prompt (token ids) by up to ``max_new_tokens``, stopping a sequence at ``eod_id``.

    ``return_log_probs``: also each token's log-probability (:class:`GenerationOutput`); with
    ``max_new_tokens`` 0 the prompts are scored in one forward pass (Megatron-LM's scoring path).

    ``model``: this rank's GPTModel chunk (eval mode is set here). ``vocab_size``: the true vocabulary;
    logits of TP padding ids are masked. Every rank of the model-parallel group must call this with the
    same arguments. Raises ConfigError for empty prompts, a token id outside ``[0, vocab_size)`` or a length
    beyond the position table.
    """
    ps = get_parallel_state(parallel_state)
    params = sampling or SamplingParams(top_k=1)
    params.validate()
    total = _check(model, prompts, max_new_tokens, vocab_size, ps)
    model.eval()
    device = next(model.parameters()).device
    batch = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((batch, total), eod_id if eod_id is not None else 0, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(list(p), dtype=torch.long)
    log_probs = torch.zeros(batch, max(total - 1, 0), device=device) if return_log_probs else None
    if log_probs is not None and max_new_tokens == 0:  # scoring: the prompts' tokens, one pass
        positions = torch.arange(0, total, device=device).expand(batch, -1)
        logits = _stage_forward(model, tokens, positions, None, ps, every_position=True)
        log_probs[:] = _token_log_probs(None if logits is None else logits[:, :-1], tokens[:, 1:], vocab_size, ps)
        return _collect(tokens, lengths, total, 0, eod_id, log_probs)
    generator = torch.Generator(device=device).manual_seed(params.seed)
    context = InferenceContext(batch, total) if use_kv_cache else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    prev, end = 0, total
    for pos in range(int(lengths.min()), total):
        chunk = tokens[:, prev:pos]
        positions = torch.arange(prev, pos, device=device).expand(batch, -1)
        every = _stage_forward(model, chunk, positions, context, ps, every_position=log_probs is not None)
        logits = every[:, -1, :] if every is not None and log_probs is not None else every
        new = _next_tokens(logits, batch, params, vocab_size, generator, ps, device)
        generating = lengths <= pos
        if eod_id is not None:
            new = torch.where(done, torch.full_like(new, eod_id), new)
        tokens[:, pos] = torch.where(generating, new, tokens[:, pos])
        if eod_id is not None:
            done |= generating & (new == eod_id)
        if log_probs is not None:  # positions prev..pos-1 predicted tokens prev+1..pos
            log_probs[:, prev:pos] = _token_log_probs(every, tokens[:, prev + 1:pos + 1], vocab_size, ps)
        end = pos + 1
        if context is not None:
            context.advance(pos - prev)
            prev = pos
        if bool((done | (lengths + max_new_tokens <= pos + 1)).all()):
            break
    return _collect(tokens, lengths, end, max_new_tokens, eod_id, log_probs)


def _collect(tokens: torch.Tensor, lengths: torch.Tensor, end: int, max_new_tokens: int,
             eod_id: int | None, log_probs: torch.Tensor | None = None) -> GenerationOutput:
    out, counts = [], []
    for row, length in zip(tokens.tolist(), lengths.tolist(), strict=True):
        # A short prompt in a batch may run past its own budget while longer ones catch up: cut it.
        new = row[length:min(end, length + max_new_tokens)]
        if eod_id is not None and eod_id in new:
            new = new[:new.index(eod_id) + 1]
        out.append(row[:length] + new)
        counts.append(len(new))
    scores = None if log_probs is None else [lp[:len(t) - 1] for lp, t in zip(log_probs.tolist(), out, strict=True)]
    return GenerationOutput(out, counts, scores)
