"""pretrain_gpt.py --qk-layernorm (Megatron-LM's flag; TransformerConfig.qk_layernorm): the same layer as the
custom spec ``models.custom_spec qk_norm_layer_spec``, under TP 2 x PP 2 one process's losses, recorded with
the checkpoint (a resume without it is one line naming it; --use-checkpoint-args takes it), with
--transformer-impl local, and refused in one line by the Hugging Face export (neither GPT-2 nor Llama has
query/key norms)."""
from harness import run_distributed
from test_pretrain import TINY, _logged, _train
from test_tensorboard import _error_of

from megatron_core.checkpoint.convert import main as convert

RUN = ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "1"]
QK = ["--qk-layernorm", "--normalization", "RMSNorm"]


def test_the_flag_is_the_custom_specs_layer_under_every_layout(tmp_path):
    flag = _logged(run_distributed(_train, 1, TINY + RUN + QK + ["--save", str(tmp_path / "ckpt"),
                                                                 "--ckpt-format", "torch"], timeout=120)).losses
    spec = _logged(run_distributed(_train, 1, TINY + RUN + QK[1:] + ["--spec", "models.custom_spec",
                                                                     "qk_norm_layer_spec"], timeout=120)).losses
    plain = _logged(run_distributed(_train, 1, TINY + RUN + QK[1:], timeout=120)).losses
    local = _logged(run_distributed(_train, 1, TINY + RUN + QK + ["--transformer-impl", "local"],
                                    timeout=120)).losses
    assert flag == spec and flag != plain
    for i, (a, b) in enumerate(zip(local, flag, strict=True), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"--transformer-impl local, iteration {i}: {a} vs {b}"
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    parallel = _logged(run_distributed(_train, 4, TINY + RUN + QK + layout, timeout=180)).losses
    for i, (a, b) in enumerate(zip(parallel, flag, strict=True), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"TP 2 x PP 2, iteration {i}: {a} vs one process {b}"
    ckpt = str(tmp_path / "ckpt")
    error = run_distributed(_error_of, 1, TINY + RUN[:1] + ["8"] + QK[1:] + ["--load", ckpt], timeout=120)[0]
    assert error is not None and "qk_layernorm: checkpoint True vs run False (--qk-layernorm)" in error
    resumed = _logged(run_distributed(_train, 1, TINY + QK[1:] + ["--train-iters", "6", "--eval-iters", "0", "--load",
                                                                  ckpt, "--use-checkpoint-args",
                                                                  "--override-opt-param-scheduler"], timeout=120))
    assert resumed.loaded_iteration == 4 and len(resumed.losses) == 2
    assert convert(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir", ckpt, "--save-dir",
                    str(tmp_path / "hf")]) == 2


def test_specs_named_by_spec_take_the_flag_or_hold_the_norms():
    """A built-in spec function is given qk_layernorm (else the check below would refuse its layer); a user
    spec that holds the norms passes."""
    error = run_distributed(_error_of, 1, TINY + QK + ["--spec", "megatron_core.transformer.layer_specs",
                                                       "get_gpt_layer_fused_spec"] + RUN, timeout=60)[0]
    assert error is None
    error = run_distributed(_error_of, 1, TINY + QK + ["--spec", "models.custom_spec", "qk_norm_layer_spec"] + RUN,
                            timeout=60)[0]
    assert error is None


def test_flag_without_norms_in_a_user_spec_is_refused(tmp_path, monkeypatch):
    (tmp_path / "plain_spec.py").write_text("from megatron_core.transformer.layer_specs import "
                                            "get_gpt_layer_local_spec\nLAYER = get_gpt_layer_local_spec()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    error = run_distributed(_error_of, 1, TINY + QK + ["--spec", "plain_spec", "LAYER"] + RUN, timeout=60)[0]
    assert error == ("--qk-layernorm: the layer of --spec plain_spec LAYER has no q_layernorm/k_layernorm; fill them "
                     "in that spec, or drop --qk-layernorm")


def test_hf_export_of_a_user_spec_with_norms_is_refused_not_dropped(tmp_path, capfd):
    """Found by breakit2: a Llama-shaped run with ``--spec models.custom_spec qk_norm_layer_spec`` and no
    --qk-layernorm records qk_layernorm False, and ``convert.py --saver hf`` wrote a LlamaForCausalLM without
    the trained q/k norms (another model, no word said). The export now names the weights and writes nothing."""
    llama = ["--position-embedding-type", "rope", "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
             "--spec", "models.custom_spec", "qk_norm_layer_spec", "--save", str(tmp_path / "ckpt"),
             "--ckpt-format", "torch"]
    _logged(run_distributed(_train, 1, TINY + RUN + llama, timeout=120))
    capfd.readouterr()
    assert convert(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "ckpt"),
                    "--save-dir", str(tmp_path / "hf")]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("convert.py: error: LlamaForCausalLM has no place for the weights "
                           "decoder.layers.0.self_attention.k_layernorm.weight, "), line
    assert "keep the Megatron checkpoint" in line and not (tmp_path / "hf").exists()
