"""bf16 / fp16 training against fp32, and the fp16 overflow protocol (skip everywhere, back off).

Low-precision runs cannot match fp32 to 1e-5. Stated tolerances, against the fp32 one-process run
(measured values in brackets): per-microbatch losses within 1e-2 relative for bf16 [3.7e-3] and
2e-3 for fp16 [6e-4]; the unscaled grad norms within twice that [6.4e-3, 6e-4]; after 5 steps each
parameter's distance from the fp32 result at most 25% (bf16) [13%] / 6% (fp16) [1.6%] of the
distance fp32 training moved it, in Frobenius norm. Relative to the update rather than the weight,
so a wrong or missing update cannot hide in the tolerance (bf16 keeps 8 mantissa bits, and Adam
turns noise on small gradients into full-size steps, hence the larger bf16 bounds).
"""
import pytest
import torch
from ddp_common import build, result_of, serial_reference, train_step
from harness import run_distributed
from toy_model import ToyConfig

STEPS, MICROBATCHES = 5, 2
CONFIG = ToyConfig(num_layers=2)
CASES = {
    # name: (DDP options, dtype, optimizer options, loss tolerance, parameter error / fp32 update)
    "bf16-zero0-fp32-grads": ({"zero_stage": 0, "grad_reduce_in_fp32": True}, torch.bfloat16, {}, 1e-2, 0.25),
    "bf16-zero2-bf16-grads": ({"zero_stage": 2, "bucket_size": 1500, "overlap_grad_reduce": True},
                              torch.bfloat16, {}, 1e-2, 0.25),
    "bf16-zero3-fp32-grads": ({"zero_stage": 3, "bucket_size": 700, "overlap_grad_reduce": True,
                               "grad_reduce_in_fp32": True}, torch.bfloat16, {}, 1e-2, 0.25),
    "fp16-zero1-dynamic-scale": ({"zero_stage": 1, "grad_reduce_in_fp32": True}, torch.float16,
                                 {"initial_loss_scale": 2.0 ** 12}, 2e-3, 0.06),
    "fp16-zero0-static-scale": ({"zero_stage": 0}, torch.float16, {"loss_scale": 1024.0}, 2e-3, 0.06),
}


def _low_precision_runs(names):
    out = {}
    for name in names:
        ddp, dtype, opt, _, _ = CASES[name]
        ps, chunks, wrapped, optimizer = build({}, CONFIG, ddp, opt, dtype)
        losses, skipped, norms = [], [], []
        for step in range(STEPS):
            step_losses, (ok, norm, _) = train_step(ps, CONFIG, wrapped, optimizer, step, MICROBATCHES)
            losses.append(step_losses)
            skipped.append(not ok)
            norms.append(norm)
        for w in wrapped:
            w.gather_all_params()  # ZeRO-3: the full parameters (a no-op below stage 3)
        assert all(p.dtype == dtype for c in chunks for p in c.parameters())
        out[name] = (result_of(ps, CONFIG, chunks, losses, norms), skipped)
        ps.destroy()
    return out


def test_low_precision_tracks_fp32():
    (ref,) = run_distributed(serial_reference, 1, CONFIG, STEPS, 2 * MICROBATCHES, timeout=60)
    (init,) = run_distributed(serial_reference, 1, CONFIG, 0, 2 * MICROBATCHES, timeout=60)
    results = run_distributed(_low_precision_runs, 2, list(CASES), timeout=120)
    for name, (_, _, _, loss_tol, param_tol) in CASES.items():
        for rank, by_case in enumerate(results):
            res, skipped = by_case[name]
            assert not any(skipped), f"{name}: no step should overflow at this loss scale"
            mine = torch.tensor([s[rank * MICROBATCHES:(rank + 1) * MICROBATCHES] for s in ref["losses"]])
            loss_err = ((torch.tensor(res["losses"]) - mine).abs() / mine.abs()).max().item()
            assert loss_err <= loss_tol, f"{name} rank {rank}: losses off by {loss_err:.2e} > {loss_tol}"
            # The unscaled gradient norm (Adam alone would hide a missing unscale: it is scale invariant).
            ref_norms = torch.tensor(ref["norms"])
            norm_err = ((torch.tensor(res["norms"]) - ref_norms).abs() / ref_norms).max()
            assert norm_err <= 2 * loss_tol, f"{name} rank {rank}: grad norms off by {norm_err:.2e}"
            for pname, value in res["params"].items():
                fp32, start = ref["params"][pname], init["params"][pname]
                ratio = ((value - fp32).norm() / (fp32 - start).norm()).item()
                assert ratio <= param_tol, (f"{name} rank {rank} {pname}: off fp32 by {ratio:.3f} of the fp32 update "
                                            f"> {param_tol}")


# ---- overflow: one rank's inf skips the step on every rank ------------------------------------
def _inject_inf(layout, ddp, hysteresis, inject_steps):
    ps, chunks, wrapped, optimizer = build(layout, CONFIG, ddp, {"hysteresis": hysteresis,
                                                                 "initial_loss_scale": 2.0 ** 10}, torch.float16)
    victim = ps.world_size - 1
    history = []
    for step in range(4):
        before = [p.detach().clone() for c in chunks for p in c.parameters()]

        def poison(step=step):
            if step in inject_steps and ps.rank == victim:
                for buffer in wrapped[0].buffers_by_dtype:
                    buffer.shard_grad(buffer.buckets[0])[0] = float("inf")  # ZeRO-2: the kept shard

        _, (ok, norm, _) = train_step(ps, CONFIG, wrapped, optimizer, step, MICROBATCHES, before_step=poison)
        after = [p for c in chunks for p in c.parameters()]
        changed = any(not torch.equal(b, p) for b, p in zip(before, after, strict=True))
        history.append((ok, norm, optimizer.get_loss_scale(), changed))
    ps.destroy()
    return history


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_inf_on_one_rank_skips_step_everywhere_and_backs_off(zero_stage):
    layout, ddp = {"tp": 2}, {"zero_stage": zero_stage}
    # hysteresis 1: the first overflow halves the scale. The inf is injected after the DP
    # reduction on the last rank only, so only the all-rank agreement can make the others skip.
    results = run_distributed(_inject_inf, 4, layout, ddp, 1, [1], timeout=60)
    for rank, history in enumerate(results):
        assert [h[0] for h in history] == [True, False, True, True], f"rank {rank}: {history}"
        assert [h[2] for h in history] == [1024.0, 512.0, 512.0, 512.0], f"rank {rank}: {history}"
        assert history[1][1] is None and not history[1][3], f"rank {rank}: a skipped step changed parameters"
        assert all(h[3] for i, h in enumerate(history) if i != 1)
    # Default hysteresis 2: one overflow only skips; the second consecutive one halves the scale.
    results = run_distributed(_inject_inf, 4, layout, ddp, 2, [1, 2], timeout=60)
    for rank, history in enumerate(results):
        assert [h[0] for h in history] == [True, False, False, True], f"rank {rank}: {history}"
        assert [h[2] for h in history] == [1024.0, 1024.0, 512.0, 512.0], f"rank {rank}: {history}"
