"""The rest of the engine's DeepSpeed surface: schedules, client optimizer/scheduler, data loader, counters,
the argparse helper, the CSV monitor and ``initialize``'s one-line errors.

Scheduler values are DeepSpeed's formulas worked out by hand here (``deepspeed/runtime/lr_schedules.py``).
"""

import argparse
import contextlib
import io
import math
import os

import pytest
import torch
from engine_common import ds_config, make_model
from harness import run_distributed

import megatron_core
from megatron_core.errors import ConfigError


def _lrs(scheduler, steps):
    def run():
        config = ds_config(1, 1, 0, scheduler=scheduler)
        engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
        lrs = [engine.get_lr()[0]]
        for _ in range(steps):
            engine.backward(engine(torch.ones(2, 8)).sum())
            engine.step()
            lrs.append(engine.get_lr()[0])
        engine.parallel_state.destroy()
        return lrs

    return run_distributed(run, 1, timeout=120)[0]


def test_warmup_schedules_follow_deepspeed_formulas():
    log4 = math.log(4)
    lrs = _lrs(
        {"type": "WarmupLR", "params": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 4}}, 5
    )
    expected = [0.001, 0.001] + [0.001 + 0.009 * math.log(t + 1) / log4 for t in (1, 2)] + [0.01, 0.01]
    assert lrs == pytest.approx(expected, rel=1e-12)
    lrs = _lrs(
        {
            "type": "WarmupDecayLR",
            "params": {"warmup_max_lr": 0.01, "warmup_num_steps": 2, "total_num_steps": 6, "warmup_type": "linear"},
        },
        7,
    )
    assert lrs == pytest.approx([0.0, 0.0, 0.005, 0.01, 0.0075, 0.005, 0.0025, 0.0], rel=1e-12, abs=1e-15)
    lrs = _lrs(
        {
            "type": "WarmupCosineLR",
            "params": {"warmup_num_steps": 2, "total_num_steps": 6, "cos_min_ratio": 0.1, "warmup_type": "linear"},
        },
        6,
    )
    base = 0.01  # the optimizer section's lr
    # Steps past the warmup k = 1..4 of total - warmup = 4: down to cos_min_ratio * lr at the last one.
    cosine = [base * (0.1 + 0.9 * (1 + math.cos(math.pi * k / 4)) / 2) for k in (1, 2, 3, 4)]
    assert lrs == pytest.approx([0.0, 0.0, 0.005, *cosine], rel=1e-12)



def test_warmup_cosine_stays_at_its_floor_past_total_num_steps():
    """DeepSpeed 0.19 clamps the cosine progress at 1: past ``total_num_steps`` the rate stays at
    ``cos_min_ratio * lr`` instead of climbing the cosine back up; ``total_num_steps`` below the
    warmup (no decay window) holds the floor from the warmup's end."""
    params = {"warmup_num_steps": 2, "total_num_steps": 4, "cos_min_ratio": 0.1, "warmup_type": "linear"}
    lrs = _lrs({"type": "WarmupCosineLR", "params": params}, 7)
    base = 0.01
    cosine = [base * (0.1 + 0.9 * (1 + math.cos(math.pi * k / 2)) / 2) for k in (1, 2)]
    assert lrs == pytest.approx([0.0, 0.0, 0.005, *cosine, base * 0.1, base * 0.1, base * 0.1], rel=1e-12)
    lrs = _lrs({"type": "WarmupCosineLR", "params": {**params, "warmup_num_steps": 3, "total_num_steps": 2}}, 5)
    assert lrs[4:] == pytest.approx([base * 0.1, base * 0.1], rel=1e-12)

