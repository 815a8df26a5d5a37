"""pretrain_gpt.py's RoPE scaling flags: Megatron-LM's --use-rope-scaling / --rope-scaling-factor (Llama 3.x)
and --rotary-seq-len-interpolation-factor reach the model, are saved with it, and a resume that drops
the Llama 3 scaling is refused naming the flag (the interpolation factor may change: that is how a run
extends a checkpoint's context). The values against Hugging Face: tests/test_hf_equivalence.py."""
import pytest
from harness import run_distributed
from test_pretrain import TINY, _logged, _train
from test_tensorboard import _error_of

from megatron_core.errors import ConfigError

ROPE = ["--position-embedding-type", "rope", "--rotary-base", "500000", "--seq-length", "64", "--train-iters", "3",
        "--eval-iters", "0", "--log-interval", "1"]
LLAMA3 = ["--use-rope-scaling", "--rope-scaling-factor", "8"]


def test_the_scalings_reach_the_model_and_the_checkpoint(tmp_path):
    plain = _logged(run_distributed(_train, 1, TINY + ROPE, timeout=120)).losses
    llama3 = _logged(run_distributed(_train, 1, TINY + ROPE + LLAMA3 + ["--save", str(tmp_path / "ckpt")],
                                     timeout=120)).losses
    linear = _logged(run_distributed(_train, 1, TINY + ROPE + ["--rotary-seq-len-interpolation-factor", "4"],
                                     timeout=120)).losses
    assert llama3 != plain and linear != plain and linear != llama3
    # The older spelling of Megatron-LM's flag gives the same run.
    again = _logged(run_distributed(_train, 1, TINY + ROPE + ["--use-rope-scaling", "--rotary-scaling-factor", "8"],
                                    timeout=120)).losses
    assert again == llama3
    error = run_distributed(_error_of, 1, TINY + ROPE + ["--train-iters", "6", "--load", str(tmp_path / "ckpt")],
                            timeout=120)[0]
    assert error is not None and "rope_scaling: checkpoint True vs run False (--use-rope-scaling)" in error
    # --use-checkpoint-args takes the scaling from the checkpoint (without it, the refusal above).
    resume = ["--train-iters", "6", "--load", str(tmp_path / "ckpt"), "--use-checkpoint-args",
              "--override-opt-param-scheduler"]
    resumed = _logged(run_distributed(_train, 1, TINY + ROPE + resume, timeout=120))
    assert resumed.loaded_iteration == 3 and len(resumed.losses) == 3


@pytest.mark.parametrize("flags,message", [
    (["--use-rope-scaling"], "--use-rope-scaling scales RoPE, but position_embedding_type is 'learned_absolute'"),
    (ROPE + ["--rotary-seq-len-interpolation-factor", "0"], "must be > 0, got 0.0"),
    # Megatron-LM ignores the factor without the switch: the run trained unscaled (found by breakit2)
    (ROPE + ["--rope-scaling-factor", "32"], "--rope-scaling-factor 32 scales RoPE only with --use-rope-scaling"),
])
def test_bad_scalings_are_one_line(flags, message):
    error = run_distributed(_error_of, 1, TINY + flags, timeout=60)[0]
    assert error is not None and message in error and "\n" not in error


def test_the_factor_without_the_scaling_does_not_block_a_resume():
    """Found by breakit2: a checkpoint of a run given --rope-scaling-factor 32 without --use-rope-scaling (accepted
    before that became an error) was refused unless the run gave the factor too, now an error: a dead end. The
    factor does nothing without the scaling, so it is compared only when either side scales."""
    from megatron_core.training.checkpointing import check_compatible
    from megatron_core.transformer.config import TransformerConfig

    def config(**rope):
        return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, position_embedding_type="rope",
                                 **rope).to_dict()

    check_compatible(config(rope_scaling_factor=32.0), {}, config(), {}, "ckpt")
    with pytest.raises(ConfigError, match=r"rope_scaling_factor: checkpoint 8.0 vs run 32.0 \(--rope-scaling-factor\)"):
        check_compatible(config(rope_scaling=True), {}, config(rope_scaling=True, rope_scaling_factor=32.0), {}, "ckpt")
