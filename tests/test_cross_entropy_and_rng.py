"""Vocab-parallel cross entropy against torch, the TP RNG streams, and RNG-exact recompute."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from equivalence import assert_rel_close
from harness import RankError, run_distributed

from megatron_core import parallel_state
from megatron_core.rng_tracker import RNGStatesTracker
from megatron_core.tensor_parallel import checkpoint, vocab_parallel_cross_entropy

SEQ, BATCH, VOCAB = 6, 4, 24


def _data():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=g) * 3
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=g)
    target[0, 1] = target[3, 2] = target[5, 0] = -100
    return logits, target


def _parallel_ce(smoothing):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    logits, target = _data()
    local = logits.chunk(ps.tp_size, dim=-1)[ps.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, ps.tp_group, label_smoothing=smoothing)
    valid = target != -100
    (loss.sum() / valid.sum()).backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(tp, smoothing):
    logits, target = _data()
    ref_logits = logits.clone().requires_grad_()
    flat = dict(input=ref_logits.view(-1, VOCAB), target=target.view(-1), label_smoothing=smoothing)
    ref = F.cross_entropy(reduction="none", **flat).view(SEQ, BATCH)
    F.cross_entropy(reduction="mean", **flat).backward()
    for r, (loss, grad) in enumerate(run_distributed(_parallel_ce, tp, smoothing, timeout=60)):
        assert_rel_close(loss, ref.detach(), what="per-token loss")
        assert (loss[target == -100] == 0).all()
        assert_rel_close(grad, ref_logits.grad.chunk(tp, dim=-1)[r], what="logit grad")


def test_one_rank_loss_is_bitwise_torch_and_gradient_within_two_ulps():
    """One rank skips the collectives: torch's log-softmax, its exp kept for backward."""
    logits, target = _data()
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(ours, target)
    expected = F.cross_entropy(ref.view(-1, VOCAB), target.view(-1), reduction="none").view(SEQ, BATCH)
    assert torch.equal(loss, expected)
    weights = torch.rand(SEQ, BATCH, generator=torch.Generator().manual_seed(3))
    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    assert (ours.grad[target == -100] == 0).all()
    # Both compute softmax x gradient (- gradient at the target) from exps of two implementations:
    # within two ulps of the softmax x gradient term (measured 1.16 eps).
    term = torch.softmax(logits, dim=-1) * weights.unsqueeze(-1)
    assert ((ours.grad - ref.grad).abs() <= 2 * torch.finfo(torch.float32).eps * term).all()


def _large_data(dtype):
    """Logits with one entry per token near 120 (exp overflows fp32 without the max subtraction),
    placed in the vocabulary shard of another TP rank than the target's, in ``dtype``."""
    logits, target = _data()
    g = torch.Generator().manual_seed(12)
    shard = VOCAB // 4  # a different shard at TP 2 and at TP 4
    big = (target.clamp(min=0) + 2 * shard) % VOCAB
    peak = 110 + 20 * torch.rand(SEQ, BATCH, generator=g)
    logits.scatter_(-1, big.unsqueeze(-1), peak.unsqueeze(-1))
    return logits.to(dtype), target