def _client_objects():
    model = make_model("mlp")
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    seen = []

    def make_scheduler(optimizer):
        seen.append(optimizer)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))

    config = ds_config(2, 1, 1)
    del config["optimizer"]
    data = [(torch.full((8,), float(i)), torch.zeros(4)) for i in range(16)]
    engine, optimizer, loader, scheduler = megatron_core.initialize(
        model,
        optimizer=torch_opt,
        model_parameters=model.parameters(),
        lr_scheduler=make_scheduler,
        training_data=data,
        config=config,
    )
    batches = [b[0][:, 0].tolist() for b in loader]
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    info = (
        optimizer.config.optimizer,
        optimizer.config.lr,
        optimizer.config.sgd_momentum,
        seen[0] is optimizer.inner,
        engine.get_lr()[0],
        engine.global_steps,
        engine.global_samples,
        type(scheduler).__name__,
    )
    engine.parallel_state.destroy()
    return batches, info


def test_client_optimizer_scheduler_and_dataloader():
    results = run_distributed(_client_objects, 2, timeout=120)
    seen = sorted(x for batches, _ in results for batch in batches for x in batch)
    assert seen == [float(i) for i in range(16)], "the two DP ranks must split the dataset"
    for batches, info in results:
        assert all(len(b) == 2 for b in batches) and len(batches) == 4
        assert info == ("sgd", 0.05, 0.5, True, pytest.approx(0.05 / 5), 4, 16, "LambdaLR")


def _init_error(kind):
    model = make_model("mlp")
    config = ds_config(1, 1, 0)
    if kind == "coupled-adam":
        del config["optimizer"]
        megatron_core.initialize(model, optimizer=torch.optim.Adam(model.parameters(), weight_decay=0.1), config=config)
    elif kind == "both-optimizers":
        megatron_core.initialize(model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
    elif kind == "partial-parameters":
        megatron_core.initialize(model, model_parameters=list(model.parameters())[:2], config=config)
    elif kind == "partial-client-optimizer":
        del config["optimizer"]
        megatron_core.initialize(model, optimizer=torch.optim.AdamW(list(model.parameters())[:2]), config=config)
    elif kind == "client-groups-differ":
        del config["optimizer"]
        params = list(model.parameters())
        groups = [{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.2}]
        megatron_core.initialize(model, optimizer=torch.optim.AdamW(groups), config=config)
    elif kind == "no-config":
        megatron_core.initialize(model)
    elif kind == "mpu":
        megatron_core.initialize(model, config=config, mpu=object())
    elif kind == "not-a-module":  # was AttributeError: 'function' object has no attribute 'to'
        megatron_core.initialize(lambda x: x, config=config)
    elif kind == "no-model":
        megatron_core.initialize(None, config=config)
    elif kind == "tensor-parallel-not-an-object":  # was AttributeError: 'int' object has no attribute 'get'
        megatron_core.initialize(model, config={**config, "tensor_parallel": 2})


@pytest.mark.parametrize(
    "kind,message",
    [
        (
            "coupled-adam",
            "Adam is not implemented; use torch.optim.AdamW or SGD (Adam with weight_decay > 0 is L2-coupled",
        ),
        ("both-optimizers", "a client optimizer and an 'optimizer' section in the config; give one"),
        ("partial-parameters", "covers 2 of the model's 6 trainable parameters"),
        ("partial-client-optimizer", "initialize(optimizer=...) covers 2 of the model's 6 trainable parameters"),
        ("client-groups-differ", "initialize(optimizer=...): param groups differ in 'lr'; the engine uses one set"),
        ("no-config", "no DeepSpeed config; pass config=PATH_OR_DICT"),
        ("mpu", "mpu= (model-parallel groups made outside) is not implemented; drop it and use the config's "
                "tensor_parallel.autotp_size"),
        ("not-a-module", "initialize: model= must be a torch.nn.Module, got function"),
        ("no-model", "initialize: model= must be a torch.nn.Module, got NoneType"),
        ("tensor-parallel-not-an-object", "DeepSpeed config: tensor_parallel must be a JSON object, got 2"),
    ],
)
def test_initialize_errors(kind, message):
    with pytest.raises(Exception) as info:
        run_distributed(_init_error, 1, kind, timeout=120)
    assert message in str(info.value) and "ConfigError" in str(info.value)


def test_add_config_arguments_and_config_from_args(tmp_path):
    """DeepSpeed's flags, its own and no others: a script adding --local_rank after add_config_arguments (which
    DeepSpeed allows: it adds no --local_rank) ended in argparse's 'conflicting option string: --local_rank'.
    The deprecated --deepscale_config is read as --deepspeed_config, as DeepSpeed's initialize does."""
    parser = megatron_core.add_config_arguments(argparse.ArgumentParser())
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(tmp_path / "ds.json")])
    assert args.deepspeed and args.deepspeed_config.endswith("ds.json") and args.local_rank == -1
    from megatron_core.engine.initialize import _config_source

    assert _config_source(None, args) == args.deepspeed_config
    with pytest.raises(ConfigError, match="either as config= or as args.deepspeed_config"):
        _config_source({"train_batch_size": 1}, args)
    old = megatron_core.add_config_arguments(argparse.ArgumentParser()).parse_args(["--deepscale_config", "a.json"])
    assert _config_source(None, old) == "a.json" and not old.deepscale
    both = argparse.Namespace(deepspeed_config="a.json", deepscale_config="b.json")
    with pytest.raises(ConfigError, match="both --deepspeed_config and its deprecated name --deepscale_config"):
        _config_source(None, both)


