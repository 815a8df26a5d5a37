"""The autotuner's memory model against the framework: parameter lists of built GPT chunks and model-state
bytes measured by ``memory_footprint`` after a real training step (exact: the model reproduces the
buffer padding). Activation bytes: tests/test_autotune_activations.py."""
import dataclasses
import functools

import pytest
import torch
from ddp_common import build, train_step
from harness import run_distributed

from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.autotune.memory import model_state_bytes, zero3_gather_window_bytes
from megatron_core.autotune.params import layer_params, rank_chunks
from megatron_core.models.gpt import build_gpt_model_chunks
from megatron_core.models.presets import llama_config
from megatron_core.optimizer import MemoryFootprint, memory_footprint
from megatron_core.transformer.config import TransformerConfig

VOCAB, SEQ = 61, 16  # odd vocabulary: padded to 64 (TP 1) or 128 (TP 2) with divisible-by 32 / 64


def _config(llama: bool, tied: bool = True, **kw) -> TransformerConfig:
    common = dict(num_layers=4, hidden_size=24, num_attention_heads=4, hidden_dropout=0.0,
                  attention_dropout=0.0, share_embeddings_and_output_weights=tied, **kw)
    if llama:
        return llama_config(num_query_groups=2, ffn_hidden_size=40, **common)
    return TransformerConfig(**common)


def _spec(config: TransformerConfig, divisible: int = 32) -> ModelSpec:
    return ModelSpec(config, VOCAB, SEQ, SEQ, global_batch_size=8, make_vocab_size_divisible_by=divisible)


@dataclasses.dataclass
class _GPT:
    """The spec object ddp_common drives, for the real GPT model."""

    config: TransformerConfig
    divisible: int = 32
    seq_length: int = SEQ

    def build_chunks(self, ps):
        return build_gpt_model_chunks(self.config, VOCAB, SEQ, ps, make_vocab_size_divisible_by=self.divisible)

    def microbatches(self, step, count, micro_batch_size):
        g = torch.Generator().manual_seed(step)
        return [{"tokens": torch.randint(0, VOCAB, (micro_batch_size, SEQ), generator=g),
                 "labels": torch.randint(0, VOCAB, (micro_batch_size, SEQ), generator=g)} for _ in range(count)]

    @staticmethod
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        loss = functools.partial(lambda out: (out.mean(), {"lm loss": out.mean().detach()}))
        return model(batch["tokens"], labels=batch["labels"]), loss


# (name, tp, pp, vpp, zero, llama, tied, divisible, bucket) on 4 ranks: DP = 4 / (TP x PP).
GRID = [("dp4-z0", 1, 1, None, 0, False, True, 32, None), ("dp4-z1", 1, 1, None, 1, False, True, 32, None),
        ("dp4-z2-buckets", 1, 1, None, 2, False, True, 32, 1000),
        ("tp2-dp2-z1-llama", 2, 1, None, 1, True, False, 64, None),
        ("pp2-dp2-z2-tied", 1, 2, None, 2, False, True, 32, None), ("pp2-v2-dp2-z1", 1, 2, 2, 1, False, True, 32, 700),
        ("tp2-pp2-z0-llama", 2, 2, None, 0, True, True, 64, None), ("tp4-z2", 4, 1, None, 2, False, False, 8, None),
        ("dp4-z3-buckets", 1, 1, None, 3, False, True, 32, 1000)]


def _step_grad_copies(optimizer, wrapped) -> list[int]:
    """Bytes of the main parameters' gradients that are not views of a DDP gradient buffer (the full
    one or ZeRO-2's reduced shard), measured inside each step (a pre-hook on the torch optimizer's
    step: after the copies, before they drop)."""
    buffers = {t.untyped_storage().data_ptr() for w in wrapped for b in w.buffers_by_dtype
               for t in (b.grad_data, b.grad_shard) if t is not None}
    seen: list[int] = []

    def hook(*_):
        storages = {m.grad.untyped_storage().data_ptr(): m.grad.untyped_storage().nbytes()
                    for m, _ in optimizer.pairs if m.grad is not None}
        seen.append(sum(n for ptr, n in storages.items() if ptr not in buffers))

    optimizer.torch_optimizer.register_step_pre_hook(hook)
    return seen


