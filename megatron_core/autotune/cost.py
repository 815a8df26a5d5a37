"""Step-time model from costs measured once on this machine.

- Compute: forward + backward seconds of one transformer layer, measured for each micro batch size
  and TP shard (a TP shard of a layer computes like a layer with heads/TP and ffn/TP, so it is built
  and timed at TP 1), with and without selective recompute; full recompute adds one more forward.
  The output layer and loss are timed the same way (logits [s*b, V/TP] and their cross entropy).
- Communication: ``alpha + bytes / beta`` per collective (all-reduce, all-gather, reduce-scatter,
  send/recv), fitted from two sizes on groups of 2..N forked gloo ranks.
- Step: ``(M + (pp - 1) / v) x`` the slowest rank's microbatch time (1F1B / interleaved bubble,
  Narayanan et al. 2021) + TP collectives per layer (2 forward, 2 backward of ``sbh`` bytes) + pipeline
  sends (of the residual stream: fp32 with ``--fp32-residual-connection``) + the DP gradient reduction
  and ZeRO parameter all-gathers (not overlapped: the default flags; ZeRO-2/3 reduce-scatter the
  gradients of every microbatch, as DeepSpeed does, ZeRO-1 once per step; ZeRO-1/2 all-gather the
  parameters once after the step, ZeRO-3 twice per microbatch, forward and backward; all-gather and
  reduce-scatter are priced by the rank's shard, as timed) + the optimizer step (Adam seconds per
  element x the elements the rank updates: its shard under ZeRO).
- On the CPU, ranks share the cores: compute is slowed by ``ranks / cores`` when that exceeds 1 (the cores
  this process may use: its affinity mask, as under ``taskset`` or a Slurm cpuset).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_core import device as device_mod
from megatron_core.autotune.activations import stream_bytes
from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.autotune.memory import model_state_bytes
from megatron_core.collectives import all_gather_flat, reduce_scatter_flat
from megatron_core.fusions.fused_softmax import causal_mask
from megatron_core.fusions.onednn_linear import linear
from megatron_core.transformer.config import TransformerConfig

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "send_recv")


def _time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best of ``repeats`` wall-clock seconds after one warm-up (device work included)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        device_mod.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _collective(name: str, x: torch.Tensor, full: torch.Tensor, rank: int) -> None:
    if name == "all_reduce":
        dist.all_reduce(x)
    elif name == "all_gather":
        all_gather_flat(full, x, None)
    elif name == "reduce_scatter":
        reduce_scatter_flat(x, full, None)
    elif rank == 0:
        dist.send(x, 1)
    elif rank == 1:
        dist.recv(x, 0)


def _collective_worker(rank: int, world: int, store: str, sizes: list[int], queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    out = {}
    for size in sizes:
        x, full = torch.zeros(size), torch.zeros(size * world)
        for name in COLLECTIVES:
            dist.barrier()
            out[(name, size)] = _time(functools.partial(_collective, name, x, full, rank))
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def measure_collectives(group_sizes: list[int], sizes: tuple[int, int] = (1 << 10, 1 << 20)) -> dict:
    """``{(op, group size): (alpha seconds, seconds per byte)}`` fitted on forked gloo ranks."""
    fits = {}
    ctx = mp.get_context("fork")
    for world in group_sizes:
        if world < 2:
            continue
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            store = os.path.join(tmp, "store")
            procs = [ctx.Process(target=_collective_worker, args=(r, world, store, list(sizes), queue))
                     for r in range(world)]
            for p in procs:
                p.start()
            times = queue.get(timeout=120)
            for p in procs:
                p.join()
        small, large = sizes
        for op in COLLECTIVES:
            per_byte = max(times[(op, large)] - times[(op, small)], 0.0) / (4 * (large - small))
            fits[(op, world)] = (max(times[(op, small)] - per_byte * 4 * small, 0.0), per_byte)
    return fits


@dataclasses.dataclass
class Profile:
    """What was measured: per-layer and head seconds by (micro batch, TP, recompute), collective fits,
    Adam seconds per element, the GEMM FLOP/s of one rank and the cores available."""

    layer: dict = dataclasses.field(default_factory=dict)
    head: dict = dataclasses.field(default_factory=dict)
    collectives: dict = dataclasses.field(default_factory=dict)
    adam_s_per_element: float = 0.0
    peak_flops: float = 1.0
    cores: int = 1
    on_cpu: bool = True


def layer_shard_config(spec: ModelSpec, tp: int, selective: bool) -> TransformerConfig:
    """One layer's TP shard as a TP 1 config: heads, query groups and MLP width / TP, the per-head
    size kept, no sequence parallelism, selective recompute or none."""
    c = spec.config
    return dataclasses.replace(c, num_layers=1, num_attention_heads=c.num_attention_heads // tp,
                               num_query_groups=spec.num_query_groups // tp,
                               ffn_hidden_size=spec.ffn_hidden_size // tp, kv_channels=spec.kv_channels,
                               sequence_parallel=False,
                               recompute_granularity="selective" if selective else None,
                               recompute_method=None, recompute_num_layers=None)


def _layer_seconds(spec: ModelSpec, mb: int, tp: int, selective: bool) -> float:
    """Forward + backward of one layer's TP shard (:func:`layer_shard_config`)."""
    from megatron_core import parallel_state
    from megatron_core.models.gpt import GPTModel

    c = spec.config
    shard = layer_shard_config(spec, tp, selective)
    ps = parallel_state.ParallelState(1, 1)
    ps.manual_seed(0)
    model = GPTModel(shard, 128, spec.max_position_embeddings, pre_process=False, post_process=False,
                     parallel_state=ps)
    where = device_mod.current_device()
    # what a stage receives: the fp32 residual stream with --fp32-residual-connection, else the params dtype
    x = torch.randn(spec.seq_length, mb, c.hidden_size, dtype=c.pipeline_communication_dtype, device=where,
                    requires_grad=True)
    positions = torch.arange(spec.seq_length, device=where).expand(mb, spec.seq_length)
    # --reset-attention-mask: attention takes the masked path (all s x s scores); its cost does not
    # depend on where the documents end, so the causal mask stands for any document mask.
    mask = causal_mask(spec.seq_length, spec.seq_length, where).expand(mb, 1, -1, -1) if spec.document_mask else None

    def step() -> None:
        model.set_input_tensor(x)
        model(None, positions, attention_mask=mask).sum().backward()
    seconds = _time(step)
    ps.destroy()
    return seconds


