"""ZeRO-3, --overlap-param-gather and optimizer offload (CPU, NVMe) against one process.

Every layout trains the toy model (or the GPT, with recompute) for 5 AdamW steps (4 for GPT) with
2 microbatches of gradient accumulation and clipping by the global norm; each rank's per-microbatch
losses, the grad norm of every step and the final parameters must equal the serial run's (fp32,
relative 1e-5 element-wise), as in ``test_ddp``. Adam is used where only DP changes the summation
order; where TP or PP change it too, Adam's 1/sqrt(v) + eps turns that rounding noise on near-zero
gradients into full-size steps (measured: 2.1e-5 element-wise after 5 steps at DP2 x TP2 + SP),
so those layouts use SGD with momentum 0.9, as ``test_ddp`` and ``test_ddp_gpt`` do. Small
buckets give several gathers per forward, so prefetching, freeing after forward and re-gathering
for backward are exercised; the offload runs use torch's fused CPU AdamW for the host step against
the serial run's for-loop AdamW.
"""
import dataclasses

import pytest
from ddp_common import compare, serial_reference, train
from harness import run_distributed
from test_ddp_gpt import GPTSpec
from toy_model import ToyConfig

STEPS, MICROBATCHES, GPT_STEPS = 5, 2, 4
Z3 = {"zero_stage": 3, "overlap_grad_reduce": True, "bucket_size": 700, "stage3_prefetch_bucket_size": 1000}
VARIANTS = {
    "zero3": Z3,
    "zero3-no-prefetch-one-bucket-per-param": {**Z3, "bucket_size": 1, "stage3_prefetch_bucket_size": 0},
    "zero3-keep-gathered": {**Z3, "reshard_after_forward": False},
    "zero3-persistent-small-buckets": {**Z3, "stage3_param_persistence_threshold": 800},
    "zero3-param-offload": {**Z3, "offload_param": True},
    "zero1-overlap-param-gather": {"zero_stage": 1, "overlap_param_gather": True, "bucket_size": 700},
    "zero2-overlap-param-gather": {"zero_stage": 2, "overlap_param_gather": True, "overlap_grad_reduce": True,
                                   "bucket_size": 700},
}
SGD = {"optimizer": "sgd", "sgd_momentum": 0.9, "lr": 0.05}
LAYOUTS = {
    # name: (world size, layout, model, variants, optimizer options)
    "dp2": (2, {}, ToyConfig(num_layers=2), list(VARIANTS), {}),
    "dp4": (4, {}, ToyConfig(num_layers=2), ["zero3", "zero1-overlap-param-gather"], {}),
    "dp2-tp2-sequence-parallel": (4, {"tp": 2}, ToyConfig(num_layers=2, sequence_parallel=True), ["zero3"], SGD),
    "dp2-pp2-tied-embedding": (4, {"pp": 2}, ToyConfig(num_layers=2, vocab_size=256), ["zero3", "zero3-keep-gathered"],
                               SGD),
    "dp2-pp2-vpp2": (4, {"pp": 2, "vpp": 2}, ToyConfig(num_layers=4), ["zero3", "zero2-overlap-param-gather"], SGD),
}


def _train_variants(layout, config, variants, opt):
    return {v: train(layout, config, VARIANTS[v], STEPS, MICROBATCHES, opt) for v in variants}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_zero3_and_overlap_param_gather_equal_one_process(name):
    world, layout, config, variants, opt = LAYOUTS[name]
    dp = world // (layout.get("tp", 1) * layout.get("pp", 1))
    (ref,) = run_distributed(serial_reference, 1, config, STEPS, dp * MICROBATCHES, opt, timeout=60)
    results = run_distributed(_train_variants, world, layout, config, variants, opt, timeout=180)
    for variant in variants:
        compare([r[variant] for r in results], ref, MICROBATCHES, what=f"{name} {variant}")


# ---- the real GPT: tied embeddings, full and selective recompute ---------------------------------
GPT_OPT = {"adam_eps": 1e-4}  # the key bias's gradient is rounding noise; DP only
GPT_SGD = {"optimizer": "sgd", "sgd_momentum": 0.9, "lr": 0.05}  # TP / PP reorder sums: see the module docstring


@dataclasses.dataclass
class RecomputeGPTSpec(GPTSpec):
    """``test_ddp_gpt``'s model with activation recompute."""

    recompute: str | None = None

    def config(self):
        config = super().config()
        if self.recompute == "full":
            return dataclasses.replace(config, recompute_granularity="full", recompute_method="uniform",
                                       recompute_num_layers=1)
        if self.recompute == "selective":
            return dataclasses.replace(config, recompute_granularity="selective")
        return config


GPT_LAYOUTS = {
    # name: (world size, layout, model, optimizer options)
    "gpt2-dp2-full-recompute-tied-in-stage": (2, {}, RecomputeGPTSpec("gpt2", recompute="full"), GPT_OPT),
    "gpt2-dp2-pp2-full-recompute": (4, {"pp": 2}, RecomputeGPTSpec("gpt2", recompute="full"), GPT_SGD),
    "llama-dp2-tp2-sp-selective-recompute": (4, {"tp": 2}, RecomputeGPTSpec("llama", sequence_parallel=True,
                                                                           recompute="selective"), GPT_SGD),
}


def _train_gpt(layout, spec, opt):
    return train(layout, spec, {**Z3, "bucket_size": 3000}, GPT_STEPS, MICROBATCHES, opt)


@pytest.mark.parametrize("name", list(GPT_LAYOUTS))
def test_zero3_gpt_with_recompute_equals_one_process(name):
    world, layout, spec, opt = GPT_LAYOUTS[name]
    dp = world // (layout.get("tp", 1) * layout.get("pp", 1))
    (ref,) = run_distributed(serial_reference, 1, spec, GPT_STEPS, dp * MICROBATCHES, opt, timeout=60)
    results = run_distributed(_train_gpt, world, layout, spec, opt, timeout=180)
    compare(results, ref, MICROBATCHES, what=f"{name} zero3")


# ---- optimizer offload: CPU (separate host copies) and NVMe files, against one process ----------
OFFLOAD = {
    # name: (DDP options, optimizer options)
    "zero3-cpu-offload": (Z3, {"optimizer_cpu_offload": True}),
    "zero1-cpu-offload-half": ({"zero_stage": 1, "bucket_size": 700}, {"optimizer_cpu_offload": True,
                                                                        "optimizer_offload_fraction": 0.5}),
    "zero2-nvme": ({"zero_stage": 2, "bucket_size": 700, "overlap_grad_reduce": True},
                   {"nvme_offload_path": None, "nvme_offload_buffer_count": 2}),
    "zero3-param-offload-nvme-one-buffer": ({**Z3, "offload_param": True},
                                            {"nvme_offload_path": None, "nvme_offload_buffer_count": 1}),
}


def _train_offload(directory, names):
    out = {}
    for name in names:
        ddp, opt = OFFLOAD[name]
        if "nvme_offload_path" in opt:
            opt = {**opt, "nvme_offload_path": directory}
        out[name] = train({}, ToyConfig(num_layers=2), ddp, STEPS, MICROBATCHES, opt)
    return out


def test_cpu_and_nvme_optimizer_offload_equal_one_process(tmp_path):
    config = ToyConfig(num_layers=2)
    (ref,) = run_distributed(serial_reference, 1, config, STEPS, 2 * MICROBATCHES, timeout=60)
    results = run_distributed(_train_offload, 2, str(tmp_path), list(OFFLOAD), timeout=180)
    for name in OFFLOAD:
        compare([r[name] for r in results], ref, MICROBATCHES, what=name)
