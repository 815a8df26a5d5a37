"""Text generation: greedy decoding equals Hugging Face ``generate`` token for token (GPT-2 and Llama,
TP 1 and 2, batched prompts of different lengths, stop at EOD), and the KV cache changes nothing."""
import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from megatron_core import parallel_state
from megatron_core.dist_checkpointing import save_dist_checkpoint
from megatron_core.errors import ConfigError
from megatron_core.inference import InferenceContext, SamplingParams, generate
from megatron_core.inference.loading import build_inference_model
from megatron_core.models.gpt import GPTModel
from tests.hf_testing import core_config_of, load_hf_weights, tiny_hf_gpt2, tiny_hf_llama

BUILDERS = {"gpt2": tiny_hf_gpt2, "llama": tiny_hf_llama}
PROMPTS = [[5, 17, 99], [200, 3, 41, 7, 8, 150, 12], [64, 9, 9, 1, 77]]
NEW_TOKENS = 10


def _hf_greedy(hf_model, prompt, new_tokens, eod):
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=eod, pad_token_id=eod if eod is not None else 0,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()


def _ours(hf_model, runs, pp=1, **overrides):
    world = dist.get_world_size()
    ps = parallel_state.initialize_model_parallel(world // pp, pp)
    ps.manual_seed(1)
    config, vocab, positions = core_config_of(hf_model, **overrides)
    model = GPTModel(config, vocab, positions, parallel_state=ps, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), make_vocab_size_divisible_by=8)
    load_hf_weights(model, hf_model, 8, ps)
    return [generate(model, prompts, NEW_TOKENS, eod_id=eod, vocab_size=vocab, sampling=params,
                     use_kv_cache=cache, parallel_state=ps) for prompts, eod, params, cache in runs]


@pytest.mark.parametrize("kind,tp", [("gpt2", 1), ("gpt2", 2), ("llama", 1), ("llama", 2)])
def test_greedy_matches_hf_generate(kind, tp):
    hf_model = BUILDERS[kind](vocab_size=250)  # padded to 256 at TP 2: padding ids must never appear
    free = [_hf_greedy(hf_model, p, NEW_TOKENS, None) for p in PROMPTS]
    # An EOD that greedy decoding actually produces, third new token of the first prompt: stops early.
    eod = free[0][len(PROMPTS[0]) + 2]
    stopped = [_hf_greedy(hf_model, p, NEW_TOKENS, eod) for p in PROMPTS]
    runs = [(PROMPTS, None, None, True), (PROMPTS, None, None, False), (PROMPTS, eod, None, True)]
    results = run_distributed(_ours, tp, hf_model, runs, timeout=120)
    for rank, (cached, uncached, with_eod) in enumerate(results):
        assert cached.tokens == free, f"{kind} TP={tp} rank {rank}: KV-cached greedy differs from HF generate"
        assert uncached.tokens == free, f"{kind} TP={tp} rank {rank}: uncached greedy differs from HF generate"
        assert with_eod.tokens == stopped, f"{kind} TP={tp} rank {rank}: stop at EOD differs from HF generate"
    first_eod = free[0][len(PROMPTS[0]):].index(eod) + 1
    assert results[0][2].generated[0] == first_eod <= 3, "the first prompt must stop at its first EOD"


def test_prompts_past_one_causal_query_block_match_hf_generate():
    """Prompts of 131 and 140 tokens through the explicit attention path: the uncached forwards take
    its causal query blocks (128 rows, then the rest), the cached ones its masked path."""
    hf_model = tiny_hf_llama(positions=160)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (131, 140)]
    free = [_hf_greedy(hf_model, p, NEW_TOKENS, None) for p in prompts]
    runs = [(prompts, None, None, False), (prompts, None, None, True)]
    (uncached, cached), = run_distributed(_ours, 1, hf_model, runs, attention_backend="unfused", timeout=120)
    assert uncached.tokens == free, "uncached greedy past 128 prompt tokens differs from HF generate"
    assert cached.tokens == free, "KV-cached greedy past 128 prompt tokens differs from HF generate"


