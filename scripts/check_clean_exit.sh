#!/bin/bash
# Clean exit of short multi-rank runs, repeated (issue #16, item 8): a 2-rank torchrun must exit 0
# every time, with no "terminate called" (gloo's abort at exit) in its output.
#
#   scripts/check_clean_exit.sh [RUNS]     (default 50; run by hand or nightly, not in CI)
#
# The runs cycle over three layouts: PP 2 with --finetune from a checkpoint (the run that once
# aborted), DP 2 with --overlap-grad-reduce, and DP 2 with ZeRO-1 (--use-distributed-optimizer) and
# overlap. Prints one line per run and a summary; exits 1 if any run failed. CPU heavy: one thread
# per rank (OMP_NUM_THREADS=1 unless set).
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-50}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
WORK=$(mktemp -d /tmp/clean-exit.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

TINY=(--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32
      --micro-batch-size 2 --global-batch-size 8 --lr 3e-3 --mock-data --vocab-size 255 --log-interval 1
      --eval-iters 0 --num-workers 0 --seed 7)
launch() {  # launch LOG ARGS...: a 2-rank torchrun of pretrain_gpt.py
    local log=$1; shift
    python -m torch.distributed.run --standalone --nproc_per_node 2 pretrain_gpt.py "${TINY[@]}" "$@" >"$log" 2>&1
}

# The checkpoint the --finetune runs start from.
if ! launch "$WORK/setup.log" --pipeline-model-parallel-size 2 --train-iters 2 --save "$WORK/ckpt" --save-interval 2; then
    echo "setup run failed:"; tail -20 "$WORK/setup.log"; exit 1
fi

LAYOUTS=("pp2-finetune" "dp2-overlap" "dp2-zero1-overlap")
failed=0; aborted=0
for ((i = 0; i < RUNS; i++)); do
    layout=${LAYOUTS[$((i % 3))]}
    case $layout in
        pp2-finetune) args=(--pipeline-model-parallel-size 2 --load "$WORK/ckpt" --finetune --train-iters 2) ;;
        dp2-overlap) args=(--overlap-grad-reduce --train-iters 2) ;;
        dp2-zero1-overlap) args=(--use-distributed-optimizer --overlap-grad-reduce --train-iters 2) ;;
    esac
    start=$(date +%s.%N)
    launch "$WORK/run.log" "${args[@]}"; rc=$?
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    note=""
    if grep -q "terminate called" "$WORK/run.log"; then aborted=$((aborted + 1)); note=" terminate called"; fi
    if [ "$rc" -ne 0 ] || [ -n "$note" ]; then
        failed=$((failed + 1)); cp "$WORK/run.log" "/tmp/clean-exit-failure-$i.log"
        note="$note (log: /tmp/clean-exit-failure-$i.log)"
    fi
    printf "run %3d  %-18s exit %d  %5.1f s%s\n" "$((i + 1))" "$layout" "$rc" "$seconds" "$note"
done
echo "clean exits: $((RUNS - failed)) of $RUNS (failed $failed, of which 'terminate called' $aborted)"
[ "$failed" -eq 0 ]