def _head_seconds(spec: ModelSpec, mb: int, tp: int) -> float:
    h, vocab = spec.config.hidden_size, spec.padded_vocab(tp) // tp
    where = device_mod.current_device()
    x = torch.randn(spec.seq_length * mb, h, device=where, requires_grad=True)
    w = torch.randn(vocab, h, device=where, requires_grad=True)
    labels = torch.randint(0, vocab, (spec.seq_length * mb,), device=where)
    return _time(lambda: F.cross_entropy(linear(x, w), labels).backward())  # the output layer's linear


def profile(spec: ModelSpec, layouts: list[Layout], world_size: int, progress: Callable | None = None) -> Profile:
    """Measure everything the candidate ``layouts`` need (each distinct shape once).
    Collectives run on forked ranks first; layers are timed in a one-rank group (made if needed)."""
    prof = Profile(cores=device_mod.usable_cores(), on_cpu=device_mod.current_device().type == "cpu")
    prof.collectives = measure_collectives(sorted({n for n in (2, 4, 8, world_size) if n <= world_size}))
    owned = _ensure_group()
    keys = sorted({(lay.micro_batch_size, lay.tp, lay.recompute == "selective") for lay in layouts})
    for mb, tp, selective in (progress(keys) if progress is not None else keys):
        prof.layer[(mb, tp, selective)] = _layer_seconds(spec, mb, tp, selective)
        if (mb, tp) not in prof.head:
            prof.head[(mb, tp)] = _head_seconds(spec, mb, tp)
    flat = torch.nn.Parameter(torch.zeros(1 << 20))
    flat.grad = torch.zeros_like(flat)
    adam = torch.optim.Adam([flat])
    prof.adam_s_per_element = _time(adam.step) / flat.numel()
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    prof.peak_flops = 2 * 512 ** 3 / _time(lambda: torch.mm(a, b))
    if owned:
        dist.destroy_process_group()
    return prof


