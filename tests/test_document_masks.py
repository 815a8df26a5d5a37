"""``--reset-position-ids`` and ``--reset-attention-mask``: documents packed into one sample train as if alone.

The convention is Megatron-LM's (``_get_ltor_masks_and_position_ids``, megatron-core 0.16.1): an EOD token
is the last token of its document (its position keeps counting, it attends to its own document); the token
after it opens the next document at position 0 and attends to nothing up to and including the EOD.
The hand-written cases below were also checked once against megatron-core's function itself (the peer
is not a dependency of this project, so it is not imported here).
"""
import contextlib
import functools
import io
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from test_pretrain import TINY, _logged, _train

import pretrain_gpt
from megatron_core import parallel_state
from megatron_core.datasets import (
    GPTDatasetConfig,
    IndexedDatasetBuilder,
    MockGPTDataset,
    build_gpt_datasets,
    document_attention_mask,
    document_position_ids,
)
from megatron_core.models.gpt import GPTModel
from megatron_core.models.presets import gpt2_config, llama_config
from megatron_core.tokenizer import build_tokenizer
from megatron_core.training.arguments import config_from_args, parse_args
from megatron_core.training.arguments.validate import validate_args
from megatron_core.training.data_loading import data_iterators
from megatron_core.training.errors import ConfigError
from megatron_core.training.pretrain import pretrain

E = 9  # the EOD id of the hand-written cases


