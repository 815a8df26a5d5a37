"""fp32 weights loaded into the model between steps take effect with the optimizer offloaded, as without it.

Without offload an fp32 model's shard is the distributed optimizer's main copy (Megatron-LM's
``shard_fp32_groups`` are views of the parameters), so ``model.load_state_dict(...)`` between two steps
is what the next step updates. With ``--optimizer-cpu-offload`` / DeepSpeed's ``offload_optimizer`` the
main copy is a separate host tensor; it used to keep the old values, and the next step wrote them back
over the loaded weights (megatron-core 0.16.1's HybridDeviceOptimizer keeps such a host copy too, and its
``reload_model_params`` refreshes only the copies of 16-bit parameters). At DP2 the toy model trains a step,
loads another seed's weights into the model, and trains two more: under ZeRO-1 (with and without
``--overlap-param-gather``), ZeRO-2 and ZeRO-3 (buckets freed, or kept gathered), with
all or half of the shard on the host, with ``--overlap-cpu-optimizer-d2h-h2d`` and with NVMe offload, the
main shard a checkpoint saves right after the load, the params norm then, the losses, grad norms and final
parameters must be bitwise those of the run without offload. The
DeepSpeed-style engine does the same with ``engine.module.load_state_dict`` at stages 1, 2 and 3.
"""
import dataclasses

import torch
from ddp_common import build, train_built
from engine_common import ds_config, make_model, run_steps, state_of
from harness import run_distributed
from toy_model import ToyConfig

CONFIG = ToyConfig(num_layers=2)
LOADED = dataclasses.replace(CONFIG, init_seed=CONFIG.init_seed + 1)  # the weights loaded after step 0
STEPS, MICROBATCHES = 3, 2
Z3 = {"zero_stage": 3, "overlap_grad_reduce": True, "bucket_size": 700, "stage3_prefetch_bucket_size": 1000,
      "stage3_param_persistence_threshold": 0}
OFFLOADS = {
    "cpu": {"optimizer_cpu_offload": True},
    "cpu-half-overlap": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                         "overlap_cpu_optimizer_d2h_h2d": True},
    "nvme": {"nvme_offload_path": None},
}
STAGES = {
    "zero1": {"zero_stage": 1, "bucket_size": 700},
    "zero1-overlap-param-gather": {"zero_stage": 1, "bucket_size": 700, "overlap_param_gather": True},
    "zero2": {"zero_stage": 2, "bucket_size": 700, "overlap_grad_reduce": True},
    "zero3": Z3,
    "zero3-persistent": {**Z3, "stage3_param_persistence_threshold": 10**6},  # every bucket stays gathered
}


def _train(ddp: dict, opt: dict) -> dict:
    ps, chunks, wrapped, optimizer = built = build({}, CONFIG, ddp, opt)
    after_load = []

    def at_step(step: int) -> None:
        if step == 1:  # a user's load of fp32 weights between steps, without reload_model_params()
            (loaded,) = LOADED.build_chunks(ps)
            chunks[0].load_state_dict(loaded.state_dict())
            # what a checkpoint saved now holds as this rank's main shard, and --log-params-norm
            mains = [b["main_params"] for b in optimizer.sharded_state_dict()["buffers"]]
            after_load.append((mains, optimizer.params_norm()))
    result = train_built(built, CONFIG, STEPS, MICROBATCHES, at_step=at_step)
    result["after_load"] = after_load[0]
    return result


def _train_all(directory: str) -> dict:
    out = {}
    for stage, ddp in STAGES.items():
        out[stage] = _train(ddp, {})
        for name, opt in OFFLOADS.items():
            if "nvme_offload_path" in opt:
                opt = {**opt, "nvme_offload_path": directory}
            out[f"{stage}-{name}"] = _train(ddp, opt)
    return out


def test_model_load_between_steps_takes_effect_with_optimizer_offload(tmp_path):
    results = run_distributed(_train_all, 2, str(tmp_path), timeout=300)
    for rank, r in enumerate(results):
        for stage in STAGES:
            plain = r[stage]
            for name in OFFLOADS:
                offloaded = r[f"{stage}-{name}"]
                what = f"rank {rank} {stage}-{name}"
                assert offloaded["losses"] == plain["losses"], f"{what}: losses after the load differ"
                assert offloaded["norms"] == plain["norms"], f"{what}: grad norms differ"
                (mains, params_norm), (plain_mains, plain_params_norm) = offloaded["after_load"], plain["after_load"]
                assert params_norm == plain_params_norm, f"{what}: params norm after the load differs"
                assert all(torch.equal(a, b) for a, b in zip(mains, plain_mains, strict=True)), \
                    f"{what}: the main shard a checkpoint saves after the load differs"
                for param, value in plain["params"].items():
                    assert torch.equal(offloaded["params"][param], value), f"{what}: {param} differs"


def _engine_run(stage: int, offload: bool) -> dict:
    import megatron_core

    zero = {"stage": stage, "reduce_bucket_size": 700}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    engine, _, _, _ = megatron_core.initialize(make_model("mlp"), config=ds_config(2, 1, stage, zero_optimization=zero))
    engine.train()
    losses, norms = run_steps("mlp", engine, 0, 1)
    torch.manual_seed(7)
    loaded = {k: torch.randn_like(v) * 0.2 for k, v in make_model("mlp").state_dict().items()}
    engine.module.load_state_dict(loaded)
    more_losses, more_norms = run_steps("mlp", engine, 1, STEPS)
    state = state_of(engine)
    engine.parallel_state.destroy()
    return {"losses": losses + more_losses, "norms": norms + more_norms, "state": state}


def _engine_all() -> dict:
    return {(stage, offload): _engine_run(stage, offload) for stage in (1, 2, 3) for offload in (False, True)}


def test_engine_module_load_between_steps_takes_effect_with_offload_optimizer():
    results = run_distributed(_engine_all, 2, timeout=240)
    for rank, r in enumerate(results):
        for stage in (1, 2, 3):
            plain, offloaded = r[(stage, False)], r[(stage, True)]
            what = f"rank {rank} stage {stage}"
            assert offloaded["losses"] == plain["losses"], f"{what}: losses after engine.module.load_state_dict differ"
            assert offloaded["norms"] == plain["norms"], f"{what}: grad norms differ"
            for key, value in plain["state"].items():
                assert torch.equal(offloaded["state"][key], value), f"{what}: {key} differs"
