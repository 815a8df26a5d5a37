"""Mutation check of the parallel core: plant one small bug at a time, run the relevant tests.

Run by hand or nightly, not in CI (issue #16, item 9)::

    python scripts/mutation_check.py                      # every mutant (hours on 2 cores)
    python scripts/mutation_check.py --sample 40 --seed 0 # a random sample
    python scripts/mutation_check.py --list               # the mutants, without running anything
    python scripts/mutation_check.py --file engine/reshard.py --sample 10  # one file's mutants
    python scripts/mutation_check.py --since 7b90a5b --list  # only mutants on lines changed since a commit
    python scripts/mutation_check.py --file training/timers.py --tests tests/test_timing_log_option.py

``--since REV`` keeps the mutants whose line (the first line of the mutated node) is in an added or
changed hunk of ``git diff -U0 REV`` (working tree against REV). ``--tests`` replaces the package's
``TESTS`` list, for running a sample against the test files of the change only.

Mutants are made on the AST of each file under ``megatron_core/{tensor_parallel, pipeline_parallel,
distributed, optimizer, transformer, checkpoint, dist_checkpointing, fusions, engine, training,
datasets, tokenizer, inference, autotune, models}`` (subfolders included, such as
``training/arguments``; but ``SKIP``) and of the top-level modules ``megatron_core/{parallel_state,
collectives, shm_collectives, microbatches, rng_tracker, errors, device, zero}.py`` (the package "core"), one
change each, in the spirit of mutmut's operators: an arithmetic operator swapped (``+ -``, ``* /``,
``// *``), a comparison swapped (``< <=``, ``> >=``, ``== !=``, ``is`` / ``is not``, ``in`` /
``not in``), ``and`` / ``or`` swapped, a ``not`` dropped, a small integer constant moved by one, or a
call statement (such as a collective) deleted. Docstrings and type annotations are left alone. The
mutated file is written back with ``ast.unparse`` and restored from its original text afterwards,
whatever happens (also on Ctrl-C).

A mutant is killed when its directory's tests fail (``pytest -x``, fastest files first; pytest's exit
1, or 2 for a collection error such as a mutant that breaks an import) or time out; it survives when they
pass. A run in which pytest collected or ran no test (exit 3, 4 or 5: a wrong ``--tests`` id, say) is
an "error", listed and not counted as a kill, and the script exits 1. The target is under 10%
survivors per directory. Survivors are printed
with their location: each is either a missing test or an equivalent mutant (no observable change),
to be judged by reading it. Results go to ``--out`` (JSON) as well.

Files not mutated (``SKIP``), each for its reason:

- ``transformer/te_spec.py``: Transformer Engine wrappers; TE cannot be installed on the CPU
  machines, so no test can run them (the file says so) and every mutant would survive untested.
- ``transformer/layer_specs.py``: the spec tables (which class fills each slot: no mutation points)
  and the picker's TE branch (``not te_spec.HAVE_TE``, ``use_te is None``, a log line), whose every
  mutant gives the same spec on a machine without TE and CUDA, i.e. every machine the tests run on.
- ``checkpoint/hf_errors.py``: one exception class, no logic.
- ``fusions/triton_{norms,elementwise,cross_entropy}.py``: Triton kernels, not torch fallbacks;
  they run in Triton's interpreter in ``tests/test_triton_kernels.py`` against the torch paths,
  and mutating the ``@triton.jit`` bodies tests the interpreter more than our code. That test file
  (about 5 s) is in the ``fusions`` list because it checks the torch paths as the kernels' reference.

The samples run so far, their survivors and which were judged equivalent (no test can tell them
apart on a CPU machine) are recorded in docs/mutation.md; add each new sample there.

A ``shm_collectives`` mutant that skips the unlink of its segment (killed by test_collectives) leaves
16-32 MiB files ``/dev/shm/mcore-allreduce-*`` behind; remove them after a run of the ``core`` package.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("tensor_parallel", "pipeline_parallel", "distributed", "optimizer", "transformer", "checkpoint",
            "dist_checkpointing", "fusions", "engine", "training", "datasets", "tokenizer", "inference", "autotune",
            "models", "core")
# "core" is not a folder: the top-level modules of megatron_core.
CORE = ("parallel_state.py", "collectives.py", "shm_collectives.py", "microbatches.py", "rng_tracker.py",
        "errors.py", "device.py", "zero.py")
# Tests run against each package's mutants, fastest first so that most mutants die early.
TESTS = {
    "tensor_parallel": ["tests/test_tensor_parallel_mappings.py", "tests/test_tensor_parallel_layers.py",
                        "tests/test_cross_entropy_and_rng.py",
                        "tests/test_gpt_model.py"],
    "pipeline_parallel": ["tests/test_pipeline_layer_split.py", "tests/test_pipeline_schedule_order.py",
                          "tests/test_pipeline_finalize.py", "tests/test_pipeline_schedules.py"],
    "distributed": ["tests/test_pipeline_finalize.py", "tests/test_ddp.py", "tests/test_zero.py",
                    "tests/test_partitioned_grads.py", "tests/test_zero3.py",
                    # the buffer's on_bucket_launched hook (gradient copies to the host during backward)
                    "tests/test_offload_overlap.py",
                    # the buffer's has_grads, which zero.safe_get_full_grad reads (no backward since the step)
                    "tests/test_zero_gathered_parameters.py",
                    # DDP's check_same_parameters (a rank-dependent model refused on every rank)
                    "tests/test_ddp_same_model.py",
                    # DistributedDataParallelConfig's checks (zero1_all_reduce_grads only at ZeRO-1)
                    "tests/test_optimizer.py::test_config_errors_name_the_flag"],
    "optimizer": ["tests/test_optimizer.py", "tests/test_memory.py", "tests/test_zero.py",
                  "tests/test_mixed_precision.py", "tests/test_decoupled_lr.py",
                  # grad_scaler's consecutive_hysteresis and DeepSpeed's window; the engine's param groups
                  "tests/test_engine_ds_compat.py",
                  # distrib_optimizer's NVMe step (its all-gather after the swapped-in step)
                  "tests/test_zero3.py::test_cpu_and_nvme_optimizer_offload_equal_one_process"],
    "transformer": ["tests/test_transformer_units.py", "tests/test_rope_scaling.py", "tests/test_hf_equivalence.py",
                    # attention's KV-cache path (incremental decoding against HF generate)
                    "tests/test_generation.py::test_greedy_matches_hf_generate", "tests/test_gpt_model.py",
                    # the fp32 residual stream's casts (_bias_dropout_add), the 1p norms, the pipeline dtype
                    "tests/test_fp32_residual.py", "tests/test_layernorm_1p.py"],
    "checkpoint": ["tests/test_tokenizer.py", "tests/test_hf_export.py", "tests/test_checkpoint_convert.py",
                   "tests/test_checkpoint_convert_optimizer.py", "tests/test_checkpoint_convert_layout_settings.py",
                   "tests/test_checkpointing_hf.py", "tests/test_hf_equivalence.py",
                   "tests/test_dist_checkpoint_tools.py", "tests/test_tokenizer_hf_dir.py",
                   "tests/test_decoupled_lr.py",
                   # the HF import/export of zero-centred gammas (hf_io.norm_weight_to_core/_to_hf)
                   "tests/test_layernorm_1p.py"],
    "dist_checkpointing": ["tests/test_dist_checkpoint_tools.py", "tests/test_dist_checkpoint_damage.py",
                           "tests/test_dist_checkpointing_kill.py", "tests/test_dist_checkpointing.py",
                           # the one load across vocabulary paddings (TP 2's 256 rows into TP 1's 300)
                           "tests/test_generation.py::test_torch_dist_checkpoint_generates_under_another_tp",
                           # --no-save-optim / --no-save-rng (save_rng, an empty rng list on load)
                           "tests/test_pretrain_dist_ckpt.py::"
                           "test_no_save_optim_and_no_save_rng_leave_them_out_and_a_resume_must_skip_them"],
    "fusions": ["tests/test_onednn_linear.py", "tests/test_triton_kernels.py", "tests/test_compiled_fusions.py",
                "tests/test_transformer_units.py",
                # fused_layer_norm's zero_centered_gamma and its fp32-stream path
                "tests/test_layernorm_1p.py", "tests/test_fp32_residual.py"],
    "engine": ["tests/test_engine_config.py", "tests/test_engine_config_older_names.py",
               "tests/test_engine_config_offload.py", "tests/test_engine_api.py",
               "tests/test_engine.py", "tests/test_engine_checkpoint.py", "tests/test_engine_consolidate.py",
               "tests/test_engine_load_options.py", "tests/test_engine_checkpoint_damage.py",
               "tests/test_engine_autotp.py",
               "tests/test_engine_frozen_params.py", "tests/test_engine_autotp_reshard.py", "tests/test_weights_dir.py",
               "tests/test_engine_ds_compat.py", "tests/test_engine_lr_range_one_cycle.py",
               "tests/test_engine_scheduler_config.py",
               # the tensorboard monitor (monitor.py) and the "auto" ZeRO sizes from the model's width (auto.py)
               "tests/test_engine_monitor.py", "tests/test_engine_auto.py",
               # communication_data_type (config_keys.communication_data_type)
               "tests/test_engine_config_ds019.py",
               "tests/test_clean_exit.py::test_engine_scripts_exit_cleanly_without_tearing_down"],
    "training": ["tests/test_arguments.py", "tests/test_lr_scheduler.py", "tests/test_pretrain_deepspeed_config.py",
                 "tests/test_pretrain_errors.py", "tests/test_checkpoint_args.py",
                 "tests/test_checkpointing.py", "tests/test_pretrain.py", "tests/test_failures_training.py",
                 "tests/test_pretrain_dist_ckpt.py", "tests/test_decoupled_lr.py",
                 # --manual-gc, --profile, --log-params-norm and the TensorBoard extras (iteration_hooks.py)
                 "tests/test_megatron_run_flags.py",
                 # --timing-log-option (timers.gather_means, the minmax/max/all blocks)
                 "tests/test_timing_log_option.py",
                 # every pipeline chunk reads the data under document masks (data_loading, config)
                 "tests/test_document_masks.py",
                 # the Theoretical memory footprints line (training_log.theoretical_memory_line)
                 "tests/test_theoretical_memory.py",
                 # checkpointing's --load errors (an iteration's directory) and the manifest's size check
                 "tests/test_failures_checkpoint.py::test_load_at_the_wrong_path_is_an_error_not_a_fresh_start",
                 "tests/test_failures_checkpoint.py::test_a_damaged_file_is_named_with_the_previous_iteration",
                 # --zero-stage 0 among the flags' choices (arguments/distributed.py)
                 "tests/test_pretrain_zero.py::test_conflicting_zero_flags_are_one_line_errors",
                 # arguments/compat.py's checks of Megatron-LM's script flags (one activation flag at a time)
                 "tests/test_failures_cli.py::test_llama_script_flags_are_accepted_with_their_meaning",
                 # initialize.shutdown destroys the groups an in-process run made
                 "tests/test_clean_exit.py::test_an_in_process_run_destroys_the_groups_it_made"],
    "datasets": ["tests/test_datasets.py", "tests/test_preprocess_data.py", "tests/test_failures_data.py",
                 # the blend whose split is empty in some prefixes only (builder._check_blend_splits)
                 "tests/test_pretrain_test_split.py",
                 # --reset-position-ids / --reset-attention-mask / --eod-mask-loss (gpt_dataset)
                 "tests/test_document_masks.py",
                 # splits._unquote: --split in quotes (Megatron-LM's Llama 3 example), and what it refuses
                 "tests/test_arguments.py::test_split_in_quotes_or_with_slashes_reads_as_megatron_lm_reads_it",
                 "tests/test_arguments.py::test_split_in_other_forms_is_one_line_naming_split"],
    "tokenizer": ["tests/test_tokenizer.py", "tests/test_preprocess_data.py", "tests/test_tokenizer_hf_dir.py"],
    "inference": ["tests/test_generation.py", "tests/test_text_generation_cli.py",
                  "tests/test_text_generation_server.py", "tests/test_text_generation_client.py",
                  "tests/test_text_generation_layouts.py", "tests/test_text_generation_server_port.py",
                  # loading.read_full_model's errors for a --load that is no checkpoint (the iteration hint)
                  "tests/test_failures_checkpoint.py::"
                  "test_load_at_a_hugging_face_folder_or_an_engine_checkpoint_names_the_conversion"],
    # the schedule replay checks activations.in_flight against the activations the schedules hold
    "autotune": ["tests/test_pipeline_schedule_order.py", "tests/test_autotune_search.py",
                 "tests/test_autotune_memory.py", "tests/test_autotune_activations.py",
                 "tests/test_autotune_cli_errors.py", "tests/test_autotune_layouts.py",
                 "tests/test_theoretical_memory.py"],  # layout.from_run_config, search.rank_memory
    "models": ["tests/test_init_seed_names.py", "tests/test_hf_equivalence.py", "tests/test_layout.py",
               # GPTModel.forward's KV-cache argument (incremental decoding against HF generate)
               "tests/test_generation.py::test_greedy_matches_hf_generate", "tests/test_gpt_model.py",
               "tests/test_decoupled_lr.py",
               # the embedding's fp32 cast that starts the fp32 residual stream
               "tests/test_fp32_residual.py"],
    "core": ["tests/test_errors.py", "tests/test_microbatches.py", "tests/test_parallel_state.py",
             "tests/test_cross_entropy_and_rng.py", "tests/test_collectives.py", "tests/test_offload_overlap.py",
             "tests/test_zero_gathered_parameters.py",  # zero.py: GatheredParameters, safe_get_full_grad
             "tests/test_host_collectives.py",  # collectives.all_reduce_host / broadcast_host / any_rank
             # errors.record_for_launcher / report_line under a real torchrun
             "tests/test_failures_launch.py::test_a_config_error_under_torchrun_is_its_root_cause"],
}
# Files never mutated; the reasons are in the module docstring.
SKIP = {"transformer/te_spec.py", "transformer/layer_specs.py", "checkpoint/hf_errors.py", "fusions/triton_norms.py",
        "fusions/triton_elementwise.py", "fusions/triton_cross_entropy.py"}
SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
         ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And}


@dataclass
class Mutant:
    path: str     # relative to the repository
    index: int    # the index-th mutation point of the file, in AST walk order
    line: int
    what: str


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside annotations and docstrings, which are never mutated."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
            annotations += [node.returns]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for a in annotations:
            if a is not None:
                skip.update(id(n) for n in ast.walk(a))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0]))
    return skip


def _points(tree: ast.AST) -> list[tuple[Any, str, object]]:
    """(node, description, how) for every mutation point of ``tree``, in a stable order."""
    skip = _annotation_nodes(tree)
    points: list[tuple[Any, str, object]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            points.append((node, f"{type(node.op).__name__} -> {SWAPS[type(node.op)].__name__}", "op"))
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in SWAPS:
                    points.append((node, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", k))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            points.append((node, "drop `not`", "not"))
        elif isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= 8:
            points.append((node, f"{node.value} -> {node.value + 1}", "int"))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            points.append((node, f"delete call `{ast.unparse(node.value)[:60]}`", "delete"))
    return points


class _Apply(ast.NodeTransformer):
    def __init__(self, target: Any, how: object) -> None:
        self.target, self.how = target, how

    def generic_visit(self, node: Any) -> Any:
        node = super().generic_visit(node)
        return self._mutate(node)

    def _mutate(self, node: Any) -> Any:
        if node is not self.target:
            return node
        if self.how == "op":
            node.op = SWAPS[type(node.op)]()
        elif isinstance(self.how, int):
            node.ops[self.how] = SWAPS[type(node.ops[self.how])]()
        elif self.how == "not":
            return node.operand
        elif self.how == "int":
            node.value += 1
        elif self.how == "delete":
            return ast.Pass()
        return node


def package_of(path: str) -> str:
    """The ``PACKAGES`` entry of a path relative to the repository (``megatron_core/X.py`` is "core")."""
    parts = path.split(os.sep)
    return parts[1] if len(parts) > 2 else "core"


def _files(root: str, package: str) -> list[str]:
    """The package's files relative to ``megatron_core/`` (SKIP included), sorted."""
    if package == "core":
        return sorted(CORE)
    folder = os.path.join(root, "megatron_core", package)
    return sorted(os.path.join(package, os.path.relpath(os.path.join(d, f), folder))
                  for d, _, fs in os.walk(folder) for f in fs)