def _allowed(*blocks):
    """The expected mask from document lengths: causal inside each block, nothing across blocks."""
    s = sum(blocks)
    allowed = torch.zeros(s, s, dtype=torch.bool)
    start = 0
    for n in blocks:
        allowed[start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start += n
    return ~allowed.unsqueeze(0)


@pytest.mark.parametrize("tokens,positions,blocks", [
    ([1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [5]),                          # no EOD: plain causal, 0..s-1
    ([E, 1, 2, 3], [0, 0, 1, 2], [1, 3]),                             # EOD first: a one-token document
    ([1, 2, 3, E], [0, 1, 2, 3], [4]),                                # EOD last: it closes the only document
    ([1, E, E, 2, E, E, E, 3], [0, 1, 0, 0, 1, 0, 0, 0], [2, 1, 2, 1, 1, 1]),  # consecutive EODs
    ([E, E, E], [0, 0, 0], [1, 1, 1]),
], ids=["no-eod", "eod-first", "eod-last", "consecutive-eods", "only-eods"])
def test_positions_and_mask_follow_megatron_convention(tokens, positions, blocks):
    t = torch.tensor(tokens)
    assert document_position_ids(t, E).tolist() == positions
    mask = document_attention_mask(t, E)
    assert mask.dtype == torch.bool and mask.shape == (1, len(tokens), len(tokens))
    assert torch.equal(mask, _allowed(*blocks))


def _mock(**flags):
    config = GPTDatasetConfig(seq_length=32, eod=255, mock=True, mock_vocab_size=256, mock_num_documents=50, **flags)
    return MockGPTDataset(config, num_samples=8)


def test_dataset_samples_carry_them_only_when_asked():
    plain_ds = _mock()
    idx = max(range(len(plain_ds)), key=lambda i: int((plain_ds[i]["tokens"] == 255).sum()))
    plain, both = plain_ds[idx], _mock(reset_position_ids=True, reset_attention_mask=True)[idx]
    assert set(plain) == {"tokens", "labels", "loss_mask", "position_ids"}  # no mask: the causal fast path
    assert torch.equal(plain["position_ids"], torch.arange(32))
    assert (plain["tokens"] == 255).sum() >= 2  # the sample holds document boundaries
    assert torch.equal(both["tokens"], plain["tokens"]) and torch.equal(both["loss_mask"], plain["loss_mask"])
    assert torch.equal(both["position_ids"], document_position_ids(plain["tokens"], 255))
    assert int(both["attention_mask_eod"]) == 255 and "attention_mask" not in both  # the rank builds the mask
    assert not torch.equal(both["position_ids"], plain["position_ids"])
    # What pretrain_gpt.get_batch hands the model: [b, 1, s, s] under the flag; no mask (causal) without it.
    loader = torch.utils.data.DataLoader([plain, plain], batch_size=2)
    assert pretrain_gpt.get_batch(iter(loader), 32, 2)["attention_mask"] is None
    loader = torch.utils.data.DataLoader([both, both], batch_size=2)
    mask = pretrain_gpt.get_batch(iter(loader), 32, 2)["attention_mask"]
    assert mask.shape == (2, 1, 32, 32) and torch.equal(mask[1], document_attention_mask(plain["tokens"], 255))
    assert set(_mock(reset_position_ids=True)[idx]) == set(plain)
    only_mask = _mock(reset_attention_mask=True)[idx]
    assert torch.equal(only_mask["position_ids"], torch.arange(32)) and "attention_mask_eod" in only_mask


def _logits_packed_and_alone(preset, backend):
    """Logits of two packed samples (with the document masks and positions), and of each document alone."""
    ps = parallel_state.initialize_model_parallel(1)
    ps.manual_seed(7)
    common = dict(num_layers=2, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
                  attention_backend=backend)
    config = gpt2_config(**common) if preset == "gpt2" else llama_config(num_query_groups=2, ffn_hidden_size=64,
                                                                        **common)
    model = GPTModel(config, 64, 32, parallel_state=ps, make_vocab_size_divisible_by=64).eval()
    g = torch.Generator().manual_seed(3)
    # Documents end in EOD (63) but the last one of each sample, cut off by the sequence length.
    lengths = [[5, 1, 7, 3, 8], [12, 2, 1, 7, 2]]
    docs = [[torch.cat([torch.randint(0, 63, (n - 1,), generator=g), torch.tensor([63])]) for n in row]
            for row in lengths]
    for row in docs:
        row[-1] = row[-1][:-1] if len(row[-1]) > 1 else row[-1]
    tokens = torch.stack([torch.cat(row) for row in docs])  # [2, 23]
    positions = torch.stack([document_position_ids(t, 63) for t in tokens])
    mask = torch.stack([document_attention_mask(t, 63) for t in tokens])  # [2, 1, s, s]
    with torch.no_grad():
        packed = model(tokens, positions, attention_mask=mask).float()
        alone = [[model(doc.unsqueeze(0)).float()[0] for doc in row] for row in docs]
    return packed, [torch.cat(row) for row in alone]


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["auto", "unfused"])
def test_packed_documents_give_each_documents_own_logits(preset, backend):
    """fp32 logits of every packed token equal those of its document run alone, within 1e-5 of the largest
    logit (measured 1.7e-7: another summation length in the attention's softmax and products moves the last
    bits only). With a causal mask only the error is 0.14 (GPT-2) / 0.32 (Llama); with plain positions 0.67 for
    GPT-2, while Llama's RoPE, relative, needs only the mask (that every pipeline chunk's RoPE gets the reset
    positions is checked by test_every_pipeline_chunk_gets_the_positions_and_mask)."""
    packed, alone = run_distributed(_logits_packed_and_alone, 1, preset, backend, timeout=120)[0]
    for b in range(packed.shape[0]):
        scale = alone[b].abs().max()
        assert (packed[b] - alone[b]).abs().max() <= 1e-5 * scale, (b, (packed[b] - alone[b]).abs().max())


SHORT = TINY + ["--train-iters", "10", "--eval-interval", "10"]
DOCS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
ROPE = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--disable-bias-linear", "--untie-embeddings-and-output-weights"]
# Two virtual stages per pipeline rank: chunk 0 of rank 1 and chunk 1 of rank 0 are middle chunks, which
# read the samples only for the positions and mask (RoPE takes the positions in every chunk).
LAYOUT = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
          "--num-layers-per-virtual-pipeline-stage", "1"]
RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]


RUNS = {"gpt2": DOCS, "rope": DOCS + ROPE}  # both flags, with learned positions and with RoPE


@pytest.fixture(scope="module")
def serial_runs():
    """One-process losses of each of ``RUNS`` (all with --eod-mask-loss)."""
    return {name: _logged(run_distributed(_train, 1, SHORT + flags, timeout=180)) for name, flags in RUNS.items()}


