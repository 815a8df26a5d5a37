"""The distributed optimizer: ZeRO-1 and ZeRO-2 over the DDP wrapper's buffers.

DP rank r owns the r-th shard of every bucket (see ``param_and_grad_buffer``). It keeps fp32 main
parameters and optimizer state for that shard only: one flat fp32 tensor per buffer, of which each
parameter's piece is a view the torch optimizer updates. A step reads the reduced gradient shard
(from the full gradient buffer under ZeRO-1; under ZeRO-2/3 from the kept ``grad_shard``, each
bucket's full gradient having been freed once reduced), updates the shard, writes it into the
parameter buffer in the model dtype and all-gathers every bucket's parameters over DP.

Checkpoints: :meth:`state_dict` holds what every DP rank shares (hyper-parameters, loss scale);
:meth:`sharded_state_dict` this rank's flat shards, written to ``distrib_optim_dp{rank:03d}.pt``.

fp32 weights written into the model between steps (``model.load_state_dict``) take effect at the next
step, offloaded or not. On the device an fp32 shard is its own main copy (Megatron-LM's
``shard_fp32_groups`` are views of the parameters), so the step updates what was loaded. An offloaded
(or host-kept ZeRO-3) fp32 shard has a separate main copy: the optimizer keeps autograd's version counters
of the model's copy (the parameters under ZeRO-1/2, the kept shard under ZeRO-3) from when the two last
agreed, and a bucket whose counters moved takes the model's values before the step (an exact copy in
fp32) or before a checkpoint reads the main copy. Without this the step wrote the old main copy back over
the loaded weights (megatron-core 0.16.1's ``HybridDeviceOptimizer`` keeps such a host copy too). Writes
through ``param.data`` bypass the counters, and a 16-bit model's main copy cannot be rebuilt from it
without rounding: call :meth:`DistributedOptimizer.reload_model_params` after those (Megatron-LM's rule).
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import torch

from megatron_core import device as device_mod
from megatron_core.distributed.bucket import Bucket, ShardPiece
from megatron_core.distributed.distributed_data_parallel import DistributedDataParallel
from megatron_core.distributed.param_and_grad_buffer import ParamAndGradBuffer
from megatron_core.optimizer.offload import NvmeSwapper, OverlappedOffload, Unit, offloaded_buckets
from megatron_core.optimizer.optimizer import MegatronOptimizer, build_torch_optimizer
from megatron_core.optimizer.optimizer_config import OptimizerConfig
from megatron_core.parallel_state import ParallelState


@dataclasses.dataclass
class _ShardedBuffer:
    buffer: ParamAndGradBuffer
    # fp32 master copy of this rank's shard of each bucket (padding included); for fp32 parameters on the
    # device, the model's shard itself
    bucket_mains: list[torch.Tensor]
    pieces: list[ShardPiece]
    mains: list[torch.nn.Parameter]  # views into ``bucket_mains``, one per piece
    offloaded: list[bool]  # per bucket: main parameters, state and step in host memory
    host_grads: list[torch.Tensor | None]  # per offloaded bucket: the fp32 host copy of the reduced gradient
    # per bucket: the model copy's version counters when the main copy last agreed with it (_model_version),
    # None where nothing is followed (the main copy is the fp32 shard itself, or the model is 16-bit)
    agreed: list[tuple[int, ...] | None]

    @property
    def main(self) -> torch.Tensor:
        """This rank's whole fp32 shard, concatenated (a copy; for checkpoints and checks)."""
        return torch.cat([m.to("cpu") for m in self.bucket_mains])


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.device == b.device


def _main_of(sb: _ShardedBuffer, bucket: Bucket) -> torch.Tensor:
    """The fp32 main copy of this rank's shard of ``bucket``."""
    return sb.bucket_mains[bucket.index]