def _monitored(directory):
    config = ds_config(
        1,
        2,
        0,
        csv_monitor={"enabled": True, "output_path": directory, "job_name": "run"},
        steps_per_print=1,
        wall_clock_breakdown=True,
    )
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    for _ in range(4):
        engine.backward(engine(torch.ones(2, 8)).pow(2).mean())
        engine.step()
    engine.parallel_state.destroy()


def test_csv_monitor_writes_deepspeed_tags(tmp_path):
    run_distributed(_monitored, 1, str(tmp_path), timeout=120)
    lines = (tmp_path / "run" / "Train_Samples_train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,train_loss" and [line.split(",")[0] for line in lines[1:]] == [
        "4",
        "8",
    ]  # global_samples: 2 x 2 per step
    assert os.path.exists(tmp_path / "run" / "Train_Samples_lr.csv")


def _printed_lines(steps_per_print):
    config = ds_config(2, 1, 0, steps_per_print=steps_per_print)
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for _ in range(4):
            engine.backward(engine(torch.ones(2, 8)).pow(2).mean())
            engine.step()
    engine.parallel_state.destroy()
    return [line.split(",")[0] for line in out.getvalue().splitlines() if line.startswith("[engine] step=")]


def test_steps_per_print_prints_on_rank_0_only():
    """DeepSpeed's ``steps_per_print``: the progress line every that many optimizer steps, printed by rank 0
    alone (at DP 2 the other rank's copy of the same line would double the log)."""
    rank0, rank1 = run_distributed(_printed_lines, 2, 2, timeout=120)
    assert rank0 == ["[engine] step=2", "[engine] step=4"], rank0
    assert rank1 == [], rank1


def _accessors():
    config = ds_config(1, 3, 2, bf16={"enabled": True})
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
    # Called as a DeepSpeed script (and Hugging Face's integration) calls them: methods of the engine.
    values = (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
              engine.zero_optimization_stage(), engine.fp16_enabled(), engine.bfloat16_enabled(),
              engine.gradient_clipping())
    engine.parallel_state.destroy()
    return values, config["train_micro_batch_size_per_gpu"], config["gradient_clipping"]


def test_config_accessors_are_methods_as_deepspeed():
    values, micro, clip = run_distributed(_accessors, 1, timeout=60)[0]
    assert values == (3 * micro, micro, 3, 2, False, True, clip)


def _process_attributes():
    from engine_common import global_batch, loss_of, micro_batch

    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 2, 1))
    ranks = (engine.local_rank, engine.global_rank, engine.world_size, engine.dp_world_size, engine.mp_world_size,
             engine.device)
    applied = []
    batch = global_batch("mlp", 0, 2 * 2 * 2)
    for k in range(2):
        engine.backward(loss_of("mlp", engine, micro_batch(batch, k * 2 + engine.parallel_state.dp_rank)))
        engine.step()
        applied.append(engine.was_step_applied())
    engine.parallel_state.destroy()
    return ranks, applied