@pytest.mark.parametrize("name,extra", [("gpt2", []), ("rope", RECOMPUTE)], ids=["gpt2", "rope-recompute"])
def test_tp2_sp_pp2_vpp2_reproduce_serial_losses(serial_runs, name, extra):
    """TP2 + SP x PP2 x VPP2 (and with full recompute) train like one process: every loss within 1e-5
    relative (the TP and PP reductions sum in another order)."""
    result = _logged(run_distributed(_train, 4, SHORT + RUNS[name] + LAYOUT + extra, timeout=300))
    want = serial_runs[name]
    assert len(result.losses) == len(want.losses) == 10
    for i, (got, ref) in enumerate(zip(result.losses, want.losses, strict=True), start=1):
        assert abs(got - ref) <= 1e-5 * abs(ref), f"iteration {i}: {got} vs serial {ref}"
    assert result.val_losses[10] == pytest.approx(want.val_losses[10], rel=1e-5)


def _chunk_inputs(argv):
    """Train with ``argv``; the position ids and masks each model chunk of this rank was given, in order."""
    config = config_from_args(validate_args(parse_args(argv), dist.get_world_size()))
    seen: dict[int, list] = {}

    def step(data_iterator, model):
        batch = pretrain_gpt.get_batch(data_iterator, config.data.seq_length, config.training.micro_batch_size)
        seen.setdefault(id(model), []).append((batch["position_ids"], batch["attention_mask"]))
        output = model(batch["tokens"], batch["position_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"])
        return output, functools.partial(pretrain_gpt.loss_func, batch["loss_mask"])

    pretrain(config, pretrain_gpt.model_provider, step)
    return list(seen.values())


def test_every_pipeline_chunk_gets_the_positions_and_mask():
    """Under PP2 x VPP2 the middle chunks (which read no tokens) get the same reset positions and document
    mask as the first chunk, micro batch by micro batch. RoPE with the positions alone changes the tiny
    model's losses by less than 1e-6, below what a loss comparison resolves, so the inputs are compared."""
    argv = SHORT + DOCS + ROPE + LAYOUT + ["--train-iters", "2", "--eval-iters", "1"]
    ranks = run_distributed(_chunk_inputs, 4, argv, timeout=300)
    chunks = [calls for rank in ranks for calls in rank]
    assert len(chunks) == 8  # 4 ranks x 2 virtual stages, every one fed
    first = chunks[0]
    assert any(not torch.equal(p, torch.arange(32).expand_as(p)) for p, _ in first)  # positions do reset
    for calls in chunks[1:]:
        assert len(calls) == len(first)
        for (pos, mask), (want_pos, want_mask) in zip(calls, first, strict=True):
            assert torch.equal(pos, want_pos) and mask is not None and torch.equal(mask, want_mask)


def test_without_the_flags_the_middle_chunks_get_plain_positions_and_no_mask():
    """Without the flags only the first and last chunks read data; the middle ones get positions 0..s-1
    (for RoPE) and no mask, i.e. causal attention, as every chunk's samples carry none."""
    ranks = run_distributed(_chunk_inputs, 4, SHORT + ROPE + LAYOUT + ["--train-iters", "2", "--eval-iters", "1"],
                            timeout=300)
    calls = [call for rank in ranks for chunk in rank for call in chunk]
    assert any(pos is not None for pos, _ in calls)  # the middle chunks' own positions
    for pos, mask in calls:
        assert mask is None and (pos is None or torch.equal(pos, torch.arange(32).expand_as(pos)))


