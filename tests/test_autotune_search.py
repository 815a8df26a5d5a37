"""The autotuner's search and command line: invalid layouts pruned with their reasons, only launchable
layouts written out, and the emitted torchrun command runs pretrain_gpt.py for real."""
import dataclasses
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch
from harness import run_distributed

from megatron_core.autotune import cli
from megatron_core.autotune.activations import embedding_activation_bytes, head_activation_bytes, layer_activation_bytes
from megatron_core.autotune.cost import Profile, layer_shard_config, step_time
from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.autotune.memory import comm_buffer_bytes, model_state_bytes
from megatron_core.autotune.params import total_parameters
from megatron_core.autotune.search import enumerate_layouts, launch_blocker, predict_memory, search
from megatron_core.errors import ConfigError
from megatron_core.microbatches import MicrobatchCalculator
from megatron_core.transformer.config import TransformerConfig

# Megatron-style mock-data run, as tests/test_pretrain.py: 255 tokens + EOD, padded to 256.
FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--global-batch-size", "4", "--mock-data", "--vocab-size", "255", "--lr", "1e-3", "--train-iters", "2",
         "--eval-iters", "0", "--log-interval", "1", "--num-workers", "0", "--hidden-dropout", "0",
         "--attention-dropout", "0"]


def _spec(**kw):
    config = TransformerConfig(num_layers=kw.pop("num_layers", 4), hidden_size=48, num_attention_heads=6,
                               num_query_groups=6)
    return ModelSpec(config, 1000, 32, 32, global_batch_size=8, make_vocab_size_divisible_by=128)


def test_invalid_layouts_are_pruned_with_reasons():
    spec = _spec()
    cands = search(spec, [Layout(tp=4, dp=1), Layout(pp=3, dp=1), Layout(pp=2, vpp=3, dp=1), Layout(dp=3),
                          Layout(dp=2, micro_batch_size=2)], memory_per_device=1e12)
    reasons = {c.layout: c.reason for c in cands}
    assert reasons[Layout(tp=4, dp=1)] == "--num-attention-heads 6 not divisible by TP 4"
    assert reasons[Layout(pp=3, dp=1)] == "--num-layers 4 not divisible by PP 3 x VPP 1"
    assert reasons[Layout(pp=2, vpp=3, dp=1)] == "--num-layers 4 not divisible by PP 2 x VPP 3"
    assert reasons[Layout(dp=3)] == "--global-batch-size 8 not divisible by micro batch 1 x DP 3"
    assert reasons[Layout(dp=2, micro_batch_size=2)] is None


def test_out_of_memory_says_by_how_much():
    spec = _spec()
    layout = Layout(dp=2, micro_batch_size=4)
    need = predict_memory(spec, layout)
    (fits,) = search(spec, [layout], memory_per_device=need)
    (oom,) = search(spec, [layout], memory_per_device=need - 3 * 1024 ** 2)
    assert fits.reason is None and fits.memory_bytes == need
    assert oom.reason == f"out of memory by 3.0 MiB ({need / 1024 ** 2:.1f} MiB predicted)"
    # Sharding, recompute and smaller micro batches each lower the prediction.
    assert predict_memory(spec, Layout(dp=2, micro_batch_size=4, zero_stage=1)) < need
    # This framework's ZeRO-2 holds the full gradient buffer during backward (released by the step)
    # plus the reduced shard, so its peak is ZeRO-1's plus the shard: the steady state is what shrinks.
    z1, z2 = (model_state_bytes(spec, Layout(dp=2, micro_batch_size=4, zero_stage=z)) for z in (1, 2))
    assert z2.grads < z1.grads and z2.grads_in_backward == z1.grads + z2.grads
    assert predict_memory(spec, Layout(dp=2, micro_batch_size=4, zero_stage=2)) == \
        predict_memory(spec, Layout(dp=2, micro_batch_size=4, zero_stage=1)) + z2.grads
    assert predict_memory(spec, Layout(dp=2, micro_batch_size=4, recompute="full")) < need
    assert predict_memory(spec, Layout(dp=2, micro_batch_size=1)) < need


