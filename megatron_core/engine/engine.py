"""The training engine: DeepSpeed's ``engine(...)`` / ``backward`` / ``step`` loop over the library's parts.

One step of a user's loop, ``loss = engine(batch); engine.backward(loss); engine.step()``:

- ``backward`` divides the loss by ``gradient_accumulation_steps`` and multiplies it by the fp16 loss
  scale (``MegatronOptimizer.scale_loss``); every micro step but the last of a global batch runs under
  ``DistributedDataParallel.no_sync()`` so gradients only accumulate, and the boundary's backward is
  followed by ``finalize_model_grads`` (the DP reduction, reduce-scatter under ZeRO-2, and the TP
  reductions);
- ``step`` at the boundary runs the library optimizer (unscale, inf/nan agreed over every rank with a
  skipped step and a backed-off scale, global-norm clipping, update of the fp32 main parameters,
  ZeRO all-gather), steps the scheduler after a successful update and zeroes the gradient buffers.

Counters follow DeepSpeed: ``micro_steps`` counts ``step()`` calls, ``global_steps`` optimizer
boundaries (skipped fp16 steps included, counted in ``skipped_steps``), ``global_samples`` their samples.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_core import device as device_mod
from megatron_core.distributed import DistributedDataParallel, finalize_model_grads
from megatron_core.engine import checkpoint as ckpt
from megatron_core.engine.client_objects import step_scheduler
from megatron_core.engine.config import EngineConfig
from megatron_core.engine.library_configs import as_deepspeed_keys
from megatron_core.engine.monitor import Monitor
from megatron_core.engine.queries import DeepSpeedQueries
from megatron_core.errors import ConfigError, named_for
from megatron_core.optimizer import MegatronOptimizer
from megatron_core.optimizer.grad_scaler import DynamicGradScaler
from megatron_core.parallel_state import ParallelState
from megatron_core.training.health import TrainingDivergedError
from megatron_core.zero import refuse_inside_gathered_block


def _check_loss(loss: object) -> None:
    """DeepSpeed's condition on ``engine.backward``'s loss (``maybe_loss_for_backward``: a tensor of one element
    with a ``grad_fn``) as one ConfigError line naming what was passed and the fix."""
    if not torch.is_tensor(loss):
        raise ConfigError(f"engine.backward(loss): loss is a {type(loss).__name__}, not a tensor; pass the loss "
                          f"tensor itself (not loss.item()), computed from the engine's output")
    if loss.numel() != 1:
        raise ConfigError(f"engine.backward(loss): loss has shape {list(loss.shape)} ({loss.numel()} elements); "
                          f"backward needs a scalar loss: reduce it first, e.g. engine.backward(loss.mean())")
    if not loss.requires_grad:
        raise ConfigError("engine.backward(loss): loss does not require grad (computed under torch.no_grad(), "
                          "or .detach()ed); compute it from the engine's output with gradients enabled")


class EngineDataLoader(torch.utils.data.DataLoader):
    """The loader ``deepspeed_io`` returns: a ``torch.utils.data.DataLoader`` that also names its sampler
    ``data_sampler``, as DeepSpeed's ``DeepSpeedDataLoader`` does; scripts reshuffle each epoch with
    ``loader.data_sampler.set_epoch(epoch)`` (DeepSpeed's loader has no ``sampler`` attribute)."""

    @property
    def data_sampler(self) -> Any:
        """The loader's sampler (a ``DistributedSampler`` unless ``deepspeed_io`` was given one)."""
        return self.sampler


class Engine(DeepSpeedQueries, torch.nn.Module):
    """A model wrapped for data (and AutoTP tensor) parallel training from a DeepSpeed config.

    Built by :func:`megatron_core.initialize`; ``module`` is the user's model (with AutoTP layers
    swapped in), ``optimizer`` the library optimizer, ``lr_scheduler`` the config's or the client's.
    """

    def __init__(
        self,
        ddp: DistributedDataParallel,
        optimizer: MegatronOptimizer,
        lr_scheduler: Any,
        config: EngineConfig,
        parallel_state: ParallelState,
        hf_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.config, self.parallel_state = config, parallel_state
        self.ddp = ddp
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.hf_config = hf_config
        self.collate_fn: Any = None  # initialize's collate_fn, deepspeed_io's default (DeepSpeed's attribute)
        # the trained parameters' names per optimizer param group (initialize's), DeepSpeed's ZeRO-0 numbering
        self.param_group_names: list[list[str]] = [[n for n, p in ddp.module.named_parameters() if p.requires_grad]]
        self.micro_steps = self.global_steps = self.global_samples = self.skipped_steps = 0
        self._step_applied = False
        self._boundary: bool | None = None  # set_gradient_accumulation_boundary's override (None: count)
        self._in_no_sync = False
        self._reduced = False  # a boundary backward has reduced the gradients since the last step()
        self._grad_norm: float | None = None
        self._losses: list[float] = []
        self._timings = {"forward": 0.0, "backward": 0.0, "step": 0.0}
        self.monitor = Monitor(config, parallel_state.rank)

    def deepspeed_io(self, dataset: Any, batch_size: int | None = None, route: str = "train", pin_memory: bool = True,
                     data_sampler: Any = None, collate_fn: Any = None, num_local_io_workers: int | None = None) -> Any:
        """DeepSpeed's ``engine.deepspeed_io``: an :class:`EngineDataLoader` over a map-style ``dataset``.

        Sharded over the data-parallel ranks by a ``DistributedSampler`` (shuffled for ``route`` "train", in order
        for "eval" and "predict", as DeepSpeed) unless ``data_sampler`` is given; ``batch_size`` defaults to
        ``train_micro_batch_size_per_gpu``, ``collate_fn`` to initialize's; ``dataloader_drop_last`` applies.
        ``num_local_io_workers`` is the DataLoader's ``num_workers`` (None: 0, loading in this process);
        ``pin_memory`` pins only on CUDA. ``initialize(training_data=...)`` returns ``deepspeed_io(training_data)``.
        Raises ConfigError for another ``route``.
        """
        if route not in ("train", "eval", "predict"):
            raise ConfigError(f"deepspeed_io: route {route!r} is not one of 'train', 'eval', 'predict'")
        if data_sampler is None:
            data_sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=self.parallel_state.dp_size, rank=self.parallel_state.dp_rank,
                shuffle=route == "train")
        return EngineDataLoader(
            dataset,
            batch_size=self.config.train_micro_batch_size_per_gpu if batch_size is None else batch_size,
            sampler=data_sampler,
            collate_fn=self.collate_fn if collate_fn is None else collate_fn,
            drop_last=self.config.dataloader_drop_last,
            num_workers=num_local_io_workers or 0,
            pin_memory=pin_memory and self.device.type == "cuda",
        )

    # ---- the module -------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The user's model (its parameters live in the DDP wrapper's buffers)."""
        return self.ddp.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped model's forward (timed for ``wall_clock_breakdown``)."""
        start = time.perf_counter()
        try:
            out = self.ddp(*args, **kwargs)
        except RuntimeError as exc:
            if self.ddp.ddp_config.zero_stage == 3 and "storage of size 0" in str(exc):
                # A freed ZeRO-3 parameter: torch's message does not say which or why.
                raise RuntimeError(f"{exc}. Under ZeRO-3 a parameter is gathered only for the modules that own "
                                   f"it or get it as an argument: a forward reading another module's parameter "
                                   f"as an attribute needs megatron_core.zero.register_external_parameter(module, "
                                   f"parameter)") from exc
            raise
        self._timings["forward"] += time.perf_counter() - start
        return out

    def module_state_dict(self, destination: dict | None = None, prefix: str = "", keep_vars: bool = False,
                          exclude_frozen_parameters: bool = False) -> dict:
        """DeepSpeed's ``engine.module_state_dict``: the user's model's ``state_dict(destination, prefix,
        keep_vars)`` (keys without the engine's wrapper prefix, AutoTP layers as this rank's shards), without
        the ``requires_grad=False`` parameters when ``exclude_frozen_parameters``. Under ZeRO-3 the
        parameters are gathered whole (a collective: every data-parallel rank calls it), where DeepSpeed's
        gives the empty partitioned tensors."""
        # Two calls for torch's two overloads; None lets torch make its OrderedDict with the version _metadata.
        state: dict = (self.module.state_dict(prefix=prefix, keep_vars=keep_vars) if destination is None
                       else self.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars))
        if exclude_frozen_parameters:
            for name, param in self.module.named_parameters():
                if not param.requires_grad and prefix + name in state:
                    del state[prefix + name]
        return state

    def train(self, mode: bool = True) -> Engine:
        """Set the model's training mode; returns the engine."""
        self.module.train(mode)
        self.training = mode
        return self

    def eval(self) -> Engine:
        """Evaluation mode (``train(False)``)."""
        return self.train(False)

    # ---- DeepSpeed's process attributes ---------------------------------------------------------
    @property
    def local_rank(self) -> int:
        """This process's rank on its node (torchrun's ``LOCAL_RANK``; 0 without it)."""
        return int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def global_rank(self) -> int:
        """This process's rank in the job."""
        return self.parallel_state.rank

    @property
    def world_size(self) -> int:
        """Processes in the job."""
        return self.parallel_state.world_size

    @property
    def dp_world_size(self) -> int:
        """Data-parallel size (world / AutoTP size)."""
        return self.parallel_state.dp_size

    @property
    def mp_world_size(self) -> int:
        """Model-parallel (AutoTP) size."""
        return self.parallel_state.tp_size

    @property
    def device(self) -> torch.device:
        """Where the model computes (its local CUDA device, or the CPU): move batches here."""
        return device_mod.current_device()

    def was_step_applied(self) -> bool:
        """Whether the last ``step()`` updated the parameters (False between accumulation boundaries and
        after an fp16 overflow skip), as DeepSpeed's."""
        return self._step_applied

    # ---- DeepSpeed's counters and accessors (methods, as DeepSpeedEngine's) -----------------------
    def gradient_accumulation_steps(self) -> int:
        """Micro batches per optimizer step (the config's)."""
        return self.config.gradient_accumulation_steps

    def train_batch_size(self) -> int:
        """Samples per optimizer step over all DP ranks."""
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        """Samples per micro batch on this rank."""
        return self.config.train_micro_batch_size_per_gpu

    def get_batch_info(self) -> tuple[int, int, int]:
        """``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``, DeepSpeed's
        ``get_batch_info`` as its docstring documents it (DeepSpeed 0.19.8's returns the three bound methods
        themselves, uncalled; here the values)."""
        return self.train_batch_size(), self.train_micro_batch_size_per_gpu(), self.gradient_accumulation_steps()

    def set_train_batch_size(self, train_batch_size: int) -> None:
        """DeepSpeed's: a new global batch of the same micro batches, by changing ``gradient_accumulation_steps``.

        Raises ConfigError unless ``train_batch_size`` is a multiple of micro batch x DP size.
        """
        per_step = self.train_micro_batch_size_per_gpu() * self.dp_world_size
        if isinstance(train_batch_size, bool) or not isinstance(train_batch_size, int) or train_batch_size < 1 \
                or train_batch_size % per_step:
            raise ConfigError(f"engine.set_train_batch_size({train_batch_size!r}): the train batch size must be a "
                              f"multiple of {per_step} (train_micro_batch_size_per_gpu "
                              f"{self.train_micro_batch_size_per_gpu()} x {self.dp_world_size} data-parallel ranks)")
        self.config.train_batch_size = train_batch_size
        self.config.gradient_accumulation_steps = train_batch_size // per_step

    def set_train_micro_batch_size(self, micro_batch_size: int) -> None:
        """DeepSpeed's: a new micro batch size with the same accumulation steps (the global batch follows); the
        ``training_data`` loader keeps its batch size, as DeepSpeed's."""
        if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ConfigError(f"engine.set_train_micro_batch_size({micro_batch_size!r}): give a positive integer")
        self.config.train_micro_batch_size_per_gpu = micro_batch_size
        self.config.train_batch_size = micro_batch_size * self.gradient_accumulation_steps() * self.dp_world_size

    def zero_optimization_stage(self) -> int:
        """The config's ``zero_optimization.stage``."""
        return self.config.zero_optimization.stage

    def fp16_enabled(self) -> bool:
        """The config's ``fp16.enabled``."""
        return self.config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        """The config's ``bf16.enabled``."""
        return self.config.bf16_enabled

    def gradient_clipping(self) -> float:
        """The config's ``gradient_clipping`` (1.0 when the config leaves it out, as DeepSpeed 0.19; 0 or negative:
        none, as DeepSpeed's ``gradient_clipping() > 0.0``)."""
        return self.config.gradient_clipping

    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro step is the last of its global batch (``(micro_steps + 1) % GA == 0``),
        or what :meth:`set_gradient_accumulation_boundary` last set."""
        if self._boundary is not None:
            return self._boundary
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """DeepSpeed's override of the counted boundary, for loops that own it (Accelerate's wrapper sets it
        before every backward): the backwards of ``False`` micro steps only accumulate, the ``True`` one
        reduces over DP, and ``step()`` updates only while it is ``True``. It holds until set again
        (``None`` goes back to counting micro steps, which DeepSpeed's engine also accepts)."""
        self._boundary = None if is_boundary is None else bool(is_boundary)

    @contextlib.contextmanager
    def no_sync(self) -> Any:
        """DeepSpeed's (and torch DDP's) context: backwards inside it accumulate gradients without the DP
        reduction, even at a boundary; the first backward outside reduces all of them.

        Raises ConfigError under ZeRO-2/3 (their gradients are partitioned as they are reduced), for
        ``step()`` inside it and for a nested ``no_sync()``, as DeepSpeed asserts.
        """
        stage = self.zero_optimization_stage()
        if stage >= 2:
            raise ConfigError(f"engine.no_sync() does not work with zero_optimization.stage {stage} (gradients "
                              f"are partitioned as they are reduced), as in DeepSpeed; use stage 0 or 1, or "
                              f"gradient_accumulation_steps / set_gradient_accumulation_boundary(False)")
        if self._in_no_sync:
            raise ConfigError("engine.no_sync() inside engine.no_sync(): enter it once")
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    def get_lr(self) -> list[float]:
        """The learning rate of every optimizer param group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_mom(self) -> list[Any]:
        """DeepSpeed's: every param group's SGD ``momentum`` or Adam ``betas`` (``OneCycle`` cycles beta1)."""
        key = "momentum" if self.optimizer.config.optimizer == "sgd" else "betas"
        return [group.get(key, 0.0) for group in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The global gradient norm (before clipping) of the last optimizer step; None after a skipped step."""
        return self._grad_norm

    def get_loss_scale(self) -> float:
        """The current fp16 loss scale (1 without fp16)."""
        return self.optimizer.get_loss_scale()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the accumulated gradients (the engine does it after every optimizer step)."""
        self.optimizer.zero_grad()
        self._reduced = False

    # ---- the step ------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Back-propagate ``loss / gradient_accumulation_steps`` (times the fp16 scale); returns the unscaled loss.

        ``scale_wrt_gas`` False (DeepSpeed's keyword) leaves out the division by the accumulation steps.
        Gradients are reduced over data-parallel ranks only at the accumulation boundary, so one backward runs
        there per ``step()``: a second is a ConfigError (DeepSpeed 0.19.8 accumulates it; add the losses instead).
        ``loss`` is a one-element tensor with a graph (DeepSpeed's ``maybe_loss_for_backward``); anything else is
        a ConfigError naming what was passed.
        """
        _check_loss(loss)
        if self._reduced:
            raise ConfigError("engine.backward(): a second backward at the accumulation boundary before engine.step() "
                              "(the first one reduced the gradients over data-parallel ranks already); add the losses "
                              "and call engine.backward once")
        start = time.perf_counter()
        self._losses.append(float(loss.detach()))
        divisor = self.gradient_accumulation_steps() if scale_wrt_gas else 1
        scaled = self.optimizer.scale_loss(loss.float() / divisor)
        boundary = self.is_gradient_accumulation_boundary() and not self._in_no_sync
        with contextlib.nullcontext() if boundary else self.ddp.no_sync():
            scaled.backward(retain_graph=retain_graph)
        if boundary:
            finalize_model_grads([self.ddp], parallel_state=self.parallel_state)
            self._reduced = True
        self._timings["backward"] += time.perf_counter() - start
        return loss

    def step(self, lr_kwargs: dict | None = None) -> None:
        """At the accumulation boundary: optimizer step (or an fp16 skip on every rank), scheduler, zero grads.

        ``lr_kwargs`` (DeepSpeed's) are passed to the scheduler's ``step``.

        Raises ConfigError inside a ZeRO-3 ``megatron_core.zero.GatheredParameters`` block (every rank is in it)
        and inside :meth:`no_sync`.
        """
        if self._in_no_sync:
            raise ConfigError("engine.step() inside engine.no_sync(): its gradients are not reduced yet; "
                              "step after the block (after a backward outside it)")
        refuse_inside_gathered_block(self.ddp, "engine.step()", "the step", "step after the block")
        self._step_applied = False
        self._reduced = False
        if self.is_gradient_accumulation_boundary():
            start = time.perf_counter()
            at_floor = self._loss_scale_at_floor()
            try:
                ok, norm, _ = self.optimizer.step()
            except ConfigError as exc:  # an NVMe swap failing mid-run: named by the JSON key
                raise as_deepspeed_keys(exc) from None
            if not ok and at_floor:
                raise TrainingDivergedError(
                    f"engine.step(): global step {self.global_steps + 1}: the fp16 gradients overflowed at the "
                    f"minimum loss scale {self.get_loss_scale():g} (fp16.min_loss_scale) after "
                    f"{self.skipped_steps} skipped steps and the scale cannot back off further, so the run stops "
                    f"(DeepSpeed raises here too); lower the learning rate, use bf16, or lower fp16.min_loss_scale")
            self._grad_norm = norm
            self._step_applied = bool(ok)
            if ok:
                if self.lr_scheduler is not None:
                    step_scheduler(self.lr_scheduler, lr_kwargs)
            else:
                self.skipped_steps += 1
            self.optimizer.zero_grad()
            self.global_steps += 1
            self.global_samples += self.train_batch_size()
            self._timings["step"] += time.perf_counter() - start
            self._report()
        self.micro_steps += 1

    def _loss_scale_at_floor(self) -> bool:
        """Whether an overflow now would have to back off below ``min_loss_scale``: the dynamic scale sits at
        it and the hysteresis is used up (DeepSpeed's ``DynamicLossScaler`` raises then, by its default
        ``raise_error_at_min_scale``)."""
        scaler = getattr(self.optimizer, "grad_scaler", None)
        return (isinstance(scaler, DynamicGradScaler) and scaler.scale <= scaler.min_scale
                and scaler.hysteresis_tracker <= 1)

    def _report(self) -> None:
        loss = sum(self._losses) / max(len(self._losses), 1)
        self._losses.clear()
        self.monitor.write(
            self.global_samples, {"train_loss": loss, "lr": self.get_lr()[0], "loss_scale": self.get_loss_scale()}
        )
        if self.global_steps % self.config.steps_per_print == 0 and self.parallel_state.rank == 0:
            print(
                f"[engine] step={self.global_steps}, skipped={self.skipped_steps}, lr={self.get_lr()}, "
                f"loss={loss:.6g}, loss_scale={self.get_loss_scale()}",
                flush=True,
            )
            if self.config.wall_clock_breakdown:
                ms = {k: f"{1000 * v / self.config.steps_per_print:.2f}" for k, v in self._timings.items()}
                print(
                    f"[engine] ms per step: forward {ms['forward']} | backward {ms['backward']} | "
                    f"optimizer {ms['step']}",
                    flush=True,
                )
        if self.global_steps % self.config.steps_per_print == 0:
            self._timings = dict.fromkeys(self._timings, 0.0)

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(
        self,
        save_dir: str,
        tag: Any = None,
        client_state: dict | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
    ) -> bool:
        """Write ``save_dir/tag/`` (default tag ``global_step{N}``), the ``latest`` file and DeepSpeed's
        consolidation script ``save_dir/zero_to_fp32.py`` (``python SAVE_DIR/zero_to_fp32.py SAVE_DIR OUTPUT_DIR``
        from any directory); returns True, as DeepSpeed.

        DeepSpeed's parameters: a tag that is not a string is used as ``str(tag)`` (DeepSpeedExamples pass
        ``loss.item()``); ``exclude_frozen_parameters=True`` leaves the ``requires_grad=False`` parameters out
        of the model files (Hugging Face Trainer's for a PEFT model; load such a checkpoint with
        ``load_module_strict=False``, which keeps the model's own frozen values). Every rank must call it.
        Layout: see :mod:`megatron_core.engine.checkpoint`.
        """
        return ckpt.save(self, save_dir, None if tag is None else str(tag), client_state or {}, save_latest,
                         exclude_frozen_parameters)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """DeepSpeed's (:func:`megatron_core.engine.checkpoint.save_16bit_model`): rank 0 writes the full
        training-dtype state dict to ``save_dir/save_filename``; every rank calls it. Returns True."""
        return ckpt.save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters)

    save_fp16_model = save_16bit_model  # DeepSpeed's older name, which it keeps

    def load_checkpoint(
        self,
        load_dir: str,
        tag: Any = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        custom_load_fn: Any = None,
    ) -> tuple[str | None, dict | None]:
        """Restore a checkpoint (``tag`` None reads ``latest``); returns ``(path, client_state)``, DeepSpeed's:
        ``path`` is the model-states file loaded, ``load_dir/tag/mp_rank_XX_model_states.pt``.

        DeepSpeed's parameters, in its order: ``load_module_strict`` False loads the module weights with
        ``load_state_dict(strict=False)`` (keys missing on either side are skipped); ``load_module_only`` loads
        the weights alone, leaving the optimizer, the scheduler and the step counters (``global_steps``,
        ``global_samples``, ``skipped_steps``) as they are; ``custom_load_fn`` is not implemented (ConfigError).
        ``micro_steps`` is never loaded (DeepSpeed's neither): it counts this engine's ``step()`` calls, so the
        accumulation boundary stays in place when ``gradient_accumulation_steps`` differs from the saving run's.

        The data-parallel size, ZeRO stage and AutoTP size may differ from the saving run's (another AutoTP
        size reshards the weights and optimizer state on load: :mod:`megatron_core.engine.reshard`). Raises
        ConfigError for a missing file or a checkpoint of another model.
        ``(None, None)`` when ``load_dir`` has no ``latest`` file, with a warning line on rank 0, as DeepSpeed.
        """
        with named_for("load_checkpoint"):  # one name for the errors of every reader below
            if custom_load_fn is not None:
                raise ConfigError("custom_load_fn is not implemented; load without it (weights, optimizer "
                                  "fragments and scheduler are restored as saved)")
            return ckpt.load(
                self,
                load_dir,
                None if tag is None else str(tag),
                load_optimizer_states and not load_module_only,
                load_lr_scheduler_states and not load_module_only,
                strict=load_module_strict,
                load_counters=not load_module_only,
            )

    def barrier(self) -> None:
        """Wait for every rank."""
        if dist.is_initialized():
            dist.barrier()