def test_process_attributes_and_was_step_applied_as_deepspeed():
    """DeepSpeed scripts move batches with ``engine.device`` / ``engine.local_rank`` and read
    ``global_rank``, ``world_size``, ``dp_world_size``, ``mp_world_size``; Accelerate asks
    ``engine.was_step_applied()`` whether the optimizer stepped: each was an AttributeError."""
    from megatron_core.device import current_device

    results = run_distributed(_process_attributes, 2, timeout=60)
    for rank, ((local, global_rank, world, dp, mp, device), applied) in enumerate(results):
        assert (global_rank, world, dp, mp) == (rank, 2, 2, 1) and device == current_device(), results
        assert isinstance(local, int)
        assert applied == [False, True], applied  # no step between accumulation boundaries


def _offload_error(config):
    try:
        megatron_core.initialize(make_model("mlp"), config=config)
    except ConfigError as exc:
        return str(exc)
    return None


def test_offload_errors_name_the_json_keys(tmp_path):
    """A DeepSpeed user wrote JSON keys, not pretrain_gpt.py flags: a missing nvme_path was
    '--nvme-offload-path DIR is not a directory', offload_param at stage 2 '--offload-param (offload_param)
    needs --zero-stage 3'."""
    missing = tmp_path / "no_such_nvme"
    nvme = ds_config(1, 1, 2, zero_optimization={"stage": 2, "offload_optimizer": {"device": "nvme",
                                                                                   "nvme_path": str(missing)}})
    param = ds_config(1, 1, 2, zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}})
    nvme_message, param_message = (run_distributed(_offload_error, 1, c, timeout=60)[0] for c in (nvme, param))
    assert nvme_message == (f"DeepSpeed config: zero_optimization.offload_optimizer.nvme_path {missing} is not a "
                            f"directory; create it (mkdir -p) or pass another"), nvme_message
    assert param_message == ("DeepSpeed config: zero_optimization.offload_param.device = 'cpu' offloads ZeRO-3's "
                             "parameter shards: set zero_optimization.stage to 3, or offload_param.device to "
                             "'none'"), param_message


def _backward_and_step_keywords():
    from engine_common import global_batch, loss_of, micro_batch

    norms, lrs = [], []
    for scale in (True, False):
        config = ds_config(1, 2, 0, scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                                               "warmup_max_lr": 0.01,
                                                                               "warmup_num_steps": 10,
                                                                               "warmup_type": "linear"}})
        engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=config)
        batch = global_batch("mlp", 0, 4)
        for k in range(2):
            engine.backward(loss_of("mlp", engine, micro_batch(batch, k)), scale_wrt_gas=scale)
            engine.step(lr_kwargs={"last_batch_iteration": 5} if not scale else None)
        norms.append(engine.get_global_grad_norm())
        lrs.append(engine.get_lr()[0])
        engine.parallel_state.destroy()
    return norms, lrs


def test_backward_and_step_take_deepspeeds_keywords():
    """engine.backward(loss, scale_wrt_gas=False) (the loss not divided by gradient_accumulation_steps) and
    engine.step(lr_kwargs=...) (handed to the scheduler's step) were TypeErrors."""
    from equivalence import assert_rel_close

    (scaled, unscaled), (lr_next, lr_jump) = run_distributed(_backward_and_step_keywords, 1, timeout=60)[0]
    assert_rel_close(torch.tensor(unscaled), torch.tensor(2 * scaled), 1e-5, "gradient norm without GA scaling")
    # Linear warm-up, DeepSpeed's counting: the first step is iteration 0 (lr 0); the jump lands on iteration 5.
    assert lr_next == 0.0 and math.isclose(lr_jump, 0.01 * 5 / 10), (lr_next, lr_jump)


