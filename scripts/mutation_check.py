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

A mutant is killed when its directory's tests fail (``pytest -x``, fastest files first) or time out;
it survives when they pass. The target is under 10% survivors per directory. Survivors are printed
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

Survivors judged equivalent in the samples of 2026-11-30 (no test can tell them apart on a CPU machine):

- ``fusions/fused_dropout.py``: ``threshold - _LEVELS // 2`` -> ``+`` (the int16 comparison wraps the
  Python scalar to the same value); ``(n + 3) // 4`` -> ``(n + 4) // 4`` (one more raw draw, sliced
  off) or -> ``(n + 3) * 4`` (sixteen times the draws; a longer ``random_raw`` of the same generator
  starts with the same words, and the first n int16 are kept); ``_UINT64_MAX`` off by one bit
  (another seed -> mask mapping, still random). Not testable here rather than equivalent: the non-CPU
  branches (``F.dropout``, the Bernoulli mask), which need a device that computes values ('meta' does not).
- ``fusions/kernels.py``: the ``applies`` of Megatron-LM's ``scaled_masked_softmax_cuda`` (runs only
  when that compiled extension imports).
- ``fusions/onednn_linear.py``: ``has_bias and needs_input_grad[2]`` -> ``or`` (autograd drops a
  gradient for a bias that needs none); ``is_grad_enabled() and any(...)`` -> ``or`` (the same oneDNN
  product with or without the autograd Function).
- ``dist_checkpointing``: the test-only pause before publishing (``pause > 0 and error is None``,
  ``pause >= 0``: a sleep of 0 s either way); the reseed after a layout change ``seed + 7919 * dp_rank``
  -> ``-`` (as valid a convention: distinct per DP rank); ``chunk(stride)`` for ``stride >= 1``
  (``chunk(1)`` is the tensor);
  ``partition_dim``'s and ``partition_of``'s unreachable defaults; ``dp_size > 1`` -> ``>= 1`` before
  an all-reduce (over one rank it is the identity). ``dist.barrier()`` after rank 0 makes the temporary
  directory is a race no deterministic test shows. Still a missing test: deleting the all-reduce that
  makes every rank agree on the optimizer's step count (it needs a rank holding no optimizer state).
- ``checkpoint/hf_io.py``: ``os.makedirs`` before ``save_pretrained`` (which creates the directory).
- ``engine/library_configs.py``: deleting a ``_needs(...)`` call (seen: ``optimizer_cpu_offload``; the
  ``nvme_offload_path``, ``offload_param`` and stage-3 ones read the same): it raises only when the
  library's config class lacks the field, and every one is there (the tests take their other branch
  when one is missing). ``engine/checkpoint_files.py``: ``_dp_rank_of``'s -1 for a file name without a
  DP rank -> -2 (any negative sorts such a file before every DP rank; only the order is used).
- ``zero.py``: ``safe_get_full_grad``'s ``buffer.dp_size > 1`` -> ``>= 1`` before its all-reduce (over one
  rank the identity; the branch needs ZeRO-2/3, whose engine always has a process group).
- ``parallel_state.py``: the embedding group's ``[ranks[0], ranks[-1]] if len(ranks) > 1`` -> ``>= 1``
  (one stage gives ``[r, r]``, which ``sorted(set(...))`` makes ``[r]`` again).
- ``shm_collectives.py``: the "mapped" flag ``1`` -> ``2`` (only its MIN over the ranks is compared with 0).
  Not testable here rather than equivalent: the path where rank 0 cannot create the segment
  (``name[0] = f"!{exc}"``, ``rank == 0`` -> ``!=`` before its log line); it needs /dev/shm full or
  missing, which no test should do to the machine.