def _ensure_group() -> bool:
    """A one-rank gloo group for building layers outside a launcher; True when created here."""
    if dist.is_initialized():
        return False
    store = os.path.join(tempfile.mkdtemp(prefix="autotune_"), "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    return True


def _comm(prof: Profile, op: str, group: int, nbytes: float) -> float:
    """Seconds of ``op`` over ``group`` ranks. ``nbytes`` is what :func:`measure_collectives` timed: the
    whole tensor for all-reduce and send/recv, one rank's shard for all-gather and reduce-scatter."""
    if group < 2:
        return 0.0
    key = (op, group) if (op, group) in prof.collectives else min(
        (k for k in prof.collectives if k[0] == op), key=lambda k: abs(k[1] - group))
    alpha, per_byte = prof.collectives[key]
    return alpha + per_byte * nbytes


def step_time(spec: ModelSpec, layout: Layout, prof: Profile, flops_per_step: float) -> tuple[float, float]:
    """(predicted seconds per iteration, MFU against the measured GEMM rate of all ranks)."""
    s, mb, h, tp, B = spec.seq_length, layout.micro_batch_size, spec.config.hidden_size, layout.tp, spec.bytes_per_param
    layers = spec.config.num_layers // layout.pp
    layer = prof.layer[(mb, tp, layout.recompute == "selective")]
    if layout.recompute == "full":
        layer *= 4 / 3  # one more forward: forward is about a third of forward + backward
    slowdown = max(1.0, layout.world_size / prof.cores) if prof.on_cpu else 1.0
    act_bytes = s * mb * h * B
    tp_comm = 4 * _comm(prof, "all_reduce", tp, act_bytes)  # SP's all-gather + reduce-scatter move the same bytes
    per_mb = layers * (layer * slowdown + tp_comm) + (prof.head[(mb, tp)] * slowdown if layout.pp > 1 else 0)
    last_extra = prof.head[(mb, tp)] * slowdown if layout.pp == 1 else 0.0
    m = spec.num_microbatches(layout)
    bubble = (layout.pp - 1) / (layout.vpp or 1)
    # stages send the residual stream: fp32 with --fp32-residual-connection (pipeline_communication_dtype)
    stream = s * mb * h * stream_bytes(spec) / (tp if layout.sequence_parallel else 1)
    p2p = 2 * _comm(prof, "send_recv", 2, stream) if layout.pp > 1 else 0.0
    pipeline = (m + bubble) * (per_mb + p2p) + m * last_extra
    states = model_state_bytes(spec, layout)
    # The rank's bucket-padded elements (ZeRO-3 keeps a 1/dp shard of them) and its shard of them.
    elements = states.params // B * (layout.dp if layout.zero_stage == 3 else 1)
    shard = elements // layout.dp
    if layout.zero_stage == 0:
        dp_comm = _comm(prof, "all_reduce", layout.dp, elements * spec.grad_bytes)
        opt_elements = elements
    else:
        reductions = m if layout.zero_stage >= 2 else 1  # ZeRO-2/3 free the full gradients per microbatch
        # ZeRO-1/2 gather the updated parameters once after the step; ZeRO-3 gathers each microbatch's
        # parameters in forward and again in backward, and only writes its shard at the step.
        gathers = 2 * m if layout.zero_stage == 3 else 1
        dp_comm = (reductions * _comm(prof, "reduce_scatter", layout.dp, shard * spec.grad_bytes)
                   + gathers * _comm(prof, "all_gather", layout.dp, shard * B))
        opt_elements = shard
    total = pipeline + dp_comm + opt_elements * prof.adam_s_per_element * slowdown
    return total, flops_per_step / total / (prof.peak_flops * layout.world_size)
