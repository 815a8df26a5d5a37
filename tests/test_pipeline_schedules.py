"""Pipeline schedules (1F1B, interleaved, no pipelining) on GPTModel against one-process training.

Each layout trains the same tiny GPT (dropout off) for 3 SGD steps on the same microbatches; the
per-microbatch losses, every gradient of every step, the parameters after the last step and the
forward-only (evaluation) losses must equal a plain serial loop's (fp32, relative 1e-5).
"""
import contextlib
import dataclasses
import functools
import os

import pytest
import torch
import torch.distributed as dist
from ddp_common import gpt_global_parameters
from equivalence import assert_rel_close
from harness import RankError, run_distributed

from megatron_core import parallel_state
from megatron_core.distributed import finalize_model_grads
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.models.presets import gpt2_config, llama_config
from megatron_core.pipeline_parallel import get_forward_backward_func
from megatron_core.tensor_parallel.utils import shard_of_master

VOCAB, SEQ, STEPS, MICRO_BATCH, LR = 64, 16, 3, 2, 0.5
EVAL_STEP = 99  # seed of the evaluation batches


def _config(preset: str = "gpt2", **overrides):
    values = dict(num_layers=4, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0)
    if preset == "llama":  # untied output, RMSNorm, SwiGLU (strided TP shards), RoPE, GQA
        values.update(num_query_groups=2, ffn_hidden_size=48)
    values.update(overrides)
    return gpt2_config(**values) if preset == "gpt2" else llama_config(**values)


def _build(config, parallel_state):
    return build_gpt_model_chunks(config, VOCAB, SEQ, parallel_state, make_vocab_size_divisible_by=32)


def microbatches(step: int, num_microbatches: int) -> list[dict]:
    """Deterministic microbatches; a few labels are masked so token counts differ between them."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g)
        mask = (torch.rand(MICRO_BATCH, SEQ, generator=g) > 0.3).float()
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask})
    return out


def loss_func(loss_mask, per_token_loss):
    loss = (per_token_loss * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def loss_func_per_token(loss_mask, per_token_loss):
    loss_sum = (per_token_loss * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int64)
    return loss_sum, num_tokens, {"lm loss": (loss_sum.detach(), num_tokens)}


def forward_step(data_iterator, model, per_token=False):
    batch = next(data_iterator)
    output = model(batch["tokens"], labels=batch["labels"])
    return output, functools.partial(loss_func_per_token if per_token else loss_func, batch["loss_mask"])


def _freeze(params: dict, frozen: tuple) -> None:
    """Parameters whose global name starts with one of ``frozen`` get no gradient (fine-tuning the rest)."""
    for name, p in params.items():
        if name.startswith(frozen):
            p.requires_grad_(False)


def _grads(params: dict) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}


def _reference(config, num_microbatches: int, per_token: bool, frozen: tuple = ()) -> dict:
    """Plain serial training: accumulate each microbatch's loss, then step."""
    ps = parallel_state.initialize_model_parallel(1, 1)
    config = dataclasses.replace(config, num_layers_in_first_pipeline_stage=None,
                                 num_layers_in_last_pipeline_stage=None, sequence_parallel=False)
    (model,) = _build(config, ps)
    params = gpt_global_parameters([model])
    _freeze(params, frozen)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads = [], []
    for step in range(STEPS):
        opt.zero_grad()
        batches = microbatches(step, num_microbatches)
        total_tokens = sum(b["loss_mask"].sum() for b in batches)
        step_losses = []
        for b in batches:
            per_token_loss = model(b["tokens"], labels=b["labels"])
            if per_token:
                loss_sum, _, _ = loss_func_per_token(b["loss_mask"], per_token_loss)
                (loss_sum / total_tokens).backward()
                step_losses.append(loss_sum.item())
            else:
                loss, _ = loss_func(b["loss_mask"], per_token_loss)
                (loss / num_microbatches).backward()
                step_losses.append(loss.item())
        losses.append(step_losses)
        grads.append(_grads(params))
        opt.step()
    with torch.no_grad():
        evals = [loss_func(b["loss_mask"], model(b["tokens"], labels=b["labels"]))[0].item()
                 for b in microbatches(EVAL_STEP, num_microbatches)]
    return {"losses": losses, "grads": grads, "eval": evals,
            "params": {n: p.detach().clone() for n, p in params.items()}}


