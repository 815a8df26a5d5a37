"""``--apply-layernorm-1p`` (TransformerConfig ``layernorm_zero_centered_gamma``, Megatron-core's field): norm
weights stored zero-centred, initialised to zeros and applied as 1 + weight.

A model with the flag and norm weights w gives the plain model's logits and gradients with weights 1 + w
(fp32, exactly); every norm path (torch, a plugged kernel, the fp32-input path of a low-precision norm)
applies 1 + weight; pretrain under TP 2 + SP x PP 2 gives one process's losses, and the flag is recorded
with the checkpoint (a resume without it is one line naming it; --use-checkpoint-args takes it); the
Hugging Face export writes 1 + weight and the import with the flag writes weight - 1, the logits of the
imported model equal Hugging Face's, and generation from it gives Hugging Face's tokens.
"""
import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from equivalence import assert_rel_close
from harness import run_distributed
from test_pretrain import TINY, _logged, _train
from test_tensorboard import _error_of

from megatron_core import parallel_state
from megatron_core.checkpoint import convert
from megatron_core.fusions import Kernel, LayerNorm, RMSNorm
from megatron_core.models.gpt import GPTModel
from megatron_core.models.presets import gpt2_config, llama_config
from megatron_core.optimizer.optimizer import param_group_index
from megatron_core.optimizer.optimizer_config import OptimizerConfig
from tests.hf_testing import core_config_of, load_hf_weights, tiny_hf_gpt2, tiny_hf_llama

VOCAB, SEQ = 128, 16
PRESETS = {"gpt2": gpt2_config, "llama": llama_config}


def _pair(preset):
    """(plain model, 1p model) from the same seed, the 1p model's norm weights w random and the plain one's 1 + w."""
    ps = parallel_state.initialize_model_parallel(dist.get_world_size())
    config = PRESETS[preset](num_layers=2, hidden_size=64, num_attention_heads=4, hidden_dropout=0.0,
                             attention_dropout=0.0)
    models = []
    for zero_centered in (False, True):
        ps.manual_seed(7)
        models.append(GPTModel(dataclasses.replace(config, layernorm_zero_centered_gamma=zero_centered), VOCAB, SEQ,
                               parallel_state=ps))
    plain, one_p = models
    g = torch.Generator().manual_seed(3)
    norms = []
    with torch.no_grad():
        for (name, p), (name_1p, p_1p) in zip(plain.named_parameters(), one_p.named_parameters(), strict=True):
            assert name == name_1p
            if "layernorm.weight" in name:
                norms.append(name)
                assert torch.count_nonzero(p_1p) == 0, f"{name} of the 1p model must start at zero"
                w = torch.randn(p.shape, generator=g) * 0.1
                p_1p.copy_(w)
                p.copy_(1 + w)
            else:
                assert torch.equal(p, p_1p), name
    return plain, one_p, norms


def _logits_and_grads(preset):
    plain, one_p, norms = _pair(preset)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    out = []
    for model in (plain, one_p):
        logits = model(ids)
        model(ids, labels=ids).mean().backward()
        out.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    return out, norms


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_weights_w_give_the_plain_models_logits_and_grads_with_1_plus_w(preset):
    ((plain_logits, plain_grads), (logits, grads)), norms = run_distributed(_logits_and_grads, 1, preset, timeout=60)[0]
    # final_layernorm plus two per layer (LayerNorm for GPT-2, RMSNorm for Llama)
    assert len(norms) == 5
    assert torch.equal(logits, plain_logits)
    for name, grad in grads.items():  # d/dw of (1 + w) is 1: the same gradients
        assert torch.equal(grad, plain_grads[name]), name


def _torch_kernel(fn):
    """A plugged kernel that runs ``fn`` (the torch op) and records the weight it was handed."""
    seen = []

    def call(x, weight, *rest):
        seen.append(weight.detach().clone())
        return fn(x, weight, *rest)
    return Kernel(call, lambda *a: True, "recording"), seen


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_every_norm_path_applies_one_plus_weight(cls):
    """The torch path, a plugged kernel (how apex / Triton are reached) and the fp32-input path of a bf16 norm."""
    h = 24
    w = torch.randn(h, generator=torch.Generator().manual_seed(1)) * 0.1
    x = torch.randn(3, 2, h, generator=torch.Generator().manual_seed(2))
    layer_norm = lambda x, w, b, eps: F.layer_norm(x, (h,), w, b, eps)  # noqa: E731
    rms_norm = lambda x, w, eps: F.rms_norm(x, (h,), w, eps)  # noqa: E731
    kernel, seen = _torch_kernel(layer_norm if cls is LayerNorm else rms_norm)
    plain = cls(h, kernel=None)
    torch_1p, kernel_1p = cls(h, kernel=None, zero_centered_gamma=True), cls(h, kernel=kernel, zero_centered_gamma=True)
    assert torch.count_nonzero(torch_1p.weight) == 0
    with torch.no_grad():
        plain.weight.copy_(1 + w)
        torch_1p.weight.copy_(w)
        kernel_1p.weight.copy_(w)
    expected = plain(x)
    assert torch.equal(torch_1p(x), expected)
    assert torch.equal(kernel_1p(x), expected) and torch.equal(seen[0], 1 + w)
    # bf16 weights and an fp32 input (the fp32 residual stream): the 1 + w in fp32, the result in bf16
    low_1p = cls(h, kernel=None, zero_centered_gamma=True, params_dtype=torch.bfloat16)
    with torch.no_grad():
        low_1p.weight.copy_(w)
    low = low_1p(x)
    assert low.dtype == torch.bfloat16
    reference = (layer_norm(x, 1 + low_1p.weight.float(), None, 1e-5) if cls is LayerNorm
                 else rms_norm(x, 1 + low_1p.weight.float(), 1e-5))
    assert torch.equal(low, reference.to(torch.bfloat16))
    assert "zero_centered_gamma" in repr(torch_1p)


