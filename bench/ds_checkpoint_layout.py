"""Check that tests/deepspeed_files.py writes DeepSpeed 0.19.8's on-disk layout: the same file names, pickled
globals, keys, types, tensor shapes and dtypes as a folder real DeepSpeed wrote.

    python bench/ds_checkpoint_layout.py DIR/global_step3 STAGE DP [DTYPE [bf16_optimizer | frozen]]

``DIR`` is a checkpoint ``bench/ds_checkpoint_peer.py --impl deepspeed --phase save --model mlp`` wrote (that
script's MLP) at ZeRO ``STAGE`` over ``DP`` ranks, in ``DTYPE`` (fp32, bf16 or fp16; ``bf16_optimizer``: bf16 at
ZeRO-1 with ``--grad-accum-dtype fp32``, DeepSpeed's BF16_Optimizer; ``frozen``: saved with ``--freeze``, fc1.bias
frozen); prints the differences (none:
``layout equal``).
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from deepspeed_files import write_deepspeed_checkpoint  # noqa: E402

from megatron_core.engine.deepspeed_checkpoint import load_deepspeed_file  # noqa: E402

SHAPES = {"fc1.weight": (48, 16), "fc1.bias": (48,), "fc2.weight": (40, 48), "fc2.bias": (40,),
          "head.weight": (1, 40), "head.bias": (1,)}
VALUES_ONLY = ("ds_config", "next_step", "note")  # client_state and the config: values, not layout


def describe(value, prefix: str = "") -> dict[str, str]:
    """``{path: type, shape, dtype, stand-in attributes}`` for every leaf of a loaded checkpoint file."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            if key not in VALUES_ONLY:
                out.update(describe(item, f"{prefix}/{key}"))
        return out
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size) and value \
            and isinstance(value[0], (dict, list, torch.Tensor)):
        return {k: v for i, item in enumerate(value) for k, v in describe(item, f"{prefix}[{i}]").items()}
    text = type(value).__name__
    if torch.is_tensor(value):
        text += f"{tuple(value.shape)} {value.dtype}"
    if isinstance(getattr(value, "state", None), dict):
        text += f" {sorted(value.state)}"
    if isinstance(getattr(value, "values", None), tuple):
        text += f" {value.values}"
    return {prefix: text}


def main() -> int:
    real, stage, dp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[(sys.argv[4:] or ["fp32"])[0]]
    frozen = {"fc1.bias": torch.randn(48).to(dtype)} if sys.argv[5:] == ["frozen"] else {}
    shapes = {n: s for n, s in SHAPES.items() if n not in frozen}
    state = {"shapes": shapes, "fp32": {n: torch.randn(s) for n, s in shapes.items()},
             "exp_avg": {n: torch.randn(s) for n, s in shapes.items()},
             "exp_avg_sq": {n: torch.rand(s) for n, s in shapes.items()}, "step": torch.tensor(3.0), "frozen": frozen,
             "group": {"lr": 0.1, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}, "clip": 1.0,
             "lr_scheduler": {"last_batch_iteration": 2}, "global_steps": 3, "global_samples": 24, "ds_config": {},
             "dtype": dtype, "bf16_optimizer": sys.argv[5:] == ["bf16_optimizer"]}
    if dtype == torch.float16:  # DeepSpeed's dynamic loss scale (fp16's default); the values do not matter
        state["scaler"] = {"cur_scale": 2.0 ** 16, "dynamic": True, "cur_iter": 3, "last_overflow_iter": -1,
                           "scale_factor": 2.0, "scale_window": 2, "min_scale": 1, "delayed_shift": 2,
                           "cur_hysteresis": 2, "consecutive_hysteresis": False, "raise_error_at_min_scale": True,
                           "dtype": torch.float16}
    with tempfile.TemporaryDirectory() as tmp:
        write_deepspeed_checkpoint(tmp, "t", state, stage, dp, {})
        ours = os.path.join(tmp, "t")
        differences = []
        if sorted(os.listdir(real)) != sorted(os.listdir(ours)):
            differences.append(f"files: {sorted(os.listdir(real))} vs {sorted(os.listdir(ours))}")
        for name in sorted(set(os.listdir(real)) & set(os.listdir(ours))):
            pickled = [sorted(torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(d, name)))
                       for d in (real, ours)]
            if pickled[0] != pickled[1]:
                differences.append(f"{name}: pickled globals {pickled[0]} vs {pickled[1]}")
            a, b = (describe(load_deepspeed_file(os.path.join(d, name))) for d in (real, ours))
            differences += [f"{name}{key}: {a.get(key)} vs {b.get(key)}" for key in sorted(set(a) | set(b))
                            if a.get(key) != b.get(key)]
    print("\n".join(differences) or f"layout equal (ZeRO {stage}, DP {dp})")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
