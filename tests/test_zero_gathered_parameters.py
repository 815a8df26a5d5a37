"""``megatron_core.zero.GatheredParameters`` (DeepSpeed's ``deepspeed.zero.GatheredParameters``) on an
engine at ZeRO-3 with 2 DP ranks and small buckets (several per model): inside the block the named
parameters hold their full values (those of ``state_dict()``, which gathers by its own path) while the
other buckets stay freed; with ``modifier_rank`` that rank's values are kept on every rank, and the
optimizer's fp32 main copy follows them (a step at lr 0 leaves them as written)."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
from engine_common import make_model
from harness import run_distributed

import megatron_core
from megatron_core.zero import GatheredParameters


def _engine(lr: float, bf16: bool):
    model = make_model("mlp")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": lr}}, "bf16": {"enabled": bf16},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": 300, "stage3_prefetch_bucket_size": 0,
                                    "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = megatron_core.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _train(engine, steps: int) -> None:
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(steps):
        out = engine(torch.randn(2, 8, generator=g).to(next(engine.module.parameters()).dtype))
        engine.backward(out.float().pow(2).mean())
        engine.step()


def _freed(p: torch.Tensor) -> bool:
    """No full copy of ``p`` is held (a freed parameter points at a one-element placeholder)."""
    return p.untyped_storage().nbytes() < p.numel() * p.element_size()


def _read():
    engine = _engine(0.1, bf16=False)
    _train(engine, 2)
    named = dict(engine.module.named_parameters())
    first, last = named["0.weight"], named["4.weight"]
    assert _freed(first) and _freed(last), "ZeRO-3 keeps no full parameter outside forward"
    full = {k: v.clone() for k, v in engine.module.state_dict().items()}
    with GatheredParameters([first]):
        inside = first.detach().clone()
        other_freed = _freed(last)
    assert _freed(first), "freed again after the block"
    with GatheredParameters(last, enabled=False):
        disabled_freed = _freed(last)
    return torch.equal(inside, full["0.weight"]), other_freed, disabled_freed


def test_reading_gathers_only_the_named_parameters():
    for equal, other_freed, disabled_freed in run_distributed(_read, 2, timeout=120):
        assert equal and other_freed and disabled_freed


def _read_outside():
    engine = _engine(0.1, bf16=False)
    _train(engine, 1)
    weight = dict(engine.module.named_parameters())["0.weight"]
    shape, values = weight.shape, weight.detach().clone()  # read with no gather: segfaulted before
    try:
        weight.data.mul_(2.0)
        refused = ""
    except RuntimeError as exc:
        refused = str(exc)
    full = engine.module.state_dict()["0.weight"].clone()
    _train(engine, 1)  # training goes on and the parameter is gathered for its forward as before
    return shape, values, refused, full, _freed(weight)


def test_a_freed_parameter_read_outside_a_block_is_nan_not_a_crash():
    """Outside forward and a GatheredParameters block a ZeRO-3 parameter keeps its shape, reads NaN and
    refuses an in-place multiply: it pointed into a storage resized to 0 bytes, and reading it killed the
    process."""
    for shape, values, refused, full, freed in run_distributed(_read_outside, 2, timeout=120):
        assert shape == (32, 8) and values.isnan().all(), values
        assert "more than one element of the written-to tensor" in refused, refused
        assert full.isfinite().all() and freed


def _modify(bf16: bool):
    engine = _engine(0.0, bf16)
    _train(engine, 1)
    weight = dict(engine.module.named_parameters())["2.weight"]
    with GatheredParameters([weight], modifier_rank=1):
        weight.data.fill_(0.25 if dist.get_rank() == 1 else 7.0)  # rank 0's change is dropped
    after_block = engine.module.state_dict()["2.weight"].clone()
    _train(engine, 1)  # lr 0: the step writes the fp32 main copy back into the shards
    return after_block, engine.module.state_dict()["2.weight"].clone()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_modifier_rank_values_reach_every_rank_and_the_optimizer(bf16):
    for after_block, after_step in run_distributed(_modify, 2, bf16, timeout=120):
        assert (after_block == 0.25).all(), after_block
        assert (after_step == 0.25).all(), "the optimizer's main copy did not follow the modification"


def _save_in_block(folder: str):
    from megatron_core.errors import ConfigError

    engine = _engine(0.0, bf16=False)
    _train(engine, 1)
    weight = dict(engine.module.named_parameters())["2.weight"]
    with GatheredParameters([weight]):
        engine.save_checkpoint(folder, tag="read")  # a read-only block: the values are the shards'
    refused = ""
    with GatheredParameters([weight], modifier_rank=0):
        weight.data.fill_(0.25)
        try:  # the model file would hold 0.25 and the optimizer's main copy (what is loaded) the old values
            engine.save_checkpoint(folder, tag="inside")
        except ConfigError as exc:
            refused = str(exc)
    engine.save_checkpoint(folder, tag="after")
    loaded = _engine(0.0, bf16=False)
    loaded.load_checkpoint(folder, tag="after")
    _train(loaded, 1)  # lr 0: the restored main copy is written back into the shards
    return refused, loaded.module.state_dict()["2.weight"].clone()


def test_save_checkpoint_inside_a_modifier_block_is_refused(tmp_path):
    for refused, restored in run_distributed(_save_in_block, 2, str(tmp_path), timeout=120):
        assert refused.startswith("save_checkpoint inside a megatron_core.zero.GatheredParameters"), refused
        assert (restored == 0.25).all(), restored


def _step_in_block(modifier_rank):
    from megatron_core.errors import ConfigError

    engine = _engine(0.1, bf16=False)
    _train(engine, 1)
    weight = dict(engine.module.named_parameters())["2.weight"]
    refused = ""
    with GatheredParameters([weight], modifier_rank=modifier_rank):
        try:
            _train(engine, 1)
        except ConfigError as exc:
            refused = str(exc)
        full = not _freed(weight)  # the block's parameter kept its storage
    engine.step()  # the refused step, after the block
    _train(engine, 1)  # and training goes on
    return refused, full


@pytest.mark.parametrize("modifier_rank", [None, 0], ids=["read", "modify"])
def test_a_step_inside_a_block_is_refused(modifier_rank):
    for refused, full in run_distributed(_step_in_block, 2, modifier_rank, timeout=120):
        assert refused.startswith("engine.step() inside a megatron_core.zero.GatheredParameters block"), refused
        assert full


def _load_in_block(folder, modifier_rank):
    from megatron_core.errors import ConfigError

    engine = _engine(0.1, bf16=False)
    _train(engine, 1)
    engine.save_checkpoint(folder, tag="t")
    saved = engine.module.state_dict()["2.weight"].clone()
    _train(engine, 1)
    weight = dict(engine.module.named_parameters())["2.weight"]
    refused = ""
    with GatheredParameters([weight], modifier_rank=modifier_rank):
        try:
            engine.load_checkpoint(folder, tag="t")
        except ConfigError as exc:
            refused = str(exc)
        full = not _freed(weight)  # the block's parameter kept its storage
        engine.load_checkpoint(folder, tag="t", load_optimizer_states=False)  # the weights alone: no re-shard
        weights_only = torch.equal(weight, saved)
    engine.load_checkpoint(folder, tag="t")  # the refused load, after the block
    _train(engine, 1)  # and training goes on
    return refused, full, weights_only


@pytest.mark.parametrize("modifier_rank", [None, 0], ids=["read", "modify"])
def test_a_checkpoint_load_inside_a_block_is_refused(tmp_path, modifier_rank):
    """Restoring the optimizer freed the block's buckets (as a step does): with a ``modifier_rank`` the broadcast
    on exit read the freed storage and gloo aborted the ranks ('writev: Bad address')."""
    for refused, full, weights_only in run_distributed(_load_in_block, 2, str(tmp_path), modifier_rank, timeout=120):
        assert refused.startswith("load_checkpoint inside a megatron_core.zero.GatheredParameters block"), refused
        assert full and weights_only


class _Head(torch.nn.Module):
    """Reads another module's weight as an attribute (tied, transposed), not as an argument."""

    def __init__(self, tied: torch.nn.Linear) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(8))
        self._tied = [tied]  # a list: not a submodule, so the weight has one owner

    def forward(self, h):
        return torch.nn.functional.linear(h, self._tied[0].weight.t(), self.bias)