def _model_version(sb: _ShardedBuffer, bucket: Bucket) -> tuple[int, ...]:
    """autograd's version counters of what holds the model's values of ``bucket``: any in-place write
    (``load_state_dict``'s ``param.copy_``, a DCP load into ``param.detach()``) moves one. Under ZeRO-3 the
    kept shard (``param_shard``, one counter for the buffer), else each parameter: its counter is its own
    (the buffer's views were set as its ``.data``), so the optimizer's own writes into the buffer (the
    copy of the main shard, the all-gathers) leave it alone; the buffer's counter moved between steps
    under ``--overlap-param-gather`` (measured) and is not used."""
    if sb.buffer.param_shard is not None:
        return (sb.buffer.param_shard._version,)
    return tuple(p._version for p in bucket.params)


def _follows_model(shard: torch.Tensor, main: torch.Tensor) -> bool:
    """Whether the main copy follows model writes: an fp32 shard with a main copy of its own (offloaded);
    a 16-bit shard's copy would round the main copy."""
    return shard.dtype == torch.float32 and not _same_memory(shard, main)


class DistributedOptimizer(MegatronOptimizer):
    """fp32 main parameters and optimizer state sharded over DP (ZeRO-1 / ZeRO-2, per the DDP config)."""

    sharded_over_dp = True

    def __init__(
        self, config: OptimizerConfig, model_chunks: list[torch.nn.Module], parallel_state: ParallelState,
        model_param_groups: list[dict] | None = None,
    ) -> None:
        super().__init__(config, model_chunks, parallel_state, model_param_groups)
        ddp_chunks: list[DistributedDataParallel] = []
        for chunk in self.model_chunks:
            if not (isinstance(chunk, DistributedDataParallel) and chunk.ddp_config.zero_stage >= 1):
                raise TypeError("the distributed optimizer needs every model chunk wrapped in "
                                "DistributedDataParallel with DistributedDataParallelConfig(zero_stage >= 1)")
            ddp_chunks.append(chunk)
        self.zero_stage = ddp_chunks[0].ddp_config.zero_stage
        self.sharded: list[_ShardedBuffer] = []
        buffers = [buffer for chunk in ddp_chunks for buffer in chunk.buffers_by_dtype]
        offload = offloaded_buckets(config, buffers)
        for buffer, flags in zip(buffers, offload, strict=True):
            self.sharded.append(self._shard(buffer, flags))
        self.offloading = any(any(sb.offloaded) for sb in self.sharded)
        self.inner = build_torch_optimizer(config, self.pairs, model_param_groups)
        self.nvme: NvmeSwapper | None = None
        if config.nvme_offload_path is not None:
            self.nvme = NvmeSwapper.for_optimizer(config, self.sharded, self.inner, parallel_state)
        self.overlap: OverlappedOffload | None = None
        if config.overlap_cpu_optimizer_d2h_h2d and self.offloading:
            self.overlap = OverlappedOffload(self.sharded, parallel_state)

    def _shard(self, buffer: ParamAndGradBuffer, offloaded: list[bool]) -> _ShardedBuffer:
        host = device_mod.host_device()
        bucket_mains, host_grads = [], []
        for bucket, off in zip(buffer.buckets, offloaded, strict=True):
            shard = buffer.shard_param(bucket)
            if not off and shard.dtype == torch.float32 and shard.device == buffer.device:
                # fp32 parameters are their own main copy, as Megatron-LM's distributed optimizer has it
                # (``shard_fp32_groups``: views of the model parameters): a second fp32 shard would be 4
                # bytes per parameter / DP more and change nothing.
                bucket_mains.append(shard)
            else:
                where = host if off else buffer.device
                main = torch.zeros(bucket.shard_size, dtype=torch.float32, device=where)
                bucket_mains.append(device_mod.maybe_pin(main) if off else main)
            host_grads.append(device_mod.maybe_pin(torch.zeros(bucket.shard_size, dtype=torch.float32, device=host))
                              if off else None)
        pieces = buffer.local_pieces()
        mains = []
        for piece in pieces:
            start = piece.shard_start - piece.bucket.local_offset
            mains.append(torch.nn.Parameter(bucket_mains[piece.bucket.index][start:start + piece.numel]))
        sb = _ShardedBuffer(buffer, bucket_mains, pieces, mains, offloaded, host_grads, [None] * len(bucket_mains))
        self._reload_buckets(sb)
        buffer.shard_listeners.append(weakref.WeakMethod(self._follow_shard))
        self.pairs.extend(zip(mains, (piece.param for piece in pieces), strict=True))
        return sb

    def host_tensors(self) -> list[torch.Tensor]:
        """Main parameters, gradient copies and optimizer state held in host memory (offload)."""
        out: list[torch.Tensor] = []
        for sb in self.sharded:
            for bucket, off in zip(sb.buffer.buckets, sb.offloaded, strict=True):
                host_grad = sb.host_grads[bucket.index]
                if off and host_grad is not None:
                    out += [_main_of(sb, bucket), host_grad]
        host_mains = {id(main) for sb in self.sharded for piece, main in zip(sb.pieces, sb.mains, strict=True)
                      if sb.offloaded[piece.bucket.index]}
        out += [v for main, state in self.torch_optimizer.state.items() if id(main) in host_mains
                for v in state.values() if torch.is_tensor(v)]
        return out

    # ---- the step -----------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """As the base class; first waits for gradient copies to the host still in flight (they read
        the buffers being zeroed)."""
        if self.overlap is not None:
            self.overlap.wait_grads()
        super().zero_grad()

    def _prepare_main_grads(self) -> None:
        self._follow_model_writes()
        # --overlap-cpu-optimizer-d2h-h2d: the copies started as buckets were reduced must be done
        # before the host step reads them.
        copied = self.overlap.wait_grads() if self.overlap is not None else set()
        for i, sb in enumerate(self.sharded):
            sb.buffer.finish_param_gathers()  # the step rewrites the shards gathers may still read
            for bucket, host_grad in zip(sb.buffer.buckets, sb.host_grads, strict=True):
                if host_grad is not None and (i, bucket.index) not in copied:
                    # offload: stream the reduced gradient out, bucket by bucket
                    host_grad.copy_(sb.buffer.shard_grad(bucket), non_blocking=True)
            for piece, main in zip(sb.pieces, sb.mains, strict=True):
                start = piece.shard_start - piece.bucket.local_offset
                host_grad = sb.host_grads[piece.bucket.index]
                grad = host_grad if host_grad is not None else sb.buffer.shard_grad(piece.bucket)
                main.grad = grad[start:start + piece.numel].float()  # no copy when already fp32
        if self.offloading:
            device_mod.synchronize()  # the device-to-host copies are complete

    def _update(self) -> None:
        if self.nvme is not None:
            self.nvme.step(self.torch_optimizer, self._copy_device_buckets_to_model, self._copy_bucket_to_model)
        elif self.overlap is not None:
            self.overlap.step(self.torch_optimizer, self._offloaded_units(), self._copy_device_buckets_to_model,
                              self._copy_bucket_to_model)
        else:
            super()._update()  # the torch step, then _copy_main_to_model
            return
        self._gather_params()
        self._agree_with_model()  # the step wrote every main copy into the model

    def _offloaded_units(self) -> list[Unit]:
        return [(sb, bucket, [main for piece, main in zip(sb.pieces, sb.mains, strict=True) if piece.bucket is bucket])
                for sb in self.sharded for bucket, off in zip(sb.buffer.buckets, sb.offloaded, strict=True) if off]

    def _copy_device_buckets_to_model(self) -> None:
        for sb in self.sharded:
            for bucket, off in zip(sb.buffer.buckets, sb.offloaded, strict=True):
                if not off:
                    self._copy_bucket_to_model(sb, bucket)

    def _copy_bucket_to_model(self, sb: _ShardedBuffer, bucket: Bucket):
        """Copy ``bucket``'s updated main shard into the model's shard. With
        --overlap-cpu-optimizer-d2h-h2d an offloaded bucket's copy is started on the copy engine
        and its handle returned; otherwise None (host-to-device from pinned memory is asynchronous
        on CUDA too, and waited on by ``_gather_params``)."""
        if self.overlap is not None and sb.offloaded[bucket.index]:
            return self.overlap.engine.copy(sb.buffer.shard_param(bucket), _main_of(sb, bucket))
        shard, main = sb.buffer.shard_param(bucket), _main_of(sb, bucket)
        if not _same_memory(shard, main):
            shard.copy_(main, non_blocking=True)
        return None

    def _copy_main_to_model(self) -> None:
        for sb in self.sharded:
            for bucket in sb.buffer.buckets:
                self._copy_bucket_to_model(sb, bucket)
        self._gather_params()
        self._agree_with_model()

    def _gather_params(self) -> None:
        if self.offloading:
            device_mod.synchronize()
        for sb in self.sharded:
            sb.buffer.all_gather_params(async_op=sb.buffer.config.overlap_param_gather)

    def _resident(self):
        """Every optimizer shard in memory inside the block (NVMe offload swaps them in and out)."""
        return self.nvme.swapped_in() if self.nvme is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """Context: every optimizer shard (main parameters, Adam state) in memory, for a checkpoint to
        read or write them in place; NVMe offload writes them back and frees them on exit. fp32 weights
        written into the model before the block are in the main copies on entry, and main copies the
        block wrote (a load) are kept over those earlier writes by the next step (see the module docstring)."""
        self._follow_model_writes()
        with self._resident():
            yield
        self._agree_with_model()

    def _follow_model_writes(self) -> None:
        """Each bucket whose fp32 model values were written since its separate main copy last agreed with
        them (load_state_dict between steps) copies them into the main copy, as if the main copy were the
        model's shard, as it is without offload."""
        stale = [(sb, bucket) for sb in self.sharded for bucket in sb.buffer.buckets
                 if sb.agreed[bucket.index] is not None and sb.agreed[bucket.index] != _model_version(sb, bucket)]
        if stale:
            with torch.no_grad(), self._resident():
                for sb, bucket in stale:
                    self._reload_buckets(sb, [bucket])

    def _agree_with_model(self) -> None:
        for sb in self.sharded:
            for bucket in sb.buffer.buckets:
                if sb.agreed[bucket.index] is not None:
                    sb.agreed[bucket.index] = _model_version(sb, bucket)

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Make this rank's fp32 main shard follow model weights loaded without optimizer state."""
        with self._resident():
            self._reload_model_params()

    @torch.no_grad()
    def _follow_shard(self, bucket: Bucket) -> None:
        """A bucket's kept model shard was rewritten (``megatron_core.zero.GatheredParameters`` with a
        ``modifier_rank``): its fp32 main copy follows, so the next step starts from the new values."""
        with self._resident():
            for sb in self.sharded:
                if any(b is bucket for b in sb.buffer.buckets):
                    self._reload_buckets(sb, [bucket])

    def _reload_model_params(self) -> None:
        for sb in self.sharded:
            self._reload_buckets(sb)

    @staticmethod
    def _reload_buckets(sb: _ShardedBuffer, buckets: list[Bucket] | None = None) -> None:
        """The main copy of each of ``buckets`` (all by default) takes the model's shard (nothing to do where
        the main copy is the fp32 shard itself); an fp32 one then follows the model's later writes."""
        for bucket in sb.buffer.buckets if buckets is None else buckets:
            shard, main = sb.buffer.shard_param(bucket), _main_of(sb, bucket)
            if not _same_memory(shard, main):
                main.copy_(shard)
            if _follows_model(shard, main):
                sb.agreed[bucket.index] = _model_version(sb, bucket)

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What all DP ranks share: hyper-parameters of each group and the loss scaler."""
        state = self._common_state()
        state["param_groups"] = [
            {k: v for k, v in g.items() if k != "params"} for g in self.torch_optimizer.param_groups
        ]
        state["zero_stage"] = self.zero_stage
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (group hyper-parameters and loss scaler; not the shards)."""
        self._load_common_state(state)
        for group, saved in zip(self.torch_optimizer.param_groups, state["param_groups"], strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})

    def sharded_state_dict(self) -> dict:
        """This DP rank's fp32 main shard and optimizer state, one flat tensor per buffer and state key."""
        with self.resident():
            return self._sharded_state_dict()

    def _sharded_state_dict(self) -> dict:
        buffers = []
        for sb in self.sharded:
            flat: dict[str, torch.Tensor] = {}
            scalars: dict[str, list[torch.Tensor]] = {}
            for piece, main in zip(sb.pieces, sb.mains, strict=True):
                for key, value in self.torch_optimizer.state.get(main, {}).items():
                    if torch.is_tensor(value) and value.numel() == piece.numel and value.dim() > 0:
                        if key not in flat:
                            flat[key] = torch.zeros(sb.buffer.shard_numel, dtype=value.dtype)
                        flat[key][piece.shard_start:piece.shard_start + piece.numel].copy_(value.reshape(-1))
                    else:
                        scalars.setdefault(key, []).append(torch.as_tensor(value).clone())
            buffers.append({"numel": sb.buffer.numel, "shard_numel": sb.buffer.shard_numel,
                            "main_params": sb.main.clone(), "state": flat,
                            "scalar_state": {k: torch.stack(v) for k, v in scalars.items()}})
        return {"dp_rank": self.parallel_state.dp_rank, "dp_size": self.parallel_state.dp_size,
                "zero_stage": self.zero_stage, "buffers": buffers}

    def load_sharded_state_dict(self, state: dict) -> None:
        """Restore :meth:`sharded_state_dict`'s output; the DP size and model layout must match."""
        with self.resident():
            self._load_sharded_state_dict(state)

    def _load_sharded_state_dict(self, state: dict) -> None:
        if state["dp_size"] != self.parallel_state.dp_size or state["dp_rank"] != self.parallel_state.dp_rank:
            raise ValueError(f"distributed optimizer checkpoint is DP rank {state['dp_rank']} of {state['dp_size']}, "
                             f"this rank is {self.parallel_state.dp_rank} of {self.parallel_state.dp_size}: resume "
                             f"with the same data-parallel size (or load without the optimizer state, --no-load-optim)")
        if len(state["buffers"]) != len(self.sharded):
            raise ValueError(f"distributed optimizer checkpoint has {len(state['buffers'])} buffers, the model "
                             f"{len(self.sharded)}: same model, dtypes and --accumulate-allreduce-grads-in-fp32 needed")
        with torch.no_grad():
            for sb, saved in zip(self.sharded, state["buffers"], strict=True):
                if saved["numel"] != sb.buffer.numel or saved["shard_numel"] != sb.buffer.shard_numel:
                    raise ValueError(f"distributed optimizer checkpoint buffer of {saved['numel']} elements does not "
                                     f"match the model's {sb.buffer.numel}: same model and bucket_size needed")
                for bucket in sb.buffer.buckets:
                    _main_of(sb, bucket).copy_(saved["main_params"][bucket.local_offset:
                                                                    bucket.local_offset + bucket.shard_size])
                for i, (piece, main) in enumerate(zip(sb.pieces, sb.mains, strict=True)):
                    entry = {key: flat[piece.shard_start:piece.shard_start + piece.numel].clone().view_as(main)
                             for key, flat in saved["state"].items()}
                    entry.update({key: values[i].clone() for key, values in saved["scalar_state"].items()})
                    current = self.torch_optimizer.state.get(main, {})
                    for key, value in entry.items():
                        if key in current and torch.is_tensor(current[key]) and current[key].shape == value.shape:
                            current[key].copy_(value)  # keep the tensors NVMe offload swaps
                        else:
                            current[key] = value.to(main.device)
                    if current:
                        self.torch_optimizer.state[main] = current