def test_zero_centred_gammas_get_no_weight_decay_as_in_megatron_core():
    """Megatron-core's default param groups give every 1-D parameter (the norm weights, zero-centred or not)
    no weight decay; decaying a zero-centred gamma would pull the applied 1 + w towards 1, not 0."""
    norm = LayerNorm(8, zero_centered_gamma=True)
    assert param_group_index(norm.weight, OptimizerConfig(weight_decay=0.1)) == 1  # the group without decay


RUN = ["--train-iters", "4", "--eval-iters", "0", "--log-interval", "1"]
ONE_P = ["--apply-layernorm-1p"]


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_pretrain_layouts_reproduce_one_process_and_the_checkpoint_records_the_flag(tmp_path, norm):
    args = TINY + RUN + ["--normalization", norm]
    ckpt = str(tmp_path / "ckpt")
    serial = _logged(run_distributed(_train, 1, args + ONE_P + ["--save", ckpt, "--ckpt-format", "torch"],
                                     timeout=120)).losses
    plain = _logged(run_distributed(_train, 1, args, timeout=120)).losses
    layout = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2"]
    parallel = _logged(run_distributed(_train, 4, args + ONE_P + layout, timeout=240)).losses
    for i, (a, b) in enumerate(zip(parallel, serial, strict=True), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"TP 2 + SP x PP 2, iteration {i}: {a} vs one process {b}"
    # Same function at init (1 + 0 = 1), same gradients, Adam shift-invariant and no decay on 1-D weights:
    # the plain run's losses up to the rounding of w against 1 + w.
    for i, (a, b) in enumerate(zip(serial, plain, strict=True), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"iteration {i}: 1p {a} vs plain {b}"
    error = run_distributed(_error_of, 1, TINY + ["--train-iters", "8", "--eval-iters", "0", "--normalization", norm,
                                                  "--load", ckpt], timeout=120)[0]
    assert error is not None and "layernorm_zero_centered_gamma: checkpoint True vs run False (--apply-layernorm-1p)" \
        in error
    resumed = _logged(run_distributed(_train, 1, TINY + ["--train-iters", "6", "--eval-iters", "0", "--load", ckpt,
                                                         "--use-checkpoint-args", "--override-opt-param-scheduler"],
                                      timeout=120))
    assert resumed.loaded_iteration == 4 and len(resumed.losses) == 2


def _ours(hf_model, zero_centered):
    ps = parallel_state.initialize_model_parallel(1)
    config, vocab, positions = core_config_of(hf_model, layernorm_zero_centered_gamma=zero_centered)
    model = GPTModel(config, vocab, positions, parallel_state=ps, make_vocab_size_divisible_by=128)
    load_hf_weights(model, hf_model, 128, ps)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(11))
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "layernorm.weight" in n}
    return model(ids).detach(), norms


def _hf_norms(hf_model):
    return {n: p.detach() for n, p in hf_model.named_parameters()
            if n.endswith(("layernorm.weight", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight"))}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hugging_face_import_writes_w_minus_1_and_export_writes_1_plus_w(tmp_path, family):
    hf_model = (tiny_hf_gpt2 if family == "gpt2" else tiny_hf_llama)()
    with torch.no_grad():  # GPT-2's LayerNorms start at one: random weights make the shift visible
        for name, param in _hf_norms(hf_model).items():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(11))
    reference = hf_model(ids).logits.detach()
    logits, norms = run_distributed(_ours, 1, hf_model, True, timeout=60)[0]
    assert_rel_close(logits, reference, what=f"{family} 1p logits vs Hugging Face")
    hf_norms = list(_hf_norms(hf_model).values())
    assert len(norms) == len(hf_norms) == 5
    assert sorted(float(v.mean()) for v in norms.values()) == pytest.approx(
        sorted(float(v.mean()) - 1 for v in hf_norms), abs=1e-6)
    hf_model.save_pretrained(tmp_path / "hf")
    base = ["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf")]
    assert convert.main(base + ["--save-dir", str(tmp_path / "ckpt"), "--apply-layernorm-1p"]) == 0
    assert convert.main(base + ["--save-dir", str(tmp_path / "plain")]) == 0
    one_p, plain = convert.load_core(str(tmp_path / "ckpt")), convert.load_core(str(tmp_path / "plain"))
    assert one_p.config.layernorm_zero_centered_gamma and not plain.config.layernorm_zero_centered_gamma
    for name in norms:
        assert torch.equal(one_p.state[name], plain.state[name] - 1), name
        assert not torch.equal(one_p.state[name], plain.state[name]), name
    assert convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir",
                         str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "out")]) == 0
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    for (name, theirs), ours in zip(_hf_norms(hf_model).items(), _hf_norms(exported).values(), strict=True):
        assert_rel_close(ours, theirs, what=f"exported {name}")  # (w - 1) + 1 in fp32: within an ulp of w
    assert_rel_close(exported(ids).logits, reference, what=f"{family} exported logits")