def _record_grads(into: list, wrapped, optimizer, *_) -> None:
    into.append(memory_footprint(wrapped, optimizer).grads)


def _recording_before(launch, record):
    def launch_after_recording(*args, **kwargs):
        record()
        return launch(*args, **kwargs)
    return launch_after_recording


def _watch_grads_in_backward(wrapped, optimizer) -> list[int]:
    """Gradient bytes measured after every DDP gradient hook (a hook registered after the wrapper's
    runs after it) and just before every bucket's collective is launched (the bucket is full then,
    and under ZeRO-2/3 not yet freed): the states between which gradient memory only shrinks."""
    seen: list[int] = []
    record = functools.partial(_record_grads, seen, wrapped, optimizer)
    for w in wrapped:
        for buffer in w.buffers_by_dtype:
            buffer._launch = _recording_before(buffer._launch, record)
        for p in w.module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(record)
    return seen


def _measure(grid, dtype, grad_reduce_in_fp32):
    out = {}
    for name, tp, pp, vpp, zero, llama, tied, divisible, bucket in grid:
        gpt = _GPT(_config(llama, tied, params_dtype=dtype), divisible)
        ps, chunks, wrapped, optimizer = build({"tp": tp, "pp": pp, "vpp": vpp}, gpt,
                                               {"zero_stage": zero, "bucket_size": bucket,
                                                "grad_reduce_in_fp32": grad_reduce_in_fp32}, {}, dtype)
        names = [[(n, p.numel(), getattr(p, "shared_embedding", False)) for n, p in c.named_parameters()]
                 for c in chunks]
        copies = _step_grad_copies(optimizer, wrapped)
        # the most gradient bytes held during backward (after each gradient hook) or at its end
        in_backward = _watch_grads_in_backward(wrapped, optimizer)
        record = functools.partial(_record_grads, in_backward, wrapped, optimizer)
        train_step(ps, gpt, wrapped, optimizer, 0, 2, before_step=record)
        measured = dataclasses.asdict(memory_footprint(wrapped, optimizer))
        extra = {"step_grad_copies": copies[-1], "grads_in_backward": max(in_backward)}
        if zero == 3:  # after the step ZeRO-3 follows the paper's accounting, not this test's (docstring)
            measured = {}
        out[name] = (ps.pp_rank, ps.dp_rank, {**measured, **extra}, names)
        ps.destroy()
    return out


@pytest.mark.parametrize("dtype, grad_reduce_in_fp32", [(torch.float32, False), (torch.bfloat16, True),
                                                        (torch.bfloat16, False)],
                         ids=["fp32", "bf16", "bf16-grads-reduced-in-bf16"])
