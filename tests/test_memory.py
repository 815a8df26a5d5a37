"""Per-rank bytes of parameters, gradients, main parameters and optimizer state against the ZeRO paper.

Measured by ``memory_footprint`` from the tensors alive after a bf16 Adam step (K = 12: fp32 main
parameters 4 + exp_avg 4 + exp_avg_sq 4 bytes per parameter), Ψ parameters, Nd DP ranks:

=========  ===========  ==========  ==========  ===============
stage      parameters   gradients   fp32 main   Adam state
=========  ===========  ==========  ==========  ===============
plain DP   2Ψ           2Ψ          4Ψ          8Ψ
ZeRO-1     2Ψ           2Ψ          4Ψ/Nd       8Ψ/Nd
ZeRO-2     2Ψ           2Ψ/Nd       4Ψ/Nd       8Ψ/Nd
=========  ===========  ==========  ==========  ===============

"Up to bucket padding": each category may differ from its formula by its bytes per element times
the buffer's padding elements, plus Adam's 4-byte ``step`` scalar per parameter (or shard piece).
ZeRO-2 holds the full gradient buffer only from ``zero_grad()`` until the step (working memory of
backward, like activations); that is checked too.
"""
import pytest
import torch
from ddp_common import build, train_step
from harness import run_distributed
from toy_model import ToyConfig

from megatron_core.optimizer import memory_footprint

# Odd sizes: Ψ = 21607 is not a multiple of Nd, so the buffer is padded.
CONFIG = ToyConfig(num_layers=2, hidden_size=33, ffn_hidden_size=128, vocab_size=127)


def _footprints(stages):
    out = {}
    for stage in stages:
        ps, chunks, wrapped, optimizer = build({}, CONFIG, {"zero_stage": stage, "bucket_size": None}, {},
                                               torch.bfloat16)
        buffer = wrapped[0].buffers_by_dtype[0]
        during = {}
        train_step(ps, CONFIG, wrapped, optimizer, 0, 1,
                   before_step=lambda: during.update(grads=memory_footprint(wrapped, optimizer).grads))
        after = memory_footprint(wrapped, optimizer)
        released = buffer.grad_data.untyped_storage().nbytes() == 0
        optimizer.zero_grad()
        psi = sum(p.numel() for p in chunks[0].parameters())
        after_zero_grad = memory_footprint(wrapped).grads
        out[stage] = {"after": after, "during_grads": during["grads"], "after_zero_grad": after_zero_grad,
                      "psi": psi, "pad": buffer.numel - psi, "pieces": len(optimizer.pairs), "dp": ps.dp_size,
                      "full_grads_released": released}
        ps.destroy()
    return out


def _formulas(stage: int, psi: int, nd: int) -> dict:
    return {0: dict(params=2 * psi, grads=2 * psi, main_params=4 * psi, optimizer_state=8 * psi),
            1: dict(params=2 * psi, grads=2 * psi, main_params=4 * psi / nd, optimizer_state=8 * psi / nd),
            2: dict(params=2 * psi, grads=2 * psi / nd, main_params=4 * psi / nd, optimizer_state=8 * psi / nd)}[stage]


@pytest.mark.parametrize("nd", [2, 4])
def test_bytes_per_rank_match_zero_formulas(nd):
    results = run_distributed(_footprints, nd, [0, 1, 2], timeout=90)
    for stage in (0, 1, 2):
        state_total = 0
        for rank, by_stage in enumerate(results):
            r = by_stage[stage]
            psi, pad, pieces = r["psi"], r["pad"], r["pieces"]
            assert r["dp"] == nd and pad < nd
            measured = r["after"]
            slack = {"params": 2 * pad, "grads": 2 * pad, "main_params": 4 * pad,
                     "optimizer_state": 8 * pad + 4 * pieces}
            for field, expected in _formulas(stage, psi, nd).items():
                got = getattr(measured, field)
                assert abs(got - expected) <= slack[field], \
                    f"ZeRO-{stage} Nd={nd} rank {rank} {field}: {got} bytes, formula {expected:.0f} (+-{slack[field]})"
            total = {0: 16 * psi, 1: 4 * psi + 12 * psi / nd, 2: 2 * psi + 14 * psi / nd}[stage]
            assert abs(measured.total - total) <= sum(slack.values())
            state_total += measured.optimizer_state - 4 * pieces
            # Stage 2: the full gradient buffer exists during backward and is released by the step.
            full, shard = 2 * (psi + pad), 2 * (psi + pad) // nd
            if stage == 2:
                assert r["full_grads_released"] and r["during_grads"] == full + shard
                assert r["after_zero_grad"] == full + shard
            else:
                assert not r["full_grads_released"] and r["during_grads"] == full
        # The Adam moments of all DP ranks together are exactly the model's, once.
        expected_total = 8 * psi * (nd if stage == 0 else 1)
        assert state_total == expected_total, \
            f"ZeRO-{stage}: Adam moments over all ranks {state_total} != {expected_total}"