class _TiedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.mid = torch.nn.Linear(8, 16), torch.nn.Linear(16, 16)
        self.head = _Head(self.inp)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def _tied_losses(stage: int, register: bool):
    from megatron_core.zero import register_external_parameter

    model = _TiedNet()
    engine = _sgd_engine(model, model.parameters(), stage)
    if register:
        register_external_parameter(engine.module.head, engine.module.inp.weight)
    return _three_steps(engine)


def _sgd_engine(model: torch.nn.Module, parameters, stage: int):
    """``model`` under ZeRO ``stage`` with SGD and 100-element buckets, nothing prefetched or kept resident."""
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 100, "stage3_prefetch_bucket_size": 0,
                                    "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = megatron_core.initialize(model=model, model_parameters=parameters, config=config)
    return engine


def _three_steps(engine) -> list[float]:
    """The losses of three steps on this rank's random [2, 8] inputs (seeded by rank)."""
    g = torch.Generator().manual_seed(dist.get_rank())
    losses = []
    for _ in range(3):
        loss = engine(torch.randn(2, 8, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_register_external_parameter_gathers_a_weight_read_as_an_attribute():
    """ZeRO-3 with the tied weight registered trains as ZeRO-0; without, the head reads a freed weight."""
    reference = run_distributed(_tied_losses, 2, 0, False, timeout=120)
    for ours, ref in zip(run_distributed(_tied_losses, 2, 3, True, timeout=120), reference, strict=True):
        assert ours == pytest.approx(ref, rel=1e-6)
    hint = r"storage of size 0\. Under ZeRO-3 a parameter is gathered only for the modules that own it .* needs "
    with pytest.raises(Exception, match=hint + r"megatron_core\.zero\.register_external_parameter"):
        run_distributed(_tied_losses, 2, 3, False, timeout=120)


class _ArgHead(torch.nn.Module):
    def forward(self, h, weight):
        return torch.nn.functional.linear(h, weight)


class _FrozenArgNet(torch.nn.Module):
    """Hands a frozen Parameter (in no ZeRO bucket) to a submodule as an argument, as GPT's output layer gets
    the word embedding: only the managed Parameters among a module's arguments are gathered for it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(8, 16)
        self.frozen = torch.nn.Parameter(torch.randn(8, 16), requires_grad=False)
        self.head = _ArgHead()

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x)), self.frozen)


def _frozen_arg_losses(stage: int):
    model = _FrozenArgNet()
    return _three_steps(_sgd_engine(model, [p for p in model.parameters() if p.requires_grad], stage))


def test_a_frozen_parameter_passed_as_an_argument_trains_as_zero0():
    reference = run_distributed(_frozen_arg_losses, 2, 0, timeout=120)
    for ours, ref in zip(run_distributed(_frozen_arg_losses, 2, 3, timeout=120), reference, strict=True):
        assert ours == pytest.approx(ref, rel=1e-6)


def _gathered_at_first_layer(prefetch: int):
    """Which buckets (forward order) are gathered or in flight once the first Linear's pre-hook has run."""
    model = make_model("mlp")
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "zero_optimization": {"stage": 3, "reduce_bucket_size": 300, "stage3_prefetch_bucket_size": prefetch,
                                    "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = megatron_core.initialize(model=model, model_parameters=model.parameters(), config=config)
    _train(engine, 1)  # the step frees every bucket
    manager = engine.ddp.param_gather
    seen = []
    engine.module[0].register_forward_pre_hook(  # after the manager's hook, which was registered at wrapping
        lambda module, args: seen.append([bucket.gathered for _, bucket in manager.forward_order]))
    engine(torch.ones(2, 8))
    return seen[0]


def test_a_prefetch_budget_of_one_element_prefetches_the_next_bucket():
    """``stage3_prefetch_bucket_size`` counts elements: buckets are prefetched while fewer than that many are
    on the way, so a budget of 1 launches the next bucket's gather and 0 none."""
    (none,) = {tuple(r) for r in run_distributed(_gathered_at_first_layer, 2, 0, timeout=120)}
    (one,) = {tuple(r) for r in run_distributed(_gathered_at_first_layer, 2, 1, timeout=120)}
    own = none.index(False)
    assert none[own:] == (False,) * (len(none) - own) and own >= 1, none
    assert one == (True,) * (own + 1) + (False,) * (len(none) - own - 1), (none, one)


def test_none_is_not_a_zero3_parameter():
    """DeepSpeed's GatheredParameters takes None (Hugging Face passes a module's absent bias): nothing to gather."""
    with GatheredParameters(None, modifier_rank=0):
        pass
    with GatheredParameters([None, torch.nn.Parameter(torch.ones(2))]):
        pass


def test_zero_init_names_what_to_do_instead():
    with pytest.raises(AttributeError, match="build the model whole on each rank and pass it to "
                                             "megatron_core.initialize"):
        megatron_core.zero.Init()


def _full_grads(stage: int):
    """Every parameter's safe_get_full_grad after the boundary backward of 2 accumulated micro steps
    (the first layer's bias frozen), and whether main_grad was freed for any of them."""
    model = make_model("mlp")
    model[0].bias.requires_grad_(False)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 300, "stage3_prefetch_bucket_size": 0,
                                    "stage3_param_persistence_threshold": 0}}
    trained = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = megatron_core.initialize(model=model, model_parameters=trained, config=config)
    g = torch.Generator().manual_seed(dist.get_rank())
    engine.backward(engine(torch.randn(2, 8, generator=g)).pow(2).mean())
    engine.step()  # a micro step: no optimizer step yet (DeepSpeed's loop calls step() after every backward)
    engine.backward(engine(torch.randn(2, 8, generator=g)).pow(2).mean())  # the accumulation boundary
    named = dict(engine.module.named_parameters())
    freed = any(getattr(p, "main_grad", 0) is None for p in named.values() if p.requires_grad)
    mains = {name: p.main_grad.clone() for name, p in named.items() if getattr(p, "main_grad", None) is not None}
    grads = {name: megatron_core.zero.safe_get_full_grad(p) for name, p in named.items()}
    engine.step()  # still steps after the reads
    return grads, freed, mains


@pytest.mark.parametrize("stage", [2, 3])
def test_safe_get_full_grad_assembles_the_shards(stage):
    """DeepSpeed's safe_get_full_grad: under ZeRO-2/3 (main_grad freed, each rank holding pieces) it
    returns the same averaged gradient as ZeRO-0's main_grad on every rank; None for a frozen parameter."""
    reference = run_distributed(_full_grads, 2, 0, timeout=120)
    results = run_distributed(_full_grads, 2, stage, timeout=120)
    for (grads, freed, _), (expected, _, mains) in zip(results, reference, strict=True):
        assert freed, "ZeRO-2/3 free main_grad after the boundary backward"
        assert grads["0.bias"] is None and expected["0.bias"] is None
        # At ZeRO-0 it is a copy of main_grad, for every trained parameter.
        assert sorted(mains) == sorted(name for name in expected if name != "0.bias")
        for name, grad in expected.items():
            if name != "0.bias":
                assert torch.equal(grad, mains[name]), name
                assert grads[name].shape == grad.shape
                torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_safe_get_full_grad_of_a_plain_parameter_is_a_copy_of_its_grad():
    """Outside the engine (no gradient buffer, no main_grad) it copies ``.grad``; None before backward."""
    layer = torch.nn.Linear(4, 3)
    assert megatron_core.zero.safe_get_full_grad(layer.weight) is None
    layer(torch.randn(2, 4)).sum().backward()
    full = megatron_core.zero.safe_get_full_grad(layer.weight)
    assert torch.equal(full, layer.weight.grad) and full.data_ptr() != layer.weight.grad.data_ptr()


def _grads_around_a_step(stage):
    """safe_get_full_grad of the first layer's weight before any backward, after the backward, and after the
    step that zeroed the gradients: None, "zeros", "values", or a ConfigError's message."""
    model = make_model("mlp")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 300, "stage3_prefetch_bucket_size": 0,
                                    "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = megatron_core.initialize(model=model, model_parameters=model.parameters(), config=config)

    def read():
        try:
            grad = megatron_core.zero.safe_get_full_grad(engine.module[0].weight)
        except ValueError as exc:  # DeepSpeed's type (ConfigError is one)
            return str(exc)
        return None if grad is None else ("values" if grad.any() else "zeros") + str(tuple(grad.shape))

    before = read()
    g = torch.Generator().manual_seed(dist.get_rank())
    engine.backward(engine(torch.randn(2, 8, generator=g)).pow(2).mean())
    between = read()
    engine.step()
    after = read()
    engine.parallel_state.destroy()
    return before, between, after


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_safe_get_full_grad_outside_backward_and_step_is_deepspeeds(stage):
    """DeepSpeed 0.19's safe_get_full_grad where no backward has run since the last step (or ever): ZeRO-0
    returns param.grad, None (its engine sets grads to None after the step); ZeRO-1/2 raise ValueError
    ("Gradients are only available immediately after backward and before engine step"); ZeRO-3 reads its
    partition buffer, zeros before the first backward. Every stage returned zeros here."""
    shape = "(32, 8)"
    error = (f"safe_get_full_grad: under ZeRO stage {stage} gradients are only available immediately after backward "
             f"and before engine step (as in DeepSpeed); call it between engine.backward(loss) at the gradient "
             f"accumulation boundary and engine.step()")
    expected = {0: None, 1: error, 2: error, 3: f"zeros{shape}"}[stage]
    for before, between, after in run_distributed(_grads_around_a_step, 2, stage, timeout=120):
        assert between == f"values{shape}"
        assert before == expected and after == expected, (before, after)


@dataclasses.dataclass
class _Hidden:
    h: torch.Tensor


class _NestedOut(torch.nn.Module):
    """Owns its weight and returns its output nested (a tuple in a dict) or in a dataclass: the hook that
    regathers the weight before this module's backward has to find the tensor there."""

    def __init__(self, n_in: int, wrap: str) -> None:
        super().__init__()
        self.weight, self.wrap = torch.nn.Parameter(torch.randn(n_in, 16) * 0.3), wrap

    def forward(self, x):
        h = torch.tanh(x @ self.weight)
        return {"out": (h,)} if self.wrap == "nested" else _Hidden(h)


class _NestedNet(torch.nn.Module):
    def __init__(self, wrap: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([_NestedOut(8, wrap), _NestedOut(16, wrap), _NestedOut(16, wrap)])

    def forward(self, x):
        for block in self.blocks:
            out = block(x)
            x = out["out"][0] if isinstance(out, dict) else out.h
        return x


def _nested_losses(stage: int, wrap: str):
    model = _NestedNet(wrap)
    return _three_steps(_sgd_engine(model, model.parameters(), stage))


@pytest.mark.parametrize("wrap", ["nested", "dataclass"])
def test_a_module_returning_its_output_nested_trains_as_zero0(wrap):
    """Was NaN from the second step under ZeRO-3: only tensors at the top of a dict, tuple or list got the
    pre-backward hook, so the weight stayed freed in backward (DeepSpeed recurses into nested containers)."""
    reference = run_distributed(_nested_losses, 2, 0, wrap, timeout=120)
    for ours, ref in zip(run_distributed(_nested_losses, 2, 3, wrap, timeout=120), reference, strict=True):
        assert ours == pytest.approx(ref, rel=1e-6)