def _named_parameters():
    model = make_model("mlp")
    named = [(n, p) for n, p in model.named_parameters()]
    groups = [{"params": [(n, p) for n, p in named if p.dim() > 1], "weight_decay": 0.1},
              {"params": [(n, p) for n, p in named if p.dim() == 1], "weight_decay": 0.0}]
    for given in (model.named_parameters(), groups):
        engine, _, _, _ = megatron_core.initialize(model, model_parameters=given, config=ds_config(1, 1, 0))
        engine.parallel_state.destroy()


def test_model_parameters_may_be_named():
    """``model_parameters=model.named_parameters()`` ((name, tensor) pairs, which torch optimizers and DeepSpeed
    take, also inside param groups) was refused as covering 0 of the model's parameters."""
    run_distributed(_named_parameters, 1, timeout=60)



def _with_frozen_layer(how, stage):
    from engine_common import run_steps, state_of

    model = make_model("mlp")
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = ds_config(2, 1, stage)
    if how == "client-optimizer":
        del config["optimizer"]
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        engine, _, _, _ = megatron_core.initialize(model, optimizer=optimizer, config=config)
    else:
        given = {"all": model.parameters(), "trainable": trainable}[how]
        engine, _, _, _ = megatron_core.initialize(model, model_parameters=given, config=config)
    losses, _ = run_steps("mlp", engine, 0, 2)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return losses, state, frozen


@pytest.mark.parametrize("stage", [0, 2])
def test_model_parameters_may_hold_frozen_ones(stage):
    """``model_parameters=model.parameters()`` (and a client optimizer over them) on a model with a frozen layer,
    which DeepSpeed 0.19.8 trains as the trainable parameters alone (torch.optim skips a parameter without a
    gradient; ZeRO leaves requires_grad=False ones out), was refused: 'covers 4 of the model's 4 trainable
    parameters (and 2 others) ... freeze the rest with requires_grad_(False)', though the rest was frozen."""
    results = {how: run_distributed(_with_frozen_layer, 2, how, stage, timeout=120)
               for how in ("trainable", "all", "client-optimizer")}
    for rank, (losses, state, frozen) in enumerate(results["trainable"]):
        assert torch.equal(state["0.weight"], frozen)
        for how in ("all", "client-optimizer"):
            other_losses, other_state, _ = results[how][rank]
            assert other_losses == losses, (how, rank)
            assert all(torch.equal(other_state[k], v) for k, v in state.items()), (how, rank)


def _loader_sizes(drop_last):
    data = [(torch.full((8,), float(i)), torch.zeros(4)) for i in range(9)]
    extra = {} if drop_last is None else {"dataloader_drop_last": drop_last}
    engine, _, loader, _ = megatron_core.initialize(make_model("mlp"), training_data=data,
                                                    config=ds_config(2, 1, 0, **extra))
    sizes = [len(x) for x, _ in loader]
    engine.parallel_state.destroy()
    return len(loader), sizes


def test_dataloader_drop_last():
    """DeepSpeed's top-level dataloader_drop_last (default false) was an unknown key. 9 samples over 2 ranks are
    5 per rank (the sampler pads), micro batches of 2: the last, short one is dropped only when asked."""
    for drop_last, expected in ((None, (3, [2, 2, 1])), (False, (3, [2, 2, 1])), (True, (2, [2, 2]))):
        assert run_distributed(_loader_sizes, 2, drop_last, timeout=60) == [expected] * 2, drop_last