def test_each_flag_changes_the_losses(serial_runs):
    """Positions alone and the mask alone each train differently from both and from neither, so the
    layout test above compares runs in which both are in effect."""
    runs = {"both": serial_runs["gpt2"].losses}
    for name, flags in (("positions", DOCS[0::2]), ("mask", DOCS[1:]), ("neither", DOCS[2:])):
        runs[name] = _logged(run_distributed(_train, 1, SHORT + flags, timeout=180)).losses
    names = list(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert runs[a][0] != runs[b][0], (a, b, runs[a][0])  # the first forward already differs


def test_flags_reach_the_dataset_config_and_contradictions_are_refused():
    args = validate_args(parse_args(SHORT + DOCS), world_size=1)
    data = config_from_args(args).data
    assert data.reset_position_ids and data.reset_attention_mask and data.every_chunk_reads_data
    plain = config_from_args(validate_args(parse_args(SHORT), world_size=1)).data
    assert not plain.every_chunk_reads_data
    for alone in (DOCS[0::2], DOCS[1:]):  # either flag alone: the middle chunks need its positions or mask
        assert config_from_args(validate_args(parse_args(SHORT + alone), world_size=1)).data.every_chunk_reads_data
    with pytest.raises(ConfigError, match="--reset-attention-mask builds .* drop --no-create-attention-mask"):
        validate_args(parse_args(SHORT + ["--reset-attention-mask", "--no-create-attention-mask-in-dataloader"]), 1)


def _cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = pretrain_gpt.cli(argv)
    return code, err.getvalue()


def test_data_without_eod_is_refused_and_with_eod_resets(tmp_path):
    """Real data: a SentencePiece tokenizer and tools/preprocess_data.py. Without --append-eod the documents
    carry no EOD, so the flags would silently train across documents: one line naming --append-eod (before,
    training ran with positions 0..s-1 and a causal mask). With it, the samples' positions do reset."""
    from megatron_core.datasets import preprocess_data
    from megatron_core.tokenizer.train_tokenizer import train_sentencepiece

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"def function_{i}(x):\n    return x * {i} + {i * i}" for i in range(300)))
    model = train_sentencepiece([str(text)], str(tmp_path / "tok"), 320)
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"x = {i} + {i}"}) + "\n" for i in range(200)))
    argv = SHORT[:SHORT.index("--mock-data")] + SHORT[SHORT.index("--vocab-size") + 2:] + DOCS + [
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model, "--train-iters", "1"]
    for append, prefix in ((False, "plain"), (True, "eod")):
        assert preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / prefix),
                                     "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
                                    + (["--append-eod"] if append else [])) == 0
    code, err = run_distributed(_cli, 1, argv + ["--data-path", str(tmp_path / "plain_text_document")], timeout=120)[0]
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "none of the first 16 documents of the train split" in err and "--append-eod" in err, err
    eod = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model).eod
    for alone in ({"reset_position_ids": True}, {"reset_attention_mask": True}):  # either flag alone is checked
        config = GPTDatasetConfig(seq_length=32, eod=eod, seed=1, data_path=[str(tmp_path / "plain_text_document")],
                                  split="100,0,0", **alone)
        with pytest.raises(ValueError, match="none of the first 16 documents .* --append-eod"):
            build_gpt_datasets(config, [4, 0, 0])
    config = GPTDatasetConfig(seq_length=32, eod=eod, seed=1, data_path=[str(tmp_path / "eod_text_document")],
                              split="100,0,0", reset_position_ids=True, reset_attention_mask=True)
    train, _, _ = build_gpt_datasets(config, [4, 0, 0])
    assert any(not torch.equal(train[i]["position_ids"], torch.arange(32)) for i in range(4))


def test_an_empty_document_is_not_probed_for_eod(tmp_path):
    """The EOD check reads the last token of each probed document; an empty one has none and is skipped
    (before the skip it was an IndexError from the indexed dataset, a traceback instead of training)."""
    prefix = str(tmp_path / "docs")
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        for tokens in ([], [1, 2, E], [3, 4, 5, E], [6, E]):
            builder.add_document(tokens, [len(tokens)])
        builder.finalize(prefix + ".idx")
    config = GPTDatasetConfig(seq_length=4, eod=E, seed=1, data_path=[prefix], split="100,0,0",
                              reset_position_ids=True, reset_attention_mask=True)
    train, _, _ = build_gpt_datasets(config, [2, 0, 0])
    sample = train[0]
    assert torch.equal(sample["position_ids"], document_position_ids(sample["tokens"], E))


def _iterators_per_chunk():
    """Which of this rank's two virtual stages (PP 2 x VPP 2) get a data iterator, without and with
    ``every_chunk``, and with no dataset (ranks that read none)."""
    ps = parallel_state.initialize_model_parallel(1, 2, 2)
    samples = [{"tokens": torch.arange(4)} for _ in range(4)]
    return [[it is not None for it in data_iterators(dataset, 0, 1, ps, 0, 2, every_chunk)]
            for dataset, every_chunk in ((samples, False), (samples, True), (None, True))]


def test_only_the_first_and_last_chunks_read_data_unless_every_chunk():
    """Rank 0 holds the first chunk and a middle one (virtual stage 1), rank 1 a middle one and the last."""
    assert run_distributed(_iterators_per_chunk, 2, timeout=120) == [
        [[True, False], [True, True], [False, False]],
        [[False, True], [True, True], [False, False]]]