def mutants(root: str = REPO) -> list[Mutant]:
    out = []
    for package in PACKAGES:
        for name in _files(root, package):
            if not name.endswith(".py") or name.endswith("__init__.py") or name in SKIP:
                continue
            path = os.path.join("megatron_core", name)
            tree = ast.parse(open(os.path.join(root, path)).read())
            for i, (node, what, _) in enumerate(_points(tree)):
                out.append(Mutant(path, i, getattr(node, "lineno", 0), what))
    return out


def mutated_source(source: str, index: int) -> str:
    tree = ast.parse(source)
    node, _, how = _points(tree)[index]
    tree = _Apply(node, how).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


def changed_lines(path: str, since: str, root: str = REPO) -> set[int]:
    """Line numbers of ``path`` (relative to the repository) added or changed since the commit ``since``.

    Read from the ``+c,d`` ranges of ``git diff -U0 since -- path`` (working tree against ``since``); a
    range with ``d == 0`` is a pure deletion and adds no line. Raises CalledProcessError for an unknown ``since``.
    """
    diff = subprocess.run(["git", "diff", "-U0", since, "--", path], cwd=root, capture_output=True, text=True,
                          check=True).stdout
    lines: set[int] = set()
    for header in (line for line in diff.splitlines() if line.startswith("@@ ")):
        start, _, count = header.split(" ")[2][1:].partition(",")
        lines.update(range(int(start), int(start) + (int(count) if count else 1)))
    return lines