def test_sampling_seeded_cache_and_pipeline():
    """Seeded top-k / top-p / temperature sampling: same tokens with and without the KV cache, on every
    rank of TP 2 x PP 2, and as in one process; another seed draws other tokens."""
    hf_model = tiny_hf_llama(layers=4)
    runs = [(PROMPTS, None, SamplingParams(temperature=0.8, top_k=20, seed=3), True),
            (PROMPTS, None, SamplingParams(temperature=0.8, top_k=20, seed=3), False),
            (PROMPTS, None, SamplingParams(temperature=1.2, top_p=0.9, seed=3), True),
            (PROMPTS, None, SamplingParams(temperature=1.2, top_p=0.9, seed=4), True),
            (PROMPTS, None, None, True)]
    single = run_distributed(_ours, 1, hf_model, runs, timeout=120)[0]
    assert single[0].tokens == single[1].tokens, "KV cache changed seeded top-k sampling"
    assert single[2].tokens != single[3].tokens, "different seeds drew the same 30 tokens"
    assert single[4].tokens == [_hf_greedy(hf_model, p, NEW_TOKENS, None) for p in PROMPTS]
    for rank, outs in enumerate(run_distributed(_ours, 4, hf_model, runs, pp=2, timeout=180)):
        for i, (ours, ref) in enumerate(zip(outs, single, strict=True)):
            assert ours.tokens == ref.tokens, f"TP2 x PP2 rank {rank}, run {i} differs from one process"


def test_bad_requests_raise_config_error():
    hf_model = tiny_hf_gpt2()
    for runs in ([([[]], None, None, True)], [([[1] * 30], None, None, True)],
                 [(PROMPTS, None, SamplingParams(top_p=1.5), True)], [([[5, 256]], None, None, True)],
                 [([[-1, 5]], None, None, True)]):
        with pytest.raises(Exception, match="ConfigError"):
            run_distributed(_ours, 1, hf_model, runs, timeout=60)
    assert issubclass(ConfigError, ValueError)


def _save_dist(hf_model, directory, keys=("model_config", "model_info")):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config, vocab, positions = core_config_of(hf_model)
    model = GPTModel(config, vocab, positions, parallel_state=ps, make_vocab_size_divisible_by=8)
    load_hf_weights(model, hf_model, 8, ps)
    info = {"vocab_size": vocab, "max_position_embeddings": positions, "make_vocab_size_divisible_by": 8}
    extra = {"model_config": config.to_dict(), "model_info": info}
    save_dist_checkpoint(directory, 5, [model], None, None, ps, extra={k: extra[k] for k in keys}).wait()


def _generate_from(directory):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    loaded = build_inference_model(directory, ps, make_vocab_size_divisible_by=100)
    return loaded.source, generate(loaded.model, PROMPTS, NEW_TOKENS, eod_id=None, vocab_size=loaded.vocab_size,
                                   parallel_state=ps).tokens


def test_torch_dist_checkpoint_generates_under_another_tp(tmp_path):
    """Saved at TP 2 (vocabulary padded to 256), generated from at TP 1 (padded to 300): same as HF."""
    hf_model = tiny_hf_llama(vocab_size=250)
    run_distributed(_save_dist, 2, hf_model, str(tmp_path), timeout=60)
    ((source, tokens),) = run_distributed(_generate_from, 1, str(tmp_path), timeout=60)
    assert source == "torch_dist"
    assert tokens == [_hf_greedy(hf_model, p, NEW_TOKENS, None) for p in PROMPTS]


@pytest.mark.parametrize("keys", [("model_config",), ("model_info",)])
def test_torch_dist_checkpoint_without_model_description_is_a_config_error(tmp_path, keys):
    """A torch_dist checkpoint that lacks either record cannot rebuild the model: one ConfigError naming both."""
    run_distributed(_save_dist, 1, tiny_hf_gpt2(), str(tmp_path), keys, timeout=60)
    with pytest.raises(Exception, match="ConfigError: --load .* records no model_config/model_info"):
        run_distributed(_generate_from, 1, str(tmp_path), timeout=60)