def test_model_states_equal_framework_accounting(dtype, grad_reduce_in_fp32):
    """After the step (stages 0-2), the gradients held at the end of backward (every stage: ZeRO-2 and
    -3 keep the full buffer beside the shard until the step) and the fp32 gradient copies inside the
    step (16-bit gradients only)."""
    grid = GRID if dtype == torch.float32 else GRID[:4]
    results = run_distributed(_measure, 4, grid, dtype, grad_reduce_in_fp32, timeout=240)
    grad_bytes = 4 if dtype == torch.float32 or grad_reduce_in_fp32 else dtype.itemsize
    extra_keys = ("step_grad_copies", "grads_in_backward")
    for name, tp, pp, vpp, zero, llama, tied, divisible, bucket in grid:
        spec = dataclasses.replace(_spec(_config(llama, tied), divisible), bytes_per_param=dtype.itemsize,
                                   grad_bytes=grad_bytes)
        layout = Layout(tp=tp, pp=pp, dp=4 // (tp * pp), vpp=vpp, zero_stage=zero, micro_batch_size=2)
        for rank, by_name in enumerate(results):
            pp_rank, dp_rank, measured, names = by_name[name]
            predicted = [[(p.name, p.numel, p.shared_embedding) for p in c] for c in rank_chunks(spec, layout, pp_rank)]
            assert predicted == names, f"{name} rank {rank}: parameter lists differ"
            predicted_states = model_state_bytes(spec, layout, pp_rank, dp_rank, bucket_size=bucket)
            states = dataclasses.asdict(predicted_states)
            for key, value in measured.items():
                assert states[key] == value, f"{name} rank {rank} {key}: predicted {states[key]}, measured {value}"
            if zero < 3:
                footprint = MemoryFootprint(**{k: v for k, v in measured.items() if k not in extra_keys})
                assert predicted_states.total == footprint.total, f"{name} rank {rank}: total"
    assert grad_bytes == 4 or any(r[name][2]["step_grad_copies"] > 0 for r in results for name in (g[0] for g in grid))


# ---- ZeRO-2/3 free each bucket's full gradient during backward ----------------------------------
PARTITIONED = [(zero, overlap) for zero in (2, 3) for overlap in (False, True)]
PARTITIONED_BUCKET = 1000


def _grads_during_backward(cases):
    out = {}
    gpt = _GPT(_config(False))
    for zero, overlap in cases:
        ps, _, wrapped, optimizer = build({}, gpt, {"zero_stage": zero, "bucket_size": PARTITIONED_BUCKET,
                                                    "overlap_grad_reduce": overlap}, {})
        seen = _watch_grads_in_backward(wrapped, optimizer)
        for step in range(2):  # the second step starts from the first one's freed buckets
            train_step(ps, gpt, wrapped, optimizer, step, 3)
        (buffer,) = wrapped[0].buffers_by_dtype
        out[(zero, overlap)] = (ps.dp_rank, max(seen), 4 * buffer.numel, len(buffer.buckets))
        ps.destroy()
    return out


def test_zero2_and_zero3_hold_the_shard_and_the_buckets_in_use_not_the_full_gradients():
    """DP 4, 3 microbatches, buckets of 1000 elements: the most gradient bytes held at any point of
    backward (measured after each gradient hook and before each bucket's reduce-scatter) equal the
    autotuner's ``grads_in_backward`` (the shard plus one bucket, two with ``overlap_grad_reduce``)
    and stay below the full gradient buffer that ZeRO-2/3 used to keep through backward."""
    results = run_distributed(_grads_during_backward, 4, PARTITIONED, timeout=180)
    spec = _spec(_config(False))
    for zero, overlap in PARTITIONED:
        layout = Layout(dp=4, zero_stage=zero, micro_batch_size=2)
        for rank, by_case in enumerate(results):
            dp_rank, peak, full, buckets = by_case[(zero, overlap)]
            predicted = model_state_bytes(spec, layout, 0, dp_rank, bucket_size=PARTITIONED_BUCKET,
                                          overlap_grad_reduce=overlap)
            what = f"ZeRO-{zero} overlap={overlap} rank {rank}"
            assert buckets >= 4, f"{what}: the test needs several buckets"
            assert peak == predicted.grads_in_backward, \
                f"{what}: {peak} gradient bytes during backward, predicted {predicted.grads_in_backward}"
            assert peak < full / 2, f"{what}: {peak} gradient bytes during backward, full buffer {full}"


# ---- ZeRO-3: the gathered parameters' window during forward and backward ------------------------------
def _zero3_gathered_peak(tp, layer_elements, tied):
    """The most bytes of gathered bucket storage at any moment of two steps of 2 microbatches, read from the
    buckets' storages right after every all-gather is launched (the only moments that storage grows)."""
    gpt = _GPT(_config(False, tied))
    ps, _, wrapped, optimizer = build({"tp": tp}, gpt, {"zero_stage": 3, "bucket_size": layer_elements,
                                                "stage3_prefetch_bucket_size": layer_elements}, {})
    buckets = [k for w in wrapped for b in w.buffers_by_dtype for k in b.buckets]
    seen = []
    for w in wrapped:
        for buffer in w.buffers_by_dtype:
            def launch(bucket, launch=buffer.launch_param_gather):
                launch(bucket)
                seen.append(sum(k.param_data.untyped_storage().nbytes() for k in buckets))
            buffer.launch_param_gather = launch
    for step in range(2):
        train_step(ps, gpt, wrapped, optimizer, step, 2)
    sizes = [k.end - k.start for k in buckets]
    ps.destroy()
    return max(seen), sizes


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("tp", [1, 2])
def test_zero3_gather_window_matches_the_gathered_buckets_at_their_peak(tp, tied):
    """ZeRO-3 at DP 2, one bucket per layer and one layer prefetched (the granularity the autotuner assumes):
    the most gathered parameter bytes of a forward/backward, read from the buckets' storage, against
    ``zero3_gather_window_bytes``: two layers plus the output layer's weight. Tied, it is the word embedding,
    which the output layer gathers at the start of backward and which stays gathered to its end; untied, it
    shares the last layer's bucket. The small parameters in those buckets (position embeddings, final norm)
    are left out of the prediction: the peak may exceed it by their bytes and no more (TP 1 tied: 65664 B
    measured, 63936 B predicted; without the output weight, the formula before, 57792 B, 12% short; untied it
    was 57792 B against 63936 B measured)."""
    spec = _spec(_config(False, tied))
    layer_elements = sum(p.numel for p in layer_params(spec, tp, 0))
    layout = Layout(tp=tp, dp=2, zero_stage=3, micro_batch_size=2)
    predicted = zero3_gather_window_bytes(spec, layout, pp_rank=0)  # as rank_memory calls it: the rank measured
    assert zero3_gather_window_bytes(spec, layout) == predicted, "pp_rank None is the last stage, here the only one"
    h = spec.config.hidden_size
    beside_the_embedding = (SEQ * h + 2 * h) * 4  # fp32 position embeddings [s, h] and final norm's weight, bias
    for peak, sizes in run_distributed(_zero3_gathered_peak, 2 * tp, tp, layer_elements, tied, timeout=120):
        assert sizes.count(layer_elements) >= 3, f"the test needs one bucket per layer, got {sizes}"
        assert predicted <= peak <= predicted + beside_the_embedding, \
            f"TP {tp}: {peak} B gathered at the peak, predicted {predicted} B"


# ---- SGD: a momentum buffer per parameter, none without momentum ----------------------------------------
SGD_CASES = [(zero, momentum) for zero in (0, 1) for momentum in (0.0, 0.9)]


def _sgd_states(cases):
    out = {}
    gpt = _GPT(_config(False))
    for zero, momentum in cases:
        ps, _, wrapped, optimizer = build({}, gpt, {"zero_stage": zero}, {"optimizer": "sgd", "sgd_momentum": momentum})
        train_step(ps, gpt, wrapped, optimizer, 0, 1)
        out[(zero, momentum)] = (ps.dp_rank, memory_footprint(wrapped, optimizer).optimizer_state)
        ps.destroy()
    return out


def test_sgd_state_is_the_momentum_buffer_or_nothing():
    """torch's SGD keeps a momentum buffer (4 bytes per element of the fp32 main parameters it steps) and
    none at momentum 0: the autotuner's ``optimizer_state`` for --optimizer sgd, measured after a step."""
    results = run_distributed(_sgd_states, 2, SGD_CASES, timeout=120)
    spec = _spec(_config(False))
    for zero, momentum in SGD_CASES:
        layout = Layout(dp=2, zero_stage=zero, micro_batch_size=2)
        for dp_rank, measured in (r[(zero, momentum)] for r in results):
            predicted = model_state_bytes(spec, layout, 0, dp_rank, optimizer="sgd", sgd_momentum=momentum)
            assert predicted.optimizer_state == measured, f"ZeRO-{zero} momentum {momentum} DP rank {dp_rank}"
            assert (measured == 0) == (momentum == 0), f"ZeRO-{zero} momentum {momentum}: {measured} bytes"