def run_mutant(mutant: Mutant, timeout: float, tests: list[str] | None = None) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'timeout' | 'error', seconds, first failing test or the error); ``tests`` replaces
    the package's list. 'error': pytest ran no test (exit 3, 4, 5), which must not count as a kill."""
    path = os.path.join(REPO, mutant.path)
    original = open(path).read()
    package = package_of(mutant.path)
    start = time.monotonic()
    try:
        with open(path, "w") as f:
            f.write(mutated_source(original, mutant.index))
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *(tests or TESTS[package])]
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, ""
        failed = next((line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")), "")
        # pytest's exit codes: 1 tests failed, 2 collection error (a mutant that breaks an import) -- kills;
        # 5 no tests collected, 3 internal error, 4 usage error -- the run proved nothing.
        if proc.returncode in (0, 1, 2):
            return ("survived" if proc.returncode == 0 else "killed"), time.monotonic() - start, failed
        return "error", time.monotonic() - start, f"pytest exit {proc.returncode}"
    finally:
        with open(path, "w") as f:
            f.write(original)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, default=None, help="run this many mutants, drawn at random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample")
    parser.add_argument("--package", choices=PACKAGES, action="append", help="only these packages")
    parser.add_argument("--file", action="append",
                        help="only files whose path relative to megatron_core/ is this (e.g. engine/reshard.py)")
    parser.add_argument("--since", metavar="REV",
                        help="only mutants on lines added or changed since this commit (git diff -U0 REV)")
    parser.add_argument("--tests", nargs="+", metavar="TEST",
                        help="run these pytest files/ids against every mutant instead of its package's TESTS list")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant before it counts as killed")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--out", default="mutation_results.json", help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    todo = [m for m in mutants() if (args.package is None or package_of(m.path) in args.package)
            and (args.file is None or os.path.relpath(m.path, "megatron_core") in args.file)]
    if args.since is not None:
        try:
            changed = {path: changed_lines(path, args.since) for path in {m.path for m in todo}}
        except subprocess.CalledProcessError as exc:
            first = exc.stderr.strip().splitlines()[0]
            parser.error(f"--since {args.since}: {first} (give a commit of this repository)")
        todo = [m for m in todo if m.line in changed[m.path]]
    if args.sample is not None and args.sample < len(todo):
        todo = sorted(random.Random(args.seed).sample(todo, args.sample), key=lambda m: (m.path, m.index))
    if args.list:
        for m in todo:
            print(f"{m.path}:{m.line}  #{m.index}  {m.what}")
        print(f"{len(todo)} mutants")
        return 0
    results = []
    for n, m in enumerate(todo, 1):
        status, seconds, failed = run_mutant(m, args.timeout, args.tests)
        results.append({**asdict(m), "status": status, "seconds": round(seconds, 1), "caught_by": failed})
        print(f"[{n}/{len(todo)}] {status:8s} {seconds:6.1f} s  {m.path}:{m.line}  {m.what}  {failed}", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("\nsurvival by package:")
    for package in PACKAGES:
        mine = [r for r in results if package_of(r["path"]) == package]
        if mine:
            alive = [r for r in mine if r["status"] == "survived"]
            print(f"  {package:18s} {len(alive)}/{len(mine)} survived ({100 * len(alive) / len(mine):.0f}%)")
    alive = [r for r in results if r["status"] == "survived"]
    print(f"  {'all':18s} {len(alive)}/{len(results)} survived ({100 * len(alive) / max(len(results), 1):.0f}%)")
    for r in alive:
        print(f"  survivor: {r['path']}:{r['line']}  {r['what']}")
    errors = [r for r in results if r["status"] == "error"]
    for r in errors:
        print(f"  not tested ({r['caught_by']}): {r['path']}:{r['line']}  {r['what']}")
    if errors:
        print(f"error: {len(errors)} mutant(s) ran no test; check --tests (or the package's list in TESTS)",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