def test_top_k_sampling_draws_only_from_the_k_largest_logits():
    """Megatron-LM's top-k: every other logit is masked, so the draws cover exactly the k best ids."""
    from megatron_core.inference.sampling import sample

    g = torch.Generator().manual_seed(0)
    for batch in (1, 400):  # one row (k larger than the batch) and many
        logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0, 0.0]]).expand(batch, -1)
        for k, best in ((3, {1, 2, 3}), (2, {1, 3})):
            draws = [sample(logits, SamplingParams(temperature=1.0, top_k=k), g).tolist() for _ in range(400 // batch)]
            assert set(sum(draws, [])) == best, (batch, k)


def test_top_p_one_is_accepted_and_keeps_every_id():
    """top_p is in [0, 1] as Megatron-LM checks it; 1 keeps the whole vocabulary (the ids' probabilities sum to 1)."""
    from megatron_core.inference.sampling import sample

    params = SamplingParams(temperature=1.0, top_p=1.0)
    params.validate()
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 0.5, 1.0, 1.5]]).expand(400, -1)
    assert set(sample(logits, params, g).tolist()) == {0, 1, 2, 3}


def test_kv_cache_holds_max_sequence_length_positions():
    """InferenceContext(b, s) takes s positions (generate asks for prompt + new tokens, and feeds all but the
    last); the position past them is refused, as is a batch past b."""
    context = InferenceContext(max_batch_size=2, max_sequence_length=5)
    kv = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 1, 3)
    context.append(1, kv[:3], -kv[:3])
    context.advance(3)
    k, v = context.append(1, kv[3:], -kv[3:])  # positions 3 and 4: the cache is full
    assert torch.equal(k, kv) and torch.equal(v, -kv)
    context.advance(2)
    with pytest.raises(ValueError, match=r"KV cache holds 5 positions x 2 sequences; asked for positions up to 6 x 2"):
        context.append(1, kv[:1], kv[:1])
    with pytest.raises(ValueError, match=r"asked for positions up to 1 x 3"):
        InferenceContext(2, 5).append(1, torch.zeros(1, 3, 1, 3), torch.zeros(1, 3, 1, 3))


def _forward_counts(hf_model, prompts, eod):
    """(GenerationOutput, number of model forwards) of one greedy KV-cached run at TP 1."""
    ps = parallel_state.initialize_model_parallel(1)
    config, vocab, positions = core_config_of(hf_model)
    model = GPTModel(config, vocab, positions, parallel_state=ps, make_vocab_size_divisible_by=8)
    load_hf_weights(model, hf_model, 8, ps)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    out = generate(model, prompts, NEW_TOKENS, eod_id=eod, vocab_size=vocab, parallel_state=ps)
    return out, len(calls)


def test_generation_stops_once_every_sequence_is_finished():
    """The loop ends at the step where the last sequence reaches EOD or its own token budget, not after
    longest prompt + max_new_tokens: one forward when the only prompt stops at its first new token, and
    with a short prompt (budget spent at step 10) beside a long one that stops at once, 10 forwards not 14."""
    hf_model = tiny_hf_gpt2()
    short, long_ = PROMPTS[0], PROMPTS[1]
    free_long = _hf_greedy(hf_model, long_, NEW_TOKENS, None)
    eod = free_long[len(long_)]  # the long prompt's first greedy token
    free_short = _hf_greedy(hf_model, short, NEW_TOKENS, None)
    assert eod not in free_short[len(short):], "pick prompts whose short continuation avoids this EOD"
    (alone, alone_calls), = run_distributed(_forward_counts, 1, hf_model, [long_], eod, timeout=60)
    assert alone.generated == [1] and alone_calls == 1, (alone.generated, alone_calls)
    (both, calls), = run_distributed(_forward_counts, 1, hf_model, [short, long_], eod, timeout=60)
    assert both.generated == [NEW_TOKENS, 1], both.generated
    assert both.tokens == [free_short, free_long[:len(long_) + 1]]
    # Positions 3..12: the short prompt spends its budget at 12, the long one stopped at 7; 14 without the stop.
    assert calls == NEW_TOKENS, f"{calls} forwards: the loop ran past the step where the last sequence finished"