def _parallel_large_ce(dtype):
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    logits, target = _large_data(dtype)
    local = logits.chunk(ps.tp_size, dim=-1)[ps.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, ps.tp_group)
    loss.sum().backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cross_entropy_with_large_logits_is_finite_and_matches_torch(tp, dtype):
    """TP 1 is the one-rank function (no collectives), fp16/bf16 logits and ignored positions included."""
    logits, target = _large_data(dtype)
    valid = target != -100
    assert tp == 1 or (logits.float().argmax(-1)[valid] // (VOCAB // tp) != target[valid] // (VOCAB // tp)).all()
    ref_logits = logits.float().requires_grad_()  # the layer computes in fp32 whatever the input dtype
    ref = F.cross_entropy(ref_logits.view(-1, VOCAB), target.view(-1), reduction="none").view(SEQ, BATCH)
    ref.sum().backward()
    assert ref.isfinite().all() and ref[valid].min() > 50
    for r, (loss, grad) in enumerate(run_distributed(_parallel_large_ce, tp, dtype, timeout=60)):
        assert loss.isfinite().all() and grad.isfinite().all(), "loss overflowed"
        assert_rel_close(loss, ref.detach(), what=f"{dtype} per-token loss")
        assert_rel_close(grad.float(), ref_logits.grad.chunk(tp, dim=-1)[r], what=f"{dtype} logit grad")


def _bad_label():
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    vocab_parallel_cross_entropy(torch.zeros(2, 1, 4), torch.tensor([[1], [9]]), ps.tp_group)


@pytest.mark.parametrize("tp", [1, 2])
def test_label_outside_vocabulary_is_rejected(tp):
    with pytest.raises(RankError, match=rf"label 9 is outside the vocabulary \[0, {4 * tp}\)"):
        run_distributed(_bad_label, tp, timeout=60)


def _dropout_masks():
    ps = parallel_state.initialize_model_parallel(2, 1)  # world 4: tp 2 x dp 2
    ps.manual_seed(42)
    ones = torch.ones(1000)
    replicated = F.dropout(ones, 0.5)
    with ps.rng_tracker.fork():
        split = F.dropout(ones, 0.5)
    return ps.tp_rank, ps.dp_rank, replicated, split


def test_dropout_differs_across_tp_inside_regions_and_matches_outside():
    results = run_distributed(_dropout_masks, 4, timeout=60)
    by = {(tp, dp): (rep, split) for tp, dp, rep, split in results}
    assert torch.equal(by[0, 0][0], by[1, 0][0]), "replicated dropout must match across TP ranks"
    assert not torch.equal(by[0, 0][1], by[1, 0][1]), "dropout in the TP region must differ across TP ranks"
    assert torch.equal(by[0, 0][1], by[0, 1][1]), "same TP rank, same seed: same mask"


def _stage_dropout_masks():
    ps = parallel_state.initialize_model_parallel(2, 2)  # world 4: tp 2 x pp 2
    ps.manual_seed(42)
    ones = torch.ones(1000)
    default = F.dropout(ones, 0.5)
    with ps.rng_tracker.fork():
        tp_region = F.dropout(ones, 0.5)
    return ps.tp_rank, ps.pp_rank, default, tp_region


def _mask_from_seed(seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return F.dropout(torch.ones(1000), 0.5)


def test_pipeline_stages_draw_their_documented_dropout_masks():
    """Megatron-LM's ``_set_random_seed``: the default stream of pipeline stage p is seeded with
    ``seed + 100 p``; the TP-region stream with that plus 2718 + tp_rank
    (``model_parallel_cuda_manual_seed``). Stages must not share masks."""
    by = {(tp, pp): (d, r) for tp, pp, d, r in run_distributed(_stage_dropout_masks, 4, timeout=60)}
    assert not torch.equal(by[0, 0][0], by[0, 1][0]), "pipeline stages drew the same default-stream mask"
    for (tp, pp), (default, tp_region) in by.items():
        assert torch.equal(default, _mask_from_seed(42 + 100 * pp)), f"tp {tp} pp {pp}: default stream seed"
        assert torch.equal(tp_region, _mask_from_seed(42 + 100 * pp + 2718 + tp)), f"tp {tp} pp {pp}: TP-region seed"


def test_tracker_refuses_a_reused_seed_or_name_until_reset():
    """Two streams from one seed would draw the same masks: add() refuses it, and a taken name, until
    reset() (which model_parallel_manual_seed calls, so a run may reseed)."""
    tracker = RNGStatesTracker()
    tracker.add("a", 5)
    with pytest.raises(ValueError, match="seed 5 already used"):
        tracker.add("b", 5)
    with pytest.raises(ValueError, match="RNG stream 'a' already exists"):
        tracker.add("a", 6)
    with pytest.raises(RuntimeError, match="RNG stream 'c' was not added"):
        with tracker.fork("c"):
            pass
    tracker.reset()
    tracker.add("a", 5)


def _block(parallel_state, w1, w2):
    def run(x):
        h = F.dropout(torch.tanh(x @ w1), 0.3)
        with parallel_state.rng_tracker.fork():
            h = F.dropout(h, 0.3)
        return h @ w2
    return run


def _checkpoint_vs_plain():
    ps = parallel_state.initialize_model_parallel(1, 1)
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(8, 16, generator=g), torch.randn(16, 4, generator=g)
    x0 = torch.randn(5, 8, generator=g)
    outs = []
    for use_checkpoint in (False, True):
        ps.manual_seed(123)
        a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        x = x0.clone().requires_grad_()
        fn = _block(ps, a, b)
        y = checkpoint(fn, ps.rng_tracker, x) if use_checkpoint else fn(x)
        y = y + 0.0
        y.pow(2).sum().backward()
        after = F.dropout(torch.ones(64), 0.5)  # the stream must continue as if no recompute happened
        outs.append((y.detach(), x.grad, a.grad, b.grad, after))
    return outs


def test_checkpoint_with_dropout_equals_plain():
    plain, ckpt = run_distributed(_checkpoint_vs_plain, 1, timeout=60)[0]
    for name, p, c in zip(("output", "input grad", "w1 grad", "w2 grad", "next dropout"), plain, ckpt, strict=True):
        assert torch.equal(p, c), name


def test_checkpoint_outputs_that_need_no_gradient_are_left_out_of_backward():
    """A checkpointed function may return, beside its hidden states, a mask and a plain number (Megatron-LM's
    CheckpointFunction takes the same): backward runs through the outputs that need a gradient only, and
    the gradients equal a plain run's."""
    g = torch.Generator().manual_seed(0)
    w0, x0 = torch.randn(8, 4, generator=g), torch.randn(5, 8, generator=g)

    def block(x, weight):
        h = torch.tanh(x @ weight)
        return h, h > 0, 3

    grads = []
    for use_checkpoint in (False, True):
        x, weight = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        h, positive, three = checkpoint(block, None, x, weight) if use_checkpoint else block(x, weight)
        assert three == 3 and not positive.requires_grad
        (h * positive).pow(2).sum().backward()
        grads.append((x.grad, weight.grad))
    for name, plain, ckpt in zip(("input grad", "weight grad"), *grads, strict=True):
        assert torch.equal(plain, ckpt), name


def _parallel_shifted_ce():
    """Rank 0's vocabulary shard 1000 above rank 1's; every target is rank 0's largest logit."""
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    logits = torch.randn(4, 3, 40, generator=torch.Generator().manual_seed(3))
    logits[..., :20] += 1000
    target = logits[..., :20].argmax(-1)
    local = logits.chunk(ps.tp_size, dim=-1)[ps.tp_rank]
    return vocab_parallel_cross_entropy(local, target, ps.tp_group), logits, target


def test_vocab_parallel_loss_keeps_precision_far_from_zero():
    """Losses below 3 at logits near 1000 over TP 2: the loss is log Z - (x_t - M), not
    (M + log Z) - x_t, whose rounding of M + log Z alone is ulp(1000) = 6e-5 absolute."""
    for loss, logits, target in run_distributed(_parallel_shifted_ce, 2, timeout=60):
        ref = F.cross_entropy(logits.double().view(-1, 40), target.view(-1), reduction="none").view(4, 3)
        assert ref.max() < 3  # so ulp(1000) = 6e-5 absolute is over 2e-5 relative
        assert_rel_close(loss, ref.float(), what="TP 2 loss near 1000")


def _smoothed_ce_near_1000():
    ps = parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
    logits, target = _data()
    logits += 1000
    local = logits.chunk(ps.tp_size, dim=-1)[ps.tp_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, ps.tp_group, label_smoothing=0.1)
    loss.sum().backward()
    return loss.detach(), local.grad


@pytest.mark.parametrize("tp", [1, 2])
def test_label_smoothing_keeps_precision_near_1000(tp):
    """The smoothing term mean_v(-log p_v) = log Z - mean_v(x_v - M) sums logits less the global max:
    summing the raw logits (~1000 each) and subtracting lse ~1000 loses ulp(1000) = 6e-5 absolute
    (measured 2.7e-6 to 6.6e-6 relative on these losses; 1.1e-7, one ulp, relative to M). Reference:
    torch in float64 on the same fp32 logits."""
    logits, target = _data()
    ref_logits = (logits + 1000).double().requires_grad_()  # the fp32 logits the ranks see
    ref = F.cross_entropy(ref_logits.view(-1, VOCAB), target.view(-1), reduction="none", label_smoothing=0.1)
    ref.sum().backward()
    for r, (loss, grad) in enumerate(run_distributed(_smoothed_ce_near_1000, tp, timeout=60)):
        assert_rel_close(loss.double(), ref.detach().view(SEQ, BATCH), tol=1e-6, what=f"TP {tp} smoothed loss")
        assert_rel_close(grad.double(), ref_logits.grad.chunk(tp, dim=-1)[r], what=f"TP {tp} smoothed logit grad")