- ``device.py``: ``mallopt(M_MMAP_MAX, 0)`` -> ``1``: ``import torch`` already leaves glibc with mmapped
  chunks (6, by ``mallinfo2().hblks``), so a limit of 1 allows no new mmap either; ``_M_TRIM_THRESHOLD``
  -1 -> -2 (``M_TOP_PAD``): a 256 MiB top pad also keeps the freed heap top mapped (glibc trims down to
  the pad), a difference in resident memory and speed only; ``MCORE_FORCE_CPU == "1"`` -> ``!=``
  (without CUDA both give False: a GPU machine's difference). ``rng_tracker.py``: deleting
  ``device.manual_seed(seed)`` in ``model_parallel_manual_seed`` (on the CPU it is the
  ``torch.manual_seed(seed)`` of the line before; it seeds the CUDA generator). device.py stays in
  the check although its CUDA branches cannot run on these machines: its CPU paths (RNG state, the host
  allocator, the offload copy engine's worker thread) are reached by the ``core`` tests, and a mutant in
  a CUDA branch survives here by construction (not counted as a missing test; seen in the samples:
  ``CopyEngine.copy``'s side-stream ``copy_`` and ``after.wait()``, ``_CudaCopy.wait``'s synchronize).
- ``autotune/cost.py``: ``torch.set_num_threads(1)`` -> ``2`` in the forked ranks that time collectives
  (a measurement's speed, which no test can pin). Still a missing test: ``head_activation_bytes``'s
  ``shard = t if sequence_parallel else 1`` -> ``else 2``; the head's prediction is not held to measured
  saved tensors as the layer's is (measured head + embedding of a 16-token, h 32 model differ from it by
  944 B at TP 1 and -2032 B at TP 2 with SP: labels, per-token loss and SP's copies are not counted).
  ``memory.model_state_bytes`` with 16-bit gradients: now checked (tests/test_autotune_memory's
  bf16-grads-reduced-in-bf16 case; the step's fp32 copies are ``step_grad_copies``, measured inside
  the step, no longer counted in ``grads``, which ``memory_footprint`` sees after it), and
  ``grads_in_backward`` at every stage, measured at the end of backward (ZeRO-3 predicted ``2 * shard``
  where the framework holds the full buffer and the shard, as docs/zero.md says: fixed).
  ``autotune/cost.py``: the profiled head's labels drawn from
  ``[0, vocab)`` -> ``[1, vocab)`` (timing only). ``autotune/cli.py``: ``LAYOUT_FLAGS``' value counts
  1 -> 2 (a strip stops at the next ``--`` flag, and pretrain_gpt.py takes no positional arguments).

Sample of 2026-11-30 (fifth session: 24 mutants of the newest files, ``--file`` engine/reshard.py,
fusions/compiled.py, zero.py, checkpoint/optimizer_reshard.py, distributed/param_and_grad_buffer.py,
``--seed 1``): 5 survived. Three were missing tests, added since: ``safe_get_full_grad``'s copy of
``main_grad``/``.grad`` outside ZeRO-2/3 (its test compared ZeRO-2/3 with a ZeRO-0 reference that
was itself None under the mutant), the compiled fusions' backward probe, and the buffer's
``on_bucket_launched`` call (tests/test_offload_overlap.py counts those copies; it was not in the
``distributed`` list). Two are equivalent: deleting the ``finish_param_gathers()`` that opens
``ParamAndGradBuffer.all_gather_params`` (its one caller, the distributed optimizer's step, has
waited for every gather before writing the shards), and the compiled fusions' probe sizes
``range(2, 2 + ndim)`` -> ``range(3, ...)`` (any distinct sizes above 1 trace the same dynamic graph).
A second sample the same day (20 mutants of engine/reshard.py, engine/autotp.py,
datasets/builder.py, inference/server.py, ``--seed 2``): 6 survived, 5 of them missing tests, added
since: AutoTP's refusal of Llama heads and of a GPT-2 without its LM head, the server's "serving PUT"
line and its stop message at a world of 2 (the Ctrl-C test), and the blend check (its test was not in
the ``datasets`` list). Equivalent: the server's ``--help`` description taken from another paragraph
of the module docstring (``split("\n\n")[0]`` -> ``[1]``).
A third sample (16 mutants of the engine's checkpoint/consolidate, convert.py and the server,
``--seed 3``): 4 survived, 3 missing tests, added since: ``save_16bit_model`` written by a rank other
than 0 (tested at DP 2 only, where rank 1 writes the same file; now also in one process), the failing
rank's traceback on the server's stderr, and the server's request lock shared with the stop message
(a Ctrl-C during a generation now in the fault test). Equivalent in practice: the optimizer files'
coverage check ``covered.get(name, 0)`` -> ``1`` (differs only for a one-element parameter missing
from every file).
A fourth sample (sixth session: the mutants on the lines changed that session, picked by line range,
not ``--sample``: engine/config.py's ``_old_zero_names``/``_offload``/``_zero`` 21, library_configs.py's
``offload_key`` and its callers 21, checkpoint_files.py 16, checkpoint.py's save (recovery script) and
load (return path and after) 33, fused_dropout.py's ``keep_threshold``/``keep_mask`` 15, zero.py's
``safe_get_full_grad`` 19; ParamAndGradBuffer.has_grads has no mutation point (bool constants), its two
assignments were deleted by hand): 125 mutants, 15 survived, 8 of them missing tests, added since: the offload
section's own key check (an unknown and an unimplemented key), the stage default 0 and
``OffloadSection.buffer_count``'s default (an empty ``zero_optimization`` equals ``ZeroSection()``),
``buffer_count``'s minimum 1, the ``offload_param`` stage check at stage 3 (the older keys mapped there),
the recovery script's temporary removed when its rename fails (which also kills ``ps.rank == 0`` ->
``!= 0`` / ``== 1`` before the copy: a one-process save wrote no script), the weights-only load's
``reload_model_params`` and the optimizer groups' restore (``group.update``). The hand-deleted
``has_grads`` assignments fail only test_zero_gathered_parameters.py, now in the ``distributed`` list.
Equivalent (7): the four ``_needs`` deletions, ``_dp_rank_of``'s -2, ``(n + 3) * 4`` draws and
``dp_size >= 1`` (above).
A fifth sample (seventh session, ``--seed 4``: engine/consolidate.py 20 of 88, engine/reshard.py 16 of
22, engine/zero_to_fp32.py all 4, collectives.py all 18; each mutant run first against the test files of
its own file, the survivors of consolidate.py then against the ``engine`` list): 58 mutants, 14 survived,
11 of them missing tests, added since: ``--max_shard_size``'s units (``"B": 1`` -> 2, ``KiB`` ``2 ** 10``
-> ``3 ** 10``; no test called ``parse_size``), the umask left changed by a safetensors output (its
restoring ``os.umask`` deleted), a shard filled to exactly the limit (``>`` -> ``>=``; now grouped as
``huggingface_hub.split_torch_state_dict_into_shards``), the keys of another model passed through a
load at another AutoTP size (``or`` -> ``and`` raised a KeyError instead of the strict load's one line),
``collectives.failures``/``lowest_failure`` (five mutants: no test called them at world 2 or without a
process group), and ``_ChunkOnWait``'s wait on gloo's own asynchronous all-reduce (with
``MCORE_SHM_COLLECTIVES=0``; the shared-memory one is done when it returns). Equivalent (3):
``consolidate._write_file``'s ``os.umask(0)`` -> ``os.umask(1)`` (the umask is only read: set back on the next
line, nothing created in between); ``collectives.reduce_scatter_flat``'s ``get_backend(group) != "gloo"`` ->
``==`` (on gloo torch's own reduce-scatter gives the same sum; the all-reduce is taken for speed, the module
docstring's measurement, and summing in a scratch ``full`` is allowed, not promised); ``failures``'
``get_world_size(group) > 1`` -> ``>= 1`` (an ``all_gather_object`` over one rank returns its own failure).
The same session's 15 of inference/server.py's 110 (``--seed 4``, against test_text_generation_server.py):
14 killed; the survivor is the ``--help`` description's ``split("\n\n")[0]`` -> ``[1]``, equivalent (above).
A sixth sample (seventh session, ``--seed 5``, the mutants on the lines changed since 3b64eb8, each run against its
own module's test files): engine/lr_schedules.py 24 of 86 (12 more at ``--seed 6``, all killed),
engine/scheduler_config.py 13 of 26, optimizer/optimizer.py 12 of 17, training/lr_scheduler.py all 12,
optimizer/grad_scaler.py all 10, engine/client_objects.py all 6 and hf_tokenizer.py all 4, with 7 more of each of
these two files' other mutants: 95 mutants, 12 survived, 11 of them missing tests, added since: OneCycle's
``decay_step_size`` default 0 -> 1 and ``isclose(decay_step_size, 0)`` -> 1 (decay rates without a step size: no
decay, as DeepSpeed; through the config and built directly), the scheduler section's ``cycle_max_lr`` requirement,
its ``total_num_steps`` minimum 1 (and ``warmup_num_steps``'s minimum 0 -> 1 was DeepSpeed's behaviour: its warmup
schedulers refuse 0; the section now does too), the decoupled bounds dropped when a kept checkpoint schedule has
none (the two ``group.pop``), the loss scaler's ``loss_scale_window`` 1 (``growth_tracker > 1`` -> ``> 2``), a
``tokenizer.model`` alone read as the bare SentencePiece model (``and has_config`` -> ``or``), and the client
optimizer's coverage check and ``groups[1:]`` hyper-parameter check. Not a missing test but dead code:
``hf_tokenizer.copy_tokenizer_files`` (deleting its copy survived: nothing called it; the function is removed).

A seventh sample (eighth session, ``--seed 7``: the mutants on the lines changed since edc7f1a, listed
by ``git diff -U0`` line ranges, 240 in all, and a sample of each file's: 38 run, each against the test
files of its change rather than its directory's list): iteration_hooks.py 4 of 5 killed, training_log.py
4/4, timers.py 1 of 2, pretrain.py 1 of 4, training_loop.py 0 of 3, arguments/validate.py 3/3, device.py
1/1, optimizer.py 2/2 (test_megatron_run_flags.py, test_decoupled_lr.py), rope.py 4 of 5, hf_llama.py 2
of 3 (test_rope_scaling.py, test_hf_equivalence.py), hf_io.py 4/4 (test_hf_export.py), megatron_flags.py
2/2 (test_text_generation_cli.py): 10 survived. Killed by tests outside those files (3):
``_wait_for_save``'s ``request.wait()`` (test_pretrain_dist_ckpt.py's async save), ``_name_a_lost_peer``'s
``not is_peer_loss`` (test_failures_launch.py) and ``learning_rates``' ``or []`` -> ``and []``
(test_decoupled_lr.py). Missing tests (5), added since: the profiler's ``stop()`` (a run ending inside
the ``--profile`` window lost its trace; test_megatron_run_flags.py), ``timing_string``'s format (no test
used ``--timing-log-level 1``), the iteration time ``perf_counter() - began`` -> ``+`` (the log's regex
took any number; now bounded by the run's wall time, test_pretrain.py), ``evaluate``'s shutdown of its
DataLoader iterators (a peer killed during an evaluation; test_failures_launch.py) and the Llama export's
refusal of both RoPE scalings at once (test_hf_export.py). Equivalent (2): ``llama3_scaled``'s
``wavelength > low_wavelength`` -> ``>=`` (differs only at a wavelength of exactly 8192, which no
``base ** (-2i / d)`` gives in float32: none for bases 1e4, 5e5, 1e6 and head dims 16 to 256), and
deleting ``train_step``'s ``device.empty_cache()`` (a CUDA call; nothing on the CPU). Not run: device.py's
Nsight calls (``cuda_profiler_start``/``stop``), CUDA only. test_megatron_run_flags.py (about 40 s) is
now in the ``training`` list and test_rope_scaling.py in the ``transformer`` one: no listed test used
the flags of iteration_hooks.py. A second draw (``--seed 8``, 3 more of each of pretrain.py,
training_loop.py, iteration_hooks.py): 7 run, 6 killed (the interval ``_save`` deletion by
test_checkpointing.py); training_loop.py's two others drawn only gate ``device.empty_cache()``
(``empty_unused_memory_level >= 2`` -> ``>= 3`` and the call deleted: CUDA only, not run). Equivalent:
``_log_iteration``'s ``tensorboard_dir is not None and ...`` -> ``or`` (the params norm is then computed,
on every rank alike, at iterations whose line does not show it: the same output at one more reduction's cost).

An eighth sample (ninth session, ``--since 7b90a5b --seed 9``, each file's mutants run against the new test
files of its change via ``--tests``): gpt_dataset.py 12 of 25 (test_document_masks.py), data_loading.py all
4 and training/config.py both 2 (test_document_masks.py), fused_layer_norm.py 10 of 16 (test_layernorm_1p.py,
test_fp32_residual.py: all killed), transformer_layer.py both 2 (test_fp32_residual.py), hf_io.py 3 of 8
(test_layernorm_1p.py; the survivor, the config's dtype ``len(dtypes) == 1`` -> ``== 2``, is killed by
test_hf_export.py), timers.py 10 of 22 (test_timing_log_option.py), distributed_data_parallel.py 7 of 12
(test_ddp_same_model.py: all killed), collectives.py 7 of 18 (test_host_collectives.py), autotune
activations.py + cost.py 6 of 36 (the document-mask and cores tests), and by hand three more of
``usable_cores`` and four in unmutated places (the embedding's fp32 cast deleted, ``pipeline_communication_dtype``
ignoring ``fp32_residual_connection``, pretrain_gpt's ``attention_mask=None`` to the model, and an all-False
mask for a chunk without data instead of None): 70 mutants, 12 survived. Missing tests (8), added since: the
EOD check and ``every_chunk_reads_data`` with either flag alone (``or`` -> ``and``, two mutants), an empty
document among the probed ones (``lengths[i] > 0`` -> ``>=``: an IndexError), ``data_iterators``' None for a
middle chunk (``or`` -> ``and``), ``_bias_dropout_add``'s cast to the fp32 stream (without it the bf16 branch
and bias are added in bf16; promotion keeps the result fp32, so no dtype test saw it), ``slowest`` leaving out
a timer no rank ran (``> 0.0`` -> ``>=``), ``usable_cores``' ``len(...) or 1`` -> ``and 1`` (its test sets one
core, where both give 1) and the middle chunks' mask without the flags. Not testable here (3):
``all_reduce_host``'s ``host.copy_(piece)`` (on the CPU each piece is a view of the host tensor, so the
branch runs only on a GPU) and ``usable_cores``' fallback ``os.cpu_count() or 1`` (two mutants: platforms
without ``sched_getaffinity``). Equivalent (1): ``usable_cores``' ``or 1`` -> ``or 2`` (a running process's
affinity mask is never empty).

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
                    "tests/test_ddp_same_model.py"],
    "optimizer": ["tests/test_optimizer.py", "tests/test_memory.py", "tests/test_zero.py",
                  "tests/test_mixed_precision.py", "tests/test_decoupled_lr.py",
                  # grad_scaler's consecutive_hysteresis and DeepSpeed's window; the engine's param groups
                  "tests/test_engine_ds_compat.py"],
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
                           "test_no_save_optim_and_no_save_rng_leave_them_out_of_torch_dist_as_the_legacy_format"],
    "fusions": ["tests/test_onednn_linear.py", "tests/test_triton_kernels.py", "tests/test_compiled_fusions.py",
                "tests/test_transformer_units.py",
                # fused_layer_norm's zero_centered_gamma and its fp32-stream path
                "tests/test_layernorm_1p.py", "tests/test_fp32_residual.py"],
    "engine": ["tests/test_engine_config.py", "tests/test_engine_config_offload.py", "tests/test_engine_api.py",
               "tests/test_engine.py", "tests/test_engine_checkpoint.py", "tests/test_engine_consolidate.py",
               "tests/test_engine_load_options.py", "tests/test_engine_checkpoint_damage.py",
               "tests/test_engine_autotp.py",
               "tests/test_engine_frozen_params.py", "tests/test_engine_autotp_reshard.py", "tests/test_weights_dir.py",
               "tests/test_engine_ds_compat.py", "tests/test_engine_lr_range_one_cycle.py",
               "tests/test_engine_scheduler_config.py",
               "tests/test_clean_exit.py::test_engine_scripts_exit_cleanly_without_tearing_down"],
    "training": ["tests/test_arguments.py", "tests/test_lr_scheduler.py", "tests/test_pretrain_deepspeed_config.py",
                 "tests/test_pretrain_errors.py",
                 "tests/test_checkpointing.py", "tests/test_pretrain.py", "tests/test_failures_training.py",
                 "tests/test_pretrain_dist_ckpt.py", "tests/test_decoupled_lr.py",
                 # --manual-gc, --profile, --log-params-norm and the TensorBoard extras (iteration_hooks.py)
                 "tests/test_megatron_run_flags.py",
                 # --timing-log-option (timers.gather_means, the minmax/max/all blocks)
                 "tests/test_timing_log_option.py",
                 # every pipeline chunk reads the data under document masks (data_loading, config)
                 "tests/test_document_masks.py",
                 # the Theoretical memory footprints line (training_log.theoretical_memory_line)
                 "tests/test_theoretical_memory.py"],
    "datasets": ["tests/test_datasets.py", "tests/test_preprocess_data.py", "tests/test_failures_data.py",
                 # the blend whose split is empty in some prefixes only (builder._check_blend_splits)
                 "tests/test_pretrain_test_split.py",
                 # --reset-position-ids / --reset-attention-mask / --eod-mask-loss (gpt_dataset)
                 "tests/test_document_masks.py"],
    "tokenizer": ["tests/test_tokenizer.py", "tests/test_preprocess_data.py", "tests/test_tokenizer_hf_dir.py"],
    "inference": ["tests/test_generation.py", "tests/test_text_generation_cli.py",
                  "tests/test_text_generation_server.py", "tests/test_text_generation_client.py",
                  "tests/test_text_generation_layouts.py", "tests/test_text_generation_server_port.py"],
    # the schedule replay checks activations.in_flight against the activations the schedules hold
    "autotune": ["tests/test_pipeline_schedule_order.py", "tests/test_autotune_search.py",
                 "tests/test_autotune_memory.py", "tests/test_autotune_cli_errors.py",
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
    """('killed' | 'survived' | 'timeout', seconds, first failing test); ``tests`` replaces the package's list."""
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
        return ("survived" if proc.returncode == 0 else "killed"), time.monotonic() - start, failed
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