def test_every_zero_stage_and_offload_is_launchable_with_its_flags():
    spec = _spec()
    layouts = enumerate_layouts(spec, 2)
    assert {lay.zero_stage for lay in layouts} == {0, 1, 2, 3} and any(lay.offload for lay in layouts)
    assert all(launch_blocker(lay) is None for lay in layouts)
    assert cli.layout_flags(spec, Layout(dp=2, zero_stage=3))[-2:] == ["--zero-stage", "3"]
    assert "--optimizer-cpu-offload" in cli.layout_flags(spec, Layout(dp=2, zero_stage=1, offload=True))
    assert "--use-distributed-optimizer" in cli.layout_flags(spec, Layout(dp=2, zero_stage=1))
    cands = search(spec, layouts, 1e12, predict_time=lambda lay: (1.0 + lay.zero_stage, 0.1))
    assert all(c.launchable for c in cands if c.reason is None)


def test_bad_flags_are_one_line_errors(capsys):
    assert cli.main(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                     "--seq-length", "16", "--mock-data", "--vocab-size", "255"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: --global-batch-size is required: the search needs the model and batch size"


def test_out_of_range_autotune_flags_are_one_line_errors(tmp_path, capsys):
    """Each was taken: --world-size 0 as 'this machine's cores', -2 and --memory-per-device -1 ended in 'no
    layout fits', --trials -1 ran every layout but the last, --output in a missing directory failed at the end."""
    base = FLAGS + ["--world-size", "2", "--memory-per-device", "1"]
    for extra, message in ((["--world-size", "0"], "--world-size must be >= 1, got 0"),
                           (["--world-size", "-2"], "--world-size must be >= 1, got -2"),
                           (["--memory-per-device", "-1"], "--memory-per-device takes GiB per rank, a finite number "
                                                           "> 0; got -1.0"),
                           (["--memory-per-device", "nan"], "got nan"),
                           (["--trials", "-1"], "--trials must be >= 0, got -1"),
                           (["--micro-batch-sizes", "2", "0"], "--micro-batch-sizes must be >= 1, got 0"),
                           (["--output", str(tmp_path / "no" / "run.sh")], f"directory {tmp_path / 'no'} does not "
                                                                             f"exist")):
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (extra, err)


def test_a_world_size_no_layout_divides_is_not_called_out_of_memory(capsys):
    """3 ranks: 4 heads, 2 layers and a batch of 4 admit no TP, PP or DP of 3, whatever the memory."""
    assert cli.main(FLAGS + ["--world-size", "3", "--memory-per-device", "100"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: no layout of --world-size 3 ranks suits this model (memory aside): every one is pruned "
                   "for the reasons above; pick a world size that the heads, layers and --global-batch-size "
                   "divide\n"), err


def test_the_written_deepspeed_json_is_one_this_framework_reads():
    """It carried "pipeline": {"stages": N} (and activation_checkpointing keys for SP / full recompute),
    which pretrain_gpt.py --deepspeed-config and megatron_core.initialize refuse as not implemented."""
    from megatron_core.engine import deepspeed_to_megatron
    args = cli.build_parser().parse_args(FLAGS)
    spec = cli.model_spec(args)
    for layout in (Layout(pp=2, dp=1, micro_batch_size=2), Layout(tp=2, dp=1, sequence_parallel=True,
                                                                   recompute="full", micro_batch_size=4),
                   Layout(dp=2, zero_stage=1, offload=True, micro_batch_size=2),
                   Layout(dp=2, zero_stage=3, micro_batch_size=2)):
        mapped = deepspeed_to_megatron(cli.deepspeed_config(spec, layout, args), layout.dp)
        assert (mapped.ddp.zero_stage, mapped.optimizer.optimizer_cpu_offload) == (layout.zero_stage, layout.offload)
        assert (mapped.micro_batch_size, mapped.global_batch_size) == (layout.micro_batch_size, 4)
        # the buckets the memory prediction counted (without the key a file gets DeepSpeed's 5e8, which
        # pretrain_gpt.py --deepspeed-config now applies)
        assert mapped.ddp.bucket_size == 40_000_000
        assert mapped.ddp.stage3_param_persistence_threshold == 0


def test_emitted_command_runs(tmp_path, capsys):
    out, ds = tmp_path / "run.sh", tmp_path / "ds.json"
    code = cli.main(FLAGS + ["--world-size", "2", "--memory-per-device", "1", "--no-offload",
                             "--micro-batch-sizes", "2", "--output", str(out), "--output-deepspeed-json", str(ds)])
    printed = capsys.readouterr().out
    assert code == 0 and "layouts fit" in printed
    best = re.search(r"^best: (.*)$", printed, re.M).group(1)
    table = printed[:printed.index("layouts fit")].splitlines()
    # --no-offload: the search covers exactly the layouts without optimizer offload.
    spec = cli.model_spec(cli.build_parser().parse_args(FLAGS))
    assert spec.vocab_size == 256  # the NullTokenizer's 255 tokens + EOD, as pretrain_gpt.py builds it
    counts = re.search(r"^(\d+) layouts fit, (\d+) pruned:$", printed, re.M)
    assert counts, printed
    fit, pruned = map(int, counts.groups())
    assert fit + pruned == len(enumerate_layouts(spec, 2, [2], with_offload=False)) \
        < len(enumerate_layouts(spec, 2, [2], with_offload=True))
    assert any(line.startswith(best + " ") for line in table), f"{best} missing from the table: {table}"
    config = json.loads(ds.read_text())
    assert config["train_batch_size"] == 4 and config["zero_optimization"]["stage"] in (0, 1)
    command = shlex.split(out.read_text().splitlines()[-1])[:-1]  # the torchrun line, without its "$@"
    pp = int(command[command.index("--pipeline-model-parallel-size") + 1])
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * \
        (2 // (config["tensor_parallel"]["autotp_size"] * pp)) == 4
    assert "--nproc_per_node" in command and command[command.index("--nproc_per_node") + 1] == "2"
    # run as a user would, adding a flag: `bash run.sh --train-iters 3` ran 2 iterations (the flag was dropped)
    proc = subprocess.run(["bash", str(out), "--train-iters", "3"], capture_output=True, text=True, timeout=240,
                          cwd=cli.REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"iteration +(\d+)/ +3 \|", proc.stdout) == ["1", "2", "3"], (best, proc.stdout[-2000:])


def test_trials_measure_from_scratch_even_with_a_checkpoint_to_resume(tmp_path, capsys):
    """--trials runs the candidates for --trial-iters without the user's --save / --load: a checkpoint past
    that iteration (here 4 > 3) would leave nothing to train and nothing to time."""
    from harness import run_distributed

    import pretrain_gpt

    ckpt = str(tmp_path / "ckpt")
    run_distributed(pretrain_gpt.main, 1, FLAGS + ["--micro-batch-size", "2", "--train-iters", "4", "--save", ckpt],
                    timeout=60)
    code = cli.main(FLAGS + ["--world-size", "2", "--memory-per-device", "1", "--no-offload", "--micro-batch-sizes",
                             "2", "--trials", "1", "--trial-iters", "3", "--load", ckpt, "--save", ckpt])
    printed = capsys.readouterr().out
    measured = re.search(r"trial (.*): predicted [\d.]+ tokens/s, measured ([\d.na]+) \((\d+) s\)", printed)
    assert code == 0 and measured and measured.group(2) != "nan", printed[-2000:]
    # The median step is shorter than the whole trial (launch included), so at least one global batch
    # (4 x 16 tokens) per trial second, whatever the machine's speed.
    assert float(measured.group(2)) > 4 * 16 / (int(measured.group(3)) + 1), printed[-2000:]
    assert "--load" in printed.splitlines()[-1]  # the emitted command keeps them: it is the user's run


def test_step_time_follows_the_documented_model():
    """cost.step_time on a made-up profile, term by term as its module docstring states: (M + (pp-1)/v) x
    the microbatch time (layers x (layer x slowdown + 4 TP all-reduces of sbh bytes) + the head on the
    last stage, + 2 sends of sbh/TP under SP), the DP all-reduce (ZeRO: reduce-scatter + all-gather of
    the rank's shard, the reduce-scatter once per microbatch under ZeRO-2/3, ZeRO-3's all-gathers two
    per microbatch), Adam per element updated; ranks beyond the cores slow compute down."""
    spec = _spec()  # 4 layers, h 48, s 32, global batch 8, fp32 (4 bytes a parameter and a gradient)
    fits = {"all_reduce": (1e-3, 1e-9), "send_recv": (2e-3, 2e-9), "reduce_scatter": (3e-3, 3e-9),
            "all_gather": (4e-3, 4e-9)}
    prof = Profile(layer={(1, 1, False): 1.0, (1, 2, False): 0.5}, head={(1, 1): 0.25, (1, 2): 0.125},
                   collectives={(op, 2): fit for op, fit in fits.items()}, adam_s_per_element=1e-8,
                   peak_flops=1e9, cores=2)

    def comm(op, nbytes):
        return fits[op][0] + fits[op][1] * nbytes

    def elements(layout):
        return model_state_bytes(spec, layout).params // 4

    sbh = 32 * 1 * 48 * 4
    dp2 = Layout(dp=2)  # 4 microbatches of 4 layers each, the head after each one, then the DP all-reduce
    total, mfu = step_time(spec, dp2, prof, 1e9)
    expected = 4 * (4 * 1.0 + 0.25) + comm("all_reduce", 4 * elements(dp2)) + elements(dp2) * 1e-8
    assert total == pytest.approx(expected, rel=1e-12)
    assert mfu == pytest.approx(1e9 / expected / (1e9 * 2), rel=1e-12)

    # Reduce-scatter and all-gather are priced by the rank's shard (what measure_collectives times).
    zero1 = Layout(dp=2, zero_stage=1)
    shard = elements(zero1) // 2
    expected = (4 * (4 * 1.0 + 0.25) + comm("reduce_scatter", 4 * shard) + comm("all_gather", 4 * shard)
                + shard * 1e-8)
    assert step_time(spec, zero1, prof, 1e9)[0] == pytest.approx(expected, rel=1e-12)
    zero3 = Layout(dp=2, zero_stage=3)
    shard = elements(zero3)  # ZeRO-3 keeps only its shard of the parameters
    assert shard == elements(zero1) // 2
    # 4 microbatches: ZeRO-3 reduce-scatters the gradients of each one and gathers its parameters
    # twice per microbatch (forward, backward), none after the step; Adam updates the shard.
    expected = (4 * (4 * 1.0 + 0.25) + 4 * comm("reduce_scatter", 4 * shard) + 8 * comm("all_gather", 4 * shard)
                + shard * 1e-8)
    assert step_time(spec, zero3, prof, 1e9)[0] == pytest.approx(expected, rel=1e-12)

    # 4 ranks on 2 cores: compute twice as slow; full recompute: 4/3 of the layer; 8 microbatches, bubble 1/2.
    mp = Layout(tp=2, pp=2, vpp=2, sequence_parallel=True, recompute="full")
    per_mb = 2 * (0.5 * 4 / 3 * 2 + 4 * comm("all_reduce", sbh)) + 0.125 * 2 + 2 * comm("send_recv", sbh / 2)
    expected = (8 + 1 / 2) * per_mb + elements(mp) * 1e-8 * 2
    assert step_time(spec, mp, prof, 1e9)[0] == pytest.approx(expected, rel=1e-12)
    on_gpu = dataclasses.replace(prof, on_cpu=False)
    per_mb = 2 * (0.5 * 4 / 3 + 4 * comm("all_reduce", sbh)) + 0.125 + 2 * comm("send_recv", sbh / 2)
    assert step_time(spec, mp, on_gpu, 1e9)[0] == pytest.approx((8 + 1 / 2) * per_mb + elements(mp) * 1e-8, rel=1e-12)


def test_the_tool_reads_its_command_line():
    """tools/autotune.py hands sys.argv[1:] to cli.main: a bad flag set ends in the same one-line error."""
    proc = subprocess.run([sys.executable, "tools/autotune.py", "--num-layers", "2", "--hidden-size", "32",
                           "--num-attention-heads", "4", "--seq-length", "16", "--mock-data", "--vocab-size", "255"],
                          capture_output=True, text=True, cwd=cli.REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --global-batch-size is required: the search needs the model and batch size"


def test_collective_buffers_are_counted_for_sharded_data_parallel_on_cpu_only():
    """gloo's reduce-scatter / all-gather staging copies (memory.comm_buffer_bytes): ZeRO >= 1 over DP > 1
    on the CPU; nothing without sharding, over one DP rank, or on NCCL (fixed internal buffers)."""
    spec = _spec()
    assert comm_buffer_bytes(spec, Layout(dp=2, zero_stage=1)) > 0
    assert comm_buffer_bytes(spec, Layout(dp=2, zero_stage=1), on_cpu=False) == 0
    assert comm_buffer_bytes(spec, Layout(dp=1, zero_stage=1)) == 0
    assert comm_buffer_bytes(spec, Layout(dp=2, zero_stage=0)) == 0
    # Unbucketed and unpipelined, the one bucket holds every parameter (the tied embedding too: it has
    # no second copy to share with): a full-size fp32 copy plus this rank's half, 1.5 x its bytes.
    assert comm_buffer_bytes(spec, Layout(dp=2, zero_stage=1), bucket_size=None) == total_parameters(spec) * 4 * 3 // 2


def test_strip_flags_takes_each_flags_own_values():
    argv = ["--lr=1e-3", "--top", "5", "--micro-batch-sizes", "1", "2", "--seq-length", "16", "--top=3", "--x"]
    assert cli.strip_flags(argv, {"--top": 1, "--micro-batch-sizes": -1}) == ["--lr=1e-3", "--seq-length", "16", "--x"]


def test_launchable_layouts_rank_first():
    """A layout the framework cannot launch (ZeRO-4) ranks after every launchable one, however fast."""
    spec = _spec()
    cands = search(spec, [Layout(dp=2, zero_stage=4), Layout(dp=2)], 1e12,
                   predict_time=lambda lay: (1.0 if lay.zero_stage == 4 else 2.0, 0.1))
    assert [(c.layout.zero_stage, c.launchable, c.reason) for c in cands] == [(0, True, None), (4, False, None)]


def test_the_embedding_keeps_a_dropout_mask_only_with_dropout():
    """One bool per element of the embeddings' output [s, b, h] (its SP shard: s / TP) when hidden dropout is on."""
    spec = _spec()  # hidden dropout 0.1 (TransformerConfig's default)
    dry = dataclasses.replace(spec, config=dataclasses.replace(spec.config, hidden_dropout=0.0))
    for layout, shard in ((Layout(dp=2, micro_batch_size=2), 1), (Layout(tp=2, sequence_parallel=True), 2)):
        mask = spec.seq_length * layout.micro_batch_size * 48 // shard
        assert embedding_activation_bytes(spec, layout) - embedding_activation_bytes(dry, layout) == mask


def test_the_model_spec_follows_the_flags():
    """--max-position-embeddings sizes the position table (else --seq-length); the NullTokenizer needs
    --vocab-size."""
    spec = cli.model_spec(cli.build_parser().parse_args(FLAGS + ["--max-position-embeddings", "64"]))
    assert (spec.seq_length, spec.max_position_embeddings) == (16, 64)
    no_vocab = [flag for i, flag in enumerate(FLAGS) if "--vocab-size" not in FLAGS[max(i - 1, 0):i + 1]]
    no_vocab += ["--tokenizer-type", "NullTokenizer"]
    try:
        cli.model_spec(cli.build_parser().parse_args(no_vocab))
        error = ""
    except ConfigError as exc:
        error = str(exc)
    assert error == "--tokenizer-type or --vocab-size is required to size the embedding"


def test_the_model_spec_s_gradient_bytes_are_the_ddp_buffer_s():
    """The spec comes from the run's typed config (layout.from_run_config): bf16 gradients are reduced in fp32
    (4 bytes) unless --grad-reduce-in-bf16 (2: the DDP buffer is bf16; the flags' own mapping said 4); ZeRO and
    offload flags are the search's to choose, not an error (config_from_args refuses offload without a stage)."""
    bf16 = FLAGS + ["--bf16"]
    assert cli.model_spec(cli.build_parser().parse_args(bf16)).grad_bytes == 4
    assert cli.model_spec(cli.build_parser().parse_args(bf16 + ["--grad-reduce-in-bf16"])).grad_bytes == 2
    offload = ["--optimizer-cpu-offload", "--overlap-param-gather", "--offload-param"]
    assert cli.model_spec(cli.build_parser().parse_args(bf16 + offload)).bytes_per_param == 2


def test_activations_scale_with_the_micro_batch():
    """Every saved activation is per sample: a micro batch of b keeps b times the bytes of one."""
    spec = dataclasses.replace(_spec(), global_batch_size=16)
    for base in (Layout(dp=2), Layout(tp=2, sequence_parallel=True)):
        one = dataclasses.replace(base, micro_batch_size=1)
        for b in (2, 4):
            many = dataclasses.replace(base, micro_batch_size=b)
            for fn in (head_activation_bytes, embedding_activation_bytes):
                assert fn(spec, many) == b * fn(spec, one), (fn.__name__, base, b)
            assert layer_activation_bytes(spec, many) == b * layer_activation_bytes(spec, one), (base, b)


def test_a_layer_is_profiled_as_its_tp_shard():
    """The profiled layer (cost.layer_shard_config): one layer with heads, query groups and MLP width / TP."""
    spec = _spec()  # h 48, 6 heads in 6 groups, MLP 4h
    shard = layer_shard_config(spec, 2, selective=True)
    assert (shard.num_layers, shard.num_attention_heads, shard.num_query_groups, shard.ffn_hidden_size,
            shard.kv_channels, shard.recompute_granularity) == (1, 3, 3, 96, 8, "selective")
    assert layer_shard_config(spec, 1, selective=False).recompute_granularity is None


def test_model_spec_takes_the_configs_own_widths():
    """ModelSpec's MLP width, query groups and per-head size: the config's when it sets them (here none
    of them the default 4h, heads, h / heads), else the defaults."""
    config = TransformerConfig(num_layers=2, hidden_size=48, num_attention_heads=6, num_query_groups=2,
                               ffn_hidden_size=100, kv_channels=16)
    spec = ModelSpec(config, 1000, 32, 32, global_batch_size=8)
    assert (spec.ffn_hidden_size, spec.num_query_groups, spec.kv_channels) == (100, 2, 16)
    assert (_spec().ffn_hidden_size, _spec().num_query_groups, _spec().kv_channels) == (192, 6, 8)


def test_an_output_that_is_a_directory_and_a_deepspeed_config_are_one_line_errors(tmp_path, capsys):
    """--output DIR ended, after the search, in IsADirectoryError's traceback. --deepspeed-config FILE
    (pretrain_gpt.py's flag, which the tool takes) fixes the ZeRO stage and micro batch the search varies:
    it failed on the first layout with '--micro-batch-size 1 disagrees with the DeepSpeed config', a flag
    the user never gave."""
    base = FLAGS + ["--world-size", "2", "--memory-per-device", "1"]
    for flag in ("--output", "--output-deepspeed-json"):
        assert cli.main(base + [flag, str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"error: {flag} {tmp_path} is a directory; give a file name in it\n"
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2,
                                                  "zero_optimization": {"stage": 1}}))
    assert cli.main(base + ["--deepspeed-config", str(tmp_path / "ds.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --deepspeed-config is what the search chooses") \
        and "--output-deepspeed-json" in err, err


def test_layout_flags_given_to_the_search_are_said_to_be_replaced(capsys):
    """A launch script's --tensor-model-parallel-size 2 and --micro-batch-size 1, handed to the tuner with the
    other flags, were dropped without a word (the written command had the search's values)."""
    assert cli.main(FLAGS + ["--world-size", "2", "--memory-per-device", "1", "--tensor-model-parallel-size", "2",
                             "--micro-batch-size=1"]) == 0
    err = capsys.readouterr().err
    assert ("note: --tensor-model-parallel-size, --micro-batch-size are what the search chooses: the values given "
            "are replaced by the best layout's\n") in err, err


def test_reset_attention_mask_is_in_the_prediction():
    """--reset-attention-mask given to the autotuner reaches its memory model (the masked attention path and
    the [b, 1, s, s] mask; tests/test_autotune_activations.py counts them): before, the flag was parsed and its
    cost left out. With dropout on the CPU (the explicit path) at sequence 256 the layers' full scores and
    masks come to more than the causal blocks."""
    flags = [f if f != "16" else "256" for f in FLAGS] + ["--attention-dropout", "0.1"]
    plain = cli.model_spec(cli.build_parser().parse_args(flags))
    masked = cli.model_spec(cli.build_parser().parse_args(flags + ["--reset-attention-mask"]))
    assert masked.document_mask and not plain.document_mask
    layout = Layout(dp=1, micro_batch_size=2)
    assert predict_memory(masked, layout) > predict_memory(plain, layout)


def test_the_profile_counts_the_cores_this_process_may_use():
    """Under taskset (or a Slurm cpuset) the launched ranks share the cores of the affinity mask, not the
    machine's: with one core allowed, the profile said os.cpu_count() (2 here) and predicted 8 ranks about
    twice as fast as they ran."""
    import os

    from megatron_core.autotune.cost import profile

    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs a machine of 2 or more cores and CPU affinity")
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        prof = profile(_spec(num_layers=1), [Layout(dp=1)], 1)
    finally:
        os.sched_setaffinity(0, allowed)
    assert prof.cores == 1


def test_usable_cores_counts_every_core_of_the_affinity_mask():
    """Two cores allowed count as two (the test above checks one). The mask is set to two cores for the
    call even when the test itself runs under ``taskset -c N``, so a count that gave 1 for any non-empty mask
    fails here too."""
    import os

    from megatron_core.device import usable_cores

    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs a machine of 2 or more cores and CPU affinity")
    allowed = os.sched_getaffinity(0)
    two = set(sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))[:2])
    try:
        os.sched_setaffinity(0, two)
    except OSError:  # a cpuset (cgroup, Slurm) narrower than the machine
        pytest.skip("cannot widen this process's CPU affinity to two cores")
    try:
        cores = usable_cores()
    finally:
        os.sched_setaffinity(0, allowed)
    assert cores == 2


def test_pipeline_sends_are_priced_in_the_fp32_residual_streams_dtype():
    """bf16 with --fp32-residual-connection: stages send the fp32 stream (pipeline_communication_dtype),
    4 bytes an element, not the parameters' 2; before, step_time priced the sends at 2."""
    prof = Profile(layer={(1, 1, False): 1.0}, head={(1, 1): 0.25}, collectives={("send_recv", 2): (2e-3, 2e-9)},
                   cores=2)
    times = []
    for flag in (False, True):
        config = TransformerConfig(num_layers=4, hidden_size=48, num_attention_heads=6, params_dtype=torch.bfloat16,
                                   fp32_residual_connection=flag)
        spec = ModelSpec(config, 1000, 32, 32, global_batch_size=8, make_vocab_size_divisible_by=128,
                         bytes_per_param=2)
        times.append(step_time(spec, Layout(pp=2), prof, 1e9)[0])
    # 8 microbatches + a bubble of 1, two sends each of s x mb x h = 32 x 1 x 48 elements, 2 more bytes each
    assert times[1] - times[0] == pytest.approx((8 + 1) * 2 * 2e-9 * 32 * 48 * 2, rel=1e-9)


def _profiled_input_dtypes():
    """The dtype of the hidden states each profiled layer is given, without and with the flag (in a forked
    rank: the profile builds process groups; TransformerLayer.forward and cost._time replaced there only)."""
    from megatron_core.autotune import cost
    from megatron_core.transformer.transformer_layer import TransformerLayer

    seen = []
    TransformerLayer.forward = lambda self, hidden, *a, **k: seen.append(hidden.dtype) or hidden
    cost._time = lambda fn: fn() or 0.0
    for flag in (False, True):
        config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, params_dtype=torch.bfloat16,
                                   fp32_residual_connection=flag)
        cost._layer_seconds(ModelSpec(config, 100, 8, 8, global_batch_size=2, bytes_per_param=2), 1, 1, False)
    return seen


def test_a_layer_is_profiled_on_the_stream_it_receives():
    """The profiled layer's input is what a stage receives: fp32 under --bf16 --fp32-residual-connection (the
    residual adds then run in fp32, as in training); it was given bf16."""
    assert run_distributed(_profiled_input_dtypes, 1, timeout=60)[0] == [torch.bfloat16, torch.float32]


_DROPPED = ("--train-iters", "--global-batch-size")
RAMPUP = [f for i, f in enumerate(FLAGS) if f not in _DROPPED and FLAGS[i - 1] not in _DROPPED] + [
    "--global-batch-size", "8", "--train-samples", "32", "--rampup-batch-size", "2", "2", "16"]


def test_layouts_split_every_batch_of_a_rampup():
    """--rampup-batch-size 2 2 16 to a global batch of 8: a layout must split 2, 4 and 6 too (pretrain_gpt.py's
    MicrobatchCalculator refuses any batch it reaches that micro batch x DP does not divide, and an interleaved
    schedule whose microbatches PP does not divide). Before, the search checked only the final batch and
    its best layout for 4 ranks, tp2 dp2 mb4, stopped at launch (global batch 2 not divisible by 4 x 2)."""
    spec = dataclasses.replace(_spec(), rampup_batch_size=(2, 2, 16))
    cands = {c.layout: c.reason for c in search(spec, [Layout(dp=2, micro_batch_size=4), Layout(dp=2),
                                                       Layout(pp=2, vpp=2, dp=1, micro_batch_size=2)], 1e12)}
    assert cands[Layout(dp=2)] is None
    assert cands[Layout(dp=2, micro_batch_size=4)] == \
        "global batch size 2 (reached during --rampup-batch-size) not divisible by micro batch 4 x DP 2"
    assert cands[Layout(pp=2, vpp=2, dp=1, micro_batch_size=2)] == ("interleaving needs microbatches (1) divisible "
                                                                    "by PP 2 (global batch size 2, reached during "
                                                                    "--rampup-batch-size)")
    spec = cli.model_spec(cli.build_parser().parse_args(RAMPUP))
    assert (spec.global_batch_size, spec.rampup_batch_size) == (8, (2, 2, 16))
    valid = [c.layout for c in search(spec, enumerate_layouts(spec, 4, None, with_offload=False), 1e12)
             if c.reason is None]
    assert valid and any(lay.micro_batch_size * lay.dp == 2 for lay in valid)
    for lay in valid:  # pretrain_gpt.py's own check of the batches
        MicrobatchCalculator(8, lay.micro_batch_size, lay.dp, [2, 2, 16], lay.pp, lay.vpp)