def _pipeline(layout: dict, config, num_microbatches: int, per_token: bool) -> dict:
    ps = parallel_state.initialize_model_parallel(layout["tp"], layout["pp"], layout.get("vpp"))
    chunks = _build(config, ps)
    params = gpt_global_parameters(chunks)
    _freeze(params, layout.get("frozen", ()))
    opt = torch.optim.SGD([p for c in chunks for p in c.parameters()], lr=LR)
    schedule = get_forward_backward_func(ps)
    sent_outputs = []
    grad_scale = layout.get("grad_scale", 1.0)
    # Whether DP sync was allowed when each microbatch's gradient reached each chunk (that trains).
    sync = {"on": True}
    weights = [c.decoder.layers[0].mlp.linear_fc1.weight for c in chunks]
    weights = [w for w in weights if w.requires_grad]
    sync_flags: list[list[bool]] = [[] for _ in weights]
    for flags, weight in zip(sync_flags, weights, strict=True):
        weight.register_post_accumulate_grad_hook(lambda p, f=flags: f.append(sync["on"]))

    @contextlib.contextmanager
    def no_sync():
        sync["on"] = False
        yield
        sync["on"] = True

    def recording_forward_step(data_iterator, model):
        output, loss = forward_step(data_iterator, model, per_token)
        if not model.post_process:
            sent_outputs.append(output)
        return output, loss

    def run(step, forward_only):
        batches = microbatches(step, num_microbatches)
        iterators = [iter(batches) for _ in chunks]
        return schedule(forward_step_func=forward_step if forward_only else recording_forward_step,
                        data_iterator=iterators if len(chunks) > 1 else iterators[0], model=chunks,
                        num_microbatches=num_microbatches, seq_length=SEQ,
                        micro_batch_size=MICRO_BATCH, forward_only=forward_only,
                        finalize_model_grads_func=functools.partial(finalize_model_grads, parallel_state=ps),
                        calculate_per_token_loss=per_token and not forward_only, no_sync_func=no_sync,
                        grad_scale_func=(lambda loss: loss * grad_scale) if grad_scale != 1.0 else None)

    losses, grads = [], []
    for step in range(STEPS):
        opt.zero_grad()
        out = run(step, forward_only=False)
        for p in params.values():
            if p.grad is not None:
                p.grad /= grad_scale  # what an fp16 optimizer does before its step
        losses.append([(d["lm loss"][0] if per_token else d["lm loss"]).item() for d in out])
        grads.append(_grads(params))
        opt.step()
    evals = [d["lm loss"].item() for d in run(EVAL_STEP, forward_only=True)]
    shard = {n: ((p.partition_dim, p.partition_stride) if getattr(p, "tensor_model_parallel", False) else None)
             for n, p in params.items()}
    return {"losses": losses, "grads": grads, "eval": evals, "shard": shard, "tp": (ps.tp_rank, ps.tp_size),
            "last_stage": ps.is_pipeline_last_stage(), "params": {n: p.detach().clone() for n, p in params.items()},
            "outputs_freed": [o.numel() == 1 for o in sent_outputs], "sync_flags": sync_flags}


def _expected(ref: torch.Tensor, name: str, result: dict) -> torch.Tensor:
    """This rank's slice of the serial tensor, from the parameter's own partition attributes."""
    if result["shard"][name] is None:
        return ref
    (dim, stride), (tp_rank, tp_size) = result["shard"][name], result["tp"]
    return shard_of_master(ref, dim, stride, tp_rank, tp_size)


def _compare(results: list, ref: dict, num_microbatches: int) -> None:
    seen = set()
    for rank, res in enumerate(results):
        for name in res["params"]:
            seen.add(name)
            for step in range(STEPS):
                if ref["grads"][step][name] is None:  # frozen
                    assert res["grads"][step][name] is None, f"rank {rank} step {step}: frozen {name} got a gradient"
                    continue
                assert_rel_close(res["grads"][step][name], _expected(ref["grads"][step][name], name, res),
                                 what=f"rank {rank} step {step} grad {name}")
            assert_rel_close(res["params"][name], _expected(ref["params"][name], name, res),
                             what=f"rank {rank} {name} after {STEPS} steps")
        assert all(res["outputs_freed"]), f"rank {rank}: a sent stage output kept its storage"
        expected_flags = ([False] * (num_microbatches - 1) + [True]) * STEPS
        assert all(f == expected_flags for f in res["sync_flags"]), \
            f"rank {rank}: grad sync must be on for the last microbatch only, got {res['sync_flags']}"
        if res["last_stage"]:
            for step in range(STEPS):
                assert len(res["losses"][step]) == num_microbatches
                assert_rel_close(torch.tensor(res["losses"][step]), torch.tensor(ref["losses"][step]),
                                 what=f"rank {rank} step {step} losses")
            assert_rel_close(torch.tensor(res["eval"]), torch.tensor(ref["eval"]), what=f"rank {rank} eval losses")
        else:
            assert res["losses"] == [[]] * STEPS and res["eval"] == []
    assert seen == set(ref["params"]), f"parameters not covered: {set(ref['params']) - seen}"


