"""Where ``--reset-attention-mask``'s [b, 1, s, s] mask is made and how long its forms live.

The data loader carries no mask: ``pretrain_gpt.get_batch`` builds it on the training rank from the
micro batch's tokens and the EOD id its samples name (it was built per sample in the loader's workers,
s * s bytes each through shared memory). Under SDPA the layers of one model chunk share one additive
form of it (``SharedAdditiveMask``) instead of converting it, and keeping the copy, one per layer.
"""
import functools
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import run_distributed

import pretrain_gpt
from megatron_core import parallel_state
from megatron_core.datasets import GPTDatasetConfig, IndexedDatasetBuilder, build_gpt_datasets, document_attention_mask
from megatron_core.models.gpt import GPTModel
from megatron_core.models.presets import llama_config

E = 9  # the EOD id
S = 8  # sequence length of the dataset cases


def _reference_mask(tokens):
    """[1, s, s] bool from the definition (Megatron-LM's ``_get_ltor_masks_and_position_ids``): query i
    may attend key j when j <= i and no EOD lies in [j, i)."""
    t = tokens.tolist()
    s = len(t)
    mask = torch.ones(s, s, dtype=torch.bool)
    for i in range(s):
        for j in range(i + 1):
            mask[i, j] = E in t[j:i]
    return mask.unsqueeze(0)


def _reference_positions(tokens):
    positions, p = [], 0
    for token in tokens.tolist():
        positions.append(p)
        p = 0 if token == E else p + 1
    return torch.tensor(positions)


def _dataset(tmp_path, **flags):
    """Every sample of a real indexed dataset (seed 1) whose documents give: samples crossing document
    boundaries, a sample with no EOD (a 20-token document), one whose last input token is an EOD, an
    EOD right after a sample's first token, and consecutive EODs."""
    prefix = str(tmp_path / "docs")
    docs = [[1, 2, E], [3, 4, 5, 6, 7, 8, 1, E], list(range(1, 9)) * 2 + [1, 2, 3, E], [E], [4, 5, E],
            [6, 7, 8, 1, 2, 3, E], [2, E], [3, 4, 5, 6, 7, 8, 1, 2, 3, 4, E], [5, E], [6, 7, E]]
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        for tokens in docs:
            builder.add_document(tokens, [len(tokens)])
        builder.finalize(prefix + ".idx")
    config = GPTDatasetConfig(seq_length=S, eod=E, seed=1, data_path=[prefix], split="100,0,0", **flags)
    return build_gpt_datasets(config, [None, 0, 0])[0]  # type: ignore[list-item]


@pytest.mark.parametrize("eod_mask_loss", [False, True], ids=["loss-all", "eod-mask-loss"])
def test_rank_built_mask_and_positions_equal_the_definition(tmp_path, eod_mask_loss):
    """Every micro batch through a real DataLoader worker: the mask get_batch builds, the position ids and
    the loss mask equal the definition byte for byte, sample by sample, for all the cases _dataset names."""
    train = _dataset(tmp_path, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=eod_mask_loss)
    loader = torch.utils.data.DataLoader(train, batch_size=2, num_workers=1, drop_last=True)
    seen = {"no-eod": 0, "eod-last": 0, "crossing": 0}
    iterator = iter(loader)
    for _ in range(len(train) // 2):
        batch = pretrain_gpt.get_batch(iterator, S, 2)
        assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape == (2, 1, S, S)
        for b, tokens in enumerate(batch["tokens"]):
            assert torch.equal(batch["attention_mask"][b], _reference_mask(tokens)), tokens
            assert torch.equal(batch["position_ids"][b], _reference_positions(tokens)), tokens
            want_loss = (tokens != E).float() if eod_mask_loss else torch.ones(S)
            assert torch.equal(batch["loss_mask"][b], want_loss)
            eods = (tokens == E).nonzero().flatten().tolist()
            seen["no-eod"] += not eods
            seen["eod-last"] += S - 1 in eods
            seen["crossing"] += any(e < S - 1 for e in eods)
    assert all(seen.values()), seen


def test_the_loader_carries_no_mask(tmp_path):
    """A collated batch holds tokens, labels, loss mask, position ids and the [b] EOD ids: 28 bytes per token
    and 8 per sample, where the mask added s * s bytes per sample (16 MiB at s = 4096; this test failed
    before, the batch holding an 'attention_mask'). Without the flag the batch is as it always was."""
    batch = next(iter(torch.utils.data.DataLoader(_dataset(tmp_path, reset_attention_mask=True), batch_size=2,
                                                  num_workers=1)))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask_eod"}
    assert batch["attention_mask_eod"].tolist() == [E, E]
    assert sum(t.numel() * t.element_size() for t in batch.values()) == 2 * (28 * S + 8)
    plain = _dataset(tmp_path)[0]
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}