def _with_log_probs(hf_model, pp, runs):
    world = dist.get_world_size()
    ps = parallel_state.initialize_model_parallel(world // pp, pp)
    ps.manual_seed(1)
    config, vocab, positions = core_config_of(hf_model)
    model = GPTModel(config, vocab, positions, parallel_state=ps, pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(), make_vocab_size_divisible_by=8)
    load_hf_weights(model, hf_model, 8, ps)
    return [generate(model, PROMPTS, new_tokens, eod_id=None, vocab_size=vocab, sampling=params, use_kv_cache=cache,
                     parallel_state=ps, return_log_probs=True) for new_tokens, params, cache in runs]


@pytest.mark.parametrize("kind,tp,pp", [("gpt2", 2, 1), ("llama", 2, 1), ("llama", 1, 2)])
def test_log_probs_equal_hf_log_softmax(kind, tp, pp):
    """Megatron-LM's ``logprobs``: each returned token's log-probability given the tokens before it, for
    prompt and generated tokens, with and without the KV cache, sampled or greedy, and for scoring alone
    (0 new tokens), equal to Hugging Face's log_softmax of the same sequence (fp32, relative 1e-5), on
    every rank of the layout."""
    from equivalence import assert_rel_close

    hf_model = BUILDERS[kind](vocab_size=250, layers=2)
    runs = [(NEW_TOKENS, None, True), (NEW_TOKENS, None, False), (4, SamplingParams(temperature=0.7, top_k=5, seed=2),
                                                                   True), (0, None, True)]
    for rank, outs in enumerate(run_distributed(_with_log_probs, tp * pp, hf_model, pp, runs, timeout=120)):
        for (new_tokens, _, _), out in zip(runs, outs, strict=True):
            for tokens, scores in zip(out.tokens, out.log_probs, strict=True):
                assert len(scores) == len(tokens) - 1 and (new_tokens or len(tokens) in map(len, PROMPTS))
                ids = torch.tensor([tokens])
                ref = hf_model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
                assert_rel_close(torch.tensor(scores), ref.detach(), 1e-5,
                                 f"{kind} TP {tp} PP {pp} rank {rank}, {new_tokens} new tokens: log-probs")


def _length_error(prompt_length, new_tokens):
    ps = parallel_state.initialize_model_parallel(1)
    config, vocab, positions = core_config_of(tiny_hf_gpt2())
    model = GPTModel(config, vocab, positions, parallel_state=ps, make_vocab_size_divisible_by=8)
    try:
        generate(model, [[5] * prompt_length], new_tokens, eod_id=None, vocab_size=vocab, parallel_state=ps)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("prompt_length,new_tokens,fix", [
    (40, 0, "shorten the prompt to at most 32 tokens"), (30, 5, "ask for at most 2 tokens"),
    (32, 1, "ask for at most 0 tokens (0 with logprobs scores the prompt)")])
def test_a_request_past_the_position_limit_names_the_fix(prompt_length, new_tokens, fix):
    """A 40-token prompt scored with tokens_to_generate 0 was told to 'ask for fewer tokens'."""
    (error,) = run_distributed(_length_error, 1, prompt_length, new_tokens, timeout=60)
    assert error == (f"longest prompt ({prompt_length} tokens) + tokens_to_generate ({new_tokens}) = "
                     f"{prompt_length + new_tokens} exceeds the model's --max-position-embeddings 32; {fix}"), error