def test_the_converter_flag_goes_with_the_hf_loader(tmp_path, capsys):
    assert convert.main(["--model-type", "GPT", "--loader", "core", "--saver", "hf", "--load-dir", str(tmp_path / "a"),
                         "--save-dir", str(tmp_path / "b"), "--apply-layernorm-1p"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--apply-layernorm-1p applies to --loader hf" in err[0]


def test_generation_checks_the_flag_and_runs_an_imported_1p_checkpoint(tmp_path, capsys):
    """Megatron-LM's generation scripts repeat the training flags: --apply-layernorm-1p is checked against the
    loaded model (one line when its norms are plain); a Llama imported with the flag generates Llama's tokens."""
    from test_text_generation_cli import _hf_greedy

    from megatron_core.inference.text_generation_cli import main

    llama = tiny_hf_llama()
    llama.save_pretrained(tmp_path / "hf")
    assert convert.main(["--model-type", "GPT", "--loader", "hf", "--saver", "core", "--load-dir", str(tmp_path / "hf"),
                         "--save-dir", str(tmp_path / "ckpt"), "--apply-layernorm-1p"]) == 0
    out = tmp_path / "out.json"
    args = ["--prompt-tokens", "5,17,99", "--top_k", "1", "--tokens-to-generate", "4", "--output", str(out),
            "--apply-layernorm-1p"]
    assert main(["--load", str(tmp_path / "ckpt"), *args]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["tokens"] == [_hf_greedy(llama, [5, 17, 99], 4)]
    capsys.readouterr()
    assert main(["--load", str(tmp_path / "hf"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("--apply-layernorm-1p: the checkpoint's norm weights are not "
                                             "zero-centred; drop the flag (the model's architecture comes from "
                                             "--load)"), err


class _TorchNorm(torch.nn.LayerNorm):
    """A custom spec's norm built on torch.nn.LayerNorm: it applies its weight as it is."""

    def __init__(self, config, hidden_size, eps=None):
        super().__init__(hidden_size, eps=config.layernorm_epsilon)


def _plain_rms_norm(config, hidden_size, eps=None):
    return RMSNorm(hidden_size, config.layernorm_epsilon)  # zero_centered_gamma left off


def _custom_spec_errors():
    from megatron_core.errors import ConfigError
    from megatron_core.transformer.layer_specs import get_gpt_layer_local_spec

    ps = parallel_state.initialize_model_parallel(1)
    errors = []
    for where, norm in (("input_layernorm", _TorchNorm), ("pre_mlp_layernorm", _plain_rms_norm)):
        spec = get_gpt_layer_local_spec()
        setattr(spec.submodules, where, norm)
        config = gpt2_config(num_layers=2, hidden_size=32, num_attention_heads=4, layernorm_zero_centered_gamma=True)
        try:
            GPTModel(config, VOCAB, SEQ, transformer_layer_spec=spec, parallel_state=ps)
            errors.append(None)
        except ConfigError as exc:
            errors.append(str(exc))
    GPTModel(dataclasses.replace(config, layernorm_zero_centered_gamma=False), VOCAB, SEQ, transformer_layer_spec=spec,
             parallel_state=ps)  # without the flag the same spec is fine
    ps.destroy()
    return errors


def test_a_custom_spec_norm_that_ignores_the_flag_is_refused():
    """A --spec whose norm does not apply 1 + weight (torch.nn.LayerNorm, or a norm built without the config's
    zero_centered_gamma) trained silently with the flag: its weights from zeros as the scale itself, and the
    Hugging Face export then wrote 1 + weight for them. Megatron-core's WrappedTorchNorm refuses the flag too."""
    errors = run_distributed(_custom_spec_errors, 1, timeout=60)[0]
    assert errors[0] is not None and errors[0].startswith(
        "--apply-layernorm-1p (layernorm_zero_centered_gamma): the norm decoder.layers.0.input_layernorm (_TorchNorm) "
        "does not apply 1 + weight"), errors[0]
    assert errors[1] is not None and "decoder.layers.0.pre_mlp_layernorm (RMSNorm)" in errors[1], errors[1]