def _batch_size_changes():
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, 0))
    engine.set_train_batch_size(8)  # micro batch 2 x 2 ranks: 2 accumulation steps
    counters = []
    for _ in range(2):
        engine.backward(engine(torch.ones(2, 8)).pow(2).mean())
        engine.step()
        counters.append((engine.global_steps, engine.global_samples))
    sizes = (engine.train_batch_size(), engine.gradient_accumulation_steps())
    try:
        engine.set_train_batch_size(6)
    except ConfigError as exc:
        error = str(exc)
    engine.set_train_micro_batch_size(3)
    micro = (engine.train_micro_batch_size_per_gpu(), engine.train_batch_size(), engine.gradient_accumulation_steps())
    engine.parallel_state.destroy()
    return counters, sizes, error, micro


def test_set_train_batch_size_changes_the_accumulation_steps():
    """DeepSpeed's set_train_batch_size (batch-size warm-up: the micro batch stays, the accumulation steps
    follow) and set_train_micro_batch_size were AttributeErrors."""
    for counters, sizes, error, micro in run_distributed(_batch_size_changes, 2, timeout=60):
        assert counters == [(0, 0), (1, 8)] and sizes == (8, 2) and micro == (3, 12, 2)
        assert error == ("engine.set_train_batch_size(6): the train batch size must be a multiple of 4 "
                         "(train_micro_batch_size_per_gpu 2 x 2 data-parallel ranks)"), error


def _io_batches():
    data = [torch.full((2,), float(i)) for i in range(8)]

    def collate(items):  # initialize's collate_fn, which deepspeed_io uses when given none (DeepSpeed's)
        return torch.stack(items)[:, 0]

    engine, _, loader, _ = megatron_core.initialize(make_model("mlp"), training_data=data, collate_fn=collate,
                                                    config=ds_config(2, 1, 0))
    train = engine.deepspeed_io(data)
    evaluation = engine.deepspeed_io(data, batch_size=4, route="eval")
    batches = ([b.tolist() for b in loader], [b.tolist() for b in train], [b.tolist() for b in evaluation])
    engine.parallel_state.destroy()
    return batches


def test_deepspeed_io_builds_the_engines_loader():
    """``engine.deepspeed_io(dataset)`` (DeepSpeed's loader for another dataset: an eval set, a new epoch's
    data) was "AttributeError: 'Engine' object has no attribute 'deepspeed_io'". The train route is
    initialize's loader (DistributedSampler over DP, the micro batch, initialize's collate_fn); "eval" reads
    in order, rank r taking items r, r + 2, ..., in batches of ``batch_size``, as DeepSpeed 0.19.8."""
    results = run_distributed(_io_batches, 2, timeout=60)
    trained = [[x for b in train for x in b] for _, train, _ in results]
    assert sorted(trained[0] + trained[1]) == [float(i) for i in range(8)] and trained[0] != [0.0, 2.0, 4.0, 6.0]
    for rank, (loader, train, evaluation) in enumerate(results):
        assert train == loader and all(len(b) == 2 for b in train), (rank, train)
        assert evaluation == [[float(i) for i in range(rank, 8, 2)]], (rank, evaluation)


def _epoch_orders():
    data = [torch.full((2,), float(i)) for i in range(8)]
    engine, _, loader, _ = megatron_core.initialize(make_model("mlp"), training_data=data, config=ds_config(2, 1, 0))
    orders = []
    for epoch in range(2):
        loader.data_sampler.set_epoch(epoch)
        orders.append([b[:, 0].tolist() for b in loader])
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=engine.parallel_state.dp_rank)
    sampler.set_epoch(1)
    engine.parallel_state.destroy()
    return orders, [data[i][0].item() for i in sampler]


def test_loader_data_sampler_reshuffles_each_epoch():
    """A DeepSpeed script's ``loader.data_sampler.set_epoch(epoch)`` (DeepSpeedDataLoader's name for its sampler)
    was "AttributeError: 'DataLoader' object has no attribute 'data_sampler'". It is the loader's
    DistributedSampler (seed 0, as DeepSpeed's): epoch 1 reads that sampler's epoch-1 order."""
    for orders, epoch_one in run_distributed(_epoch_orders, 2, timeout=60):
        assert orders[0] != orders[1] and [x for b in orders[1] for x in b] == epoch_one, orders