def _model(backend, recompute=None):
    ps = parallel_state.ParallelState(1, 1)  # one per model: a test builds several
    ps.manual_seed(5)
    extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2) \
        if recompute == "full" else dict(recompute_granularity=recompute) if recompute else {}
    config = llama_config(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=64, hidden_dropout=0.0, attention_dropout=0.0,
                          attention_backend=backend, **extra)
    return GPTModel(config, 64, 24, parallel_state=ps, make_vocab_size_divisible_by=64)


def _tokens():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 63, (2, 24), generator=g)
    tokens[0, [4, 5, 13]] = 63
    tokens[1, 20] = 63
    return tokens


def _as_before(sdpa, q, k, v, attn_mask=None, **kw):
    """SDPA given a bool mask (True = may attend), as each layer gave it before SharedAdditiveMask."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask == 0
    return sdpa(q, k, v, attn_mask=attn_mask, **kw)


def _mask(tokens):
    return torch.stack([document_attention_mask(t, 63) for t in tokens])  # as the dataset built it


def _run(recompute, bool_sdpa):
    """A 3-layer SDPA model's training forward and backward over a document mask: the number of distinct
    [b, 1, s, s] storages saved for backward, whether all were freed after it, the logits and the gradients.
    ``bool_sdpa``: SDPA gets the bool mask, as before SharedAdditiveMask (each layer converting its own)."""
    model = _model("flash", recompute)
    tokens = _tokens()
    mask = _mask(tokens)
    masks: dict[int, weakref.ref] = {}

    def pack(t):
        if t.shape == (2, 1, 24, 24):
            masks[t.untyped_storage().data_ptr()] = weakref.ref(t)
        return t
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = functools.partial(_as_before, sdpa) if bool_sdpa else sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(tokens, attention_mask=mask)
        logits.float().square().mean().backward()
    finally:
        F.scaled_dot_product_attention = sdpa
    grads = [logits.detach().clone()] + [p.grad.clone() for p in model.parameters()]
    del logits, mask
    return len(masks), all(ref() is None for ref in masks.values()), grads


def _runs():
    return {recompute: (_run(recompute, False), _run(recompute, True)) for recompute in (None, "selective", "full")}


def test_sdpa_layers_share_one_additive_mask():
    """3 SDPA layers keep one [b, 1, s, s] mask storage for backward, not 3 (failed before: 3 bool-to-additive
    copies), and it is gone after backward; logits and gradients equal to the bit those of SDPA given the bool mask per
    layer, as before, also under selective and full recompute (whose checkpoints keep the bool mask)."""
    out = run_distributed(_runs, 1, timeout=180)[0]
    for recompute, ((count, freed, grads), (count_before, _, grads_before)) in out.items():
        assert freed, recompute
        assert count == 1, (recompute, count)
        if recompute is None:
            assert count_before == 3
        for got, want in zip(grads, grads_before, strict=True):
            assert torch.equal(got, want), recompute


def _logits(bool_sdpa):
    model = _model("flash").eval()
    tokens = _tokens()
    sdpa = F.scaled_dot_product_attention
    if bool_sdpa:
        F.scaled_dot_product_attention = functools.partial(_as_before, sdpa)
    try:
        with torch.no_grad():
            return model(tokens, attention_mask=_mask(tokens))
    finally:
        F.scaled_dot_product_attention = sdpa


def test_sdpa_logits_are_those_of_the_bool_mask():
    """Inference logits with the shared additive mask equal to the bit those of SDPA given the bool mask."""
    shared, before = run_distributed(lambda: (_logits(False), _logits(True)), 1, timeout=120)[0]
    assert torch.equal(shared, before)
