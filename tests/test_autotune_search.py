"""The autotuner's search and command line: invalid layouts pruned with their reasons, only launchable
layouts written out, and the emitted torchrun command runs pretrain_gpt.py for real."""
import json
import re
import shlex
import subprocess

from megatron_core.autotune import cli
from megatron_core.autotune.layout import Layout, ModelSpec
from megatron_core.autotune.memory import model_state_bytes
from megatron_core.autotune.search import enumerate_layouts, launch_blocker, predict_memory, search
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
                   Layout(dp=2, zero_stage=1, offload=True, micro_batch_size=2)):
        mapped = deepspeed_to_megatron(cli.deepspeed_config(spec, layout, args), layout.dp)
        assert (mapped.ddp.zero_stage, mapped.optimizer.optimizer_cpu_offload) == (layout.zero_stage, layout.offload)
        assert (mapped.micro_batch_size, mapped.global_batch_size) == (layout.micro_batch_size, 4)


def test_emitted_command_runs(tmp_path, capsys):
    out, ds = tmp_path / "run.sh", tmp_path / "ds.json"
    code = cli.main(FLAGS + ["--world-size", "2", "--memory-per-device", "1", "--no-offload",
                             "--micro-batch-sizes", "2", "--output", str(out), "--output-deepspeed-json", str(ds)])
    printed = capsys.readouterr().out
    assert code == 0 and "layouts fit" in printed
    best = re.search(r"^best: (.*)$", printed, re.M).group(1)
    config = json.loads(ds.read_text())
    assert config["train_batch_size"] == 4 and config["zero_optimization"]["stage"] in (0, 1)
    command = shlex.split(out.read_text())
    pp = int(command[command.index("--pipeline-model-parallel-size") + 1])
    assert config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * \
        (2 // (config["tensor_parallel"]["autotp_size"] * pp)) == 4
    assert "--nproc_per_node" in command and command[command.index("--nproc_per_node") + 1] == "2"
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=cli.REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.findall(r"iteration +(\d+)/ +2 \|", proc.stdout) == ["1", "2"], (best, proc.stdout[-2000:])


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
    measured = re.search(r"trial (.*): predicted [\d.]+ tokens/s, measured ([\d.na]+)", printed)
    assert code == 0 and measured and measured.group(2) != "nan", printed[-2000:]
    assert "--load" in printed.splitlines()[-1]  # the emitted command keeps them: it is the user's run