LAYOUTS = {
    # name: (layout, config, microbatches, per-token loss)
    "pp2": ({"tp": 1, "pp": 2}, _config(), 4, False),
    # Fewer microbatches than stages: the pipeline never fills (one microbatch is a valid batch).
    "pp2-one-microbatch": ({"tp": 1, "pp": 2}, _config(num_layers=2), 1, False),
    "pp4-lighter-ends": ({"tp": 1, "pp": 4}, _config(num_layers=8, num_layers_in_first_pipeline_stage=1,
                                                     num_layers_in_last_pipeline_stage=1), 6, False),
    "pp2-vpp2-grad-scale": ({"tp": 1, "pp": 2, "vpp": 2, "grad_scale": 8.0}, _config(), 4, False),
    "pp2-vpp2-llama-per-token": ({"tp": 1, "pp": 2, "vpp": 2}, _config("llama"), 2, True),
    "pp4-vpp2": ({"tp": 1, "pp": 4, "vpp": 2}, _config(num_layers=8), 8, False),
    "tp2-pp2-sp": ({"tp": 2, "pp": 2}, _config(sequence_parallel=True), 3, False),
    "tp2-pp2-llama": ({"tp": 2, "pp": 2}, _config("llama"), 2, False),
    # Fine-tuning the top: the first stage (embeddings, layers 1-2) and the tied output weight frozen,
    # so the first stage's output needs no gradient (its backward has nothing to run).
    "pp2-first-stage-frozen": ({"tp": 1, "pp": 2, "frozen": ("embedding.", "decoder.layers.1.", "decoder.layers.2.")},
                               _config(), 4, False),
    # Interleaved: stage 0's first model chunk (embeddings, layers 1-2) frozen, its second (5-6) trains.
    "pp2-vpp2-first-chunk-frozen": ({"tp": 1, "pp": 2, "vpp": 2,
                                     "frozen": ("embedding.", "decoder.layers.1.", "decoder.layers.2.")},
                                    _config(num_layers=8), 4, False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_training_equals_one_process(name):
    layout, config, m, per_token = LAYOUTS[name]
    (ref,) = run_distributed(_reference, 1, config, m, per_token, layout.get("frozen", ()), timeout=60)
    world = layout["tp"] * layout["pp"]
    results = run_distributed(_pipeline, world, layout, config, m, per_token, timeout=90)
    _compare(results, ref, m)


def _at_seq(seq, fn, *args):
    """``fn`` with this module's SEQ set to ``seq`` (a forked rank of its own: the change ends with it)."""
    globals()["SEQ"] = seq
    return fn(*args)


def test_pipeline_past_one_causal_query_block_equals_one_process():
    """Sequence 140 through the explicit attention path (its causal query blocks: 128 rows, then 12)
    under TP2 x PP2 with sequence parallelism and micro-batch size 2."""
    config = _config("llama", num_layers=2, attention_backend="unfused", sequence_parallel=True)
    (ref,) = run_distributed(_at_seq, 1, 140, _reference, dataclasses.replace(config, sequence_parallel=False), 2,
                             False, timeout=60)
    results = run_distributed(_at_seq, 4, 140, _pipeline, {"tp": 2, "pp": 2}, config, 2, False, timeout=90)
    _compare(results, ref, 2)


def test_no_pipelining_accumulates_gradients():
    config = _config(num_layers=2)
    (ref,) = run_distributed(_reference, 1, config, 3, False, timeout=60)
    results = run_distributed(_pipeline, 1, {"tp": 1, "pp": 1}, config, 3, False, timeout=60)
    _compare(results, ref, 3)


def _tied_embeddings_after_training():
    ps = parallel_state.initialize_model_parallel(1, 2)
    (chunk,) = _build(_config(num_layers=2), ps)
    weight = chunk.shared_embedding_or_output_weight()  # word embedding on stage 0, output layer on 1
    start = weight.detach().clone()
    opt = torch.optim.SGD(chunk.parameters(), lr=LR)
    schedule = get_forward_backward_func(ps)
    for step in range(STEPS):
        opt.zero_grad()
        schedule(forward_step_func=forward_step, data_iterator=iter(microbatches(step, 2)), model=[chunk],
                 num_microbatches=2, seq_length=SEQ, micro_batch_size=MICRO_BATCH,
                 finalize_model_grads_func=functools.partial(finalize_model_grads, parallel_state=ps))
        opt.step()
    return start, weight.detach().clone()


def test_tied_embedding_and_output_weight_stay_equal():
    (first_start, first_end), (last_start, last_end) = run_distributed(_tied_embeddings_after_training, 2,
                                                                       timeout=60)
    assert torch.equal(first_start, last_start), "tied copies must start identical"
    assert not torch.equal(first_start, first_end), "training did not change the embedding"
    assert_rel_close(last_end, first_end, what="output weight vs embedding after 3 steps")


def _stage_raises(report_dir: str):
    ps = parallel_state.initialize_model_parallel(1, 4)
    (chunk,) = _build(_config(), ps)
    calls = []

    def failing_forward_step(data_iterator, model):
        calls.append(1)
        if ps.pp_rank == 2 and len(calls) == 2:
            raise ValueError("stage 2 failed on purpose")
        return forward_step(data_iterator, model)

    try:
        get_forward_backward_func(ps)(
            forward_step_func=failing_forward_step, data_iterator=iter(microbatches(0, 4)),
            model=[chunk], num_microbatches=4, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
    except Exception as exc:
        with open(os.path.join(report_dir, f"rank{dist.get_rank()}.txt"), "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise


def test_a_failing_stage_fails_every_rank_with_its_error(tmp_path):
    with pytest.raises(RankError) as info:
        run_distributed(_stage_raises, 4, str(tmp_path), timeout=60)
    message = str(info.value)
    assert message.startswith("rank 2 of 4 raised (ranks [0, 1, 3] also failed)"), message[:300]
    assert "ValueError: stage 2 failed on purpose" in message
    # The other ranks failed on their own (not killed by the harness), naming the root cause.
    for rank in (0, 1, 3):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("PipelineStageError: global rank 2 "), text[:300]
        assert "ValueError: stage 2 failed on purpose" in text


def _bad_interleaving():
    ps = parallel_state.initialize_model_parallel(1, 2, 2)
    chunks = _build(_config(), ps)
    batches = microbatches(0, 3)
    get_forward_backward_func(ps)(forward_step_func=forward_step, data_iterator=[iter(batches), iter(batches)],
                                  model=chunks, num_microbatches=3, seq_length=SEQ, micro_batch_size=MICRO_BATCH)


def test_interleaving_rejects_microbatches_not_divisible_by_pipeline_size():
    with pytest.raises(RankError, match=r"needs the number of microbatches \(3\) to be a multiple of "
                                        r"--pipeline-model-parallel-size 2"):
        run_distributed(_bad_interleaving, 2, timeout=60)


def _wrong_seq_length():
    ps = parallel_state.initialize_model_parallel(1, 2)
    (chunk,) = _build(_config(num_layers=2), ps)
    get_forward_backward_func(ps)(forward_step_func=forward_step, data_iterator=iter(microbatches(0, 2)),
                                  model=[chunk], num_microbatches=2, seq_length=2 * SEQ, micro_batch_size=MICRO_BATCH)


def test_a_stage_output_of_the_wrong_shape_is_named():
    with pytest.raises(RankError, match=r"(?s)rank 0 of 2 raised.*pipeline activation to send has shape \(16, 2, 32\).*"
                                        r"exchanges \(32, 2, 32\)"):
        run_distributed(_wrong_seq_length, 2, timeout=60)


def _connection_reset_in_one_process():
    ps = parallel_state.initialize_model_parallel(1, 1)
    (chunk,) = _build(_config(num_layers=2), ps)

    def streamed_forward_step(data_iterator, model):  # as a data iterator reading from a remote data service
        raise ConnectionResetError("[Errno 104] Connection reset by peer")

    get_forward_backward_func(ps)(forward_step_func=streamed_forward_step, data_iterator=iter(microbatches(0, 2)),
                                  model=[chunk], num_microbatches=2, seq_length=SEQ, micro_batch_size=MICRO_BATCH)


def test_a_connection_error_in_one_process_is_its_own_not_a_lost_peer():
    """With one process there is no peer to lose: a connection reset raised by the forward step (a remote
    data service) is reported as it is, not as 'a peer was lost ... check the other ranks' logs'."""
    with pytest.raises(RankError) as info:
        run_distributed(_connection_reset_in_one_process, 1, timeout=60)
    message = str(info.value)
    assert "ConnectionResetError: [Errno 104] Connection reset by peer" in message, message[-2000:]
    assert "PipelineStageError" not in message and "a peer was lost" not in message, message[-2000:]
