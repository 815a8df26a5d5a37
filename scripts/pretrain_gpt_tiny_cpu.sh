#!/bin/bash
# A tiny GPT (4 layers, hidden 128, ~1M parameters) on one CPU process, on the demo's data
# (Python standard library sources, a 1024-token SentencePiece tokenizer). The data is generated
# on first use. Megatron-LM's flags, grouped as in its example scripts; extra flags are appended
# (e.g. --train-iters 50). Rerunning resumes from the last checkpoint in $DEMO_DIR/checkpoints_tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo_output}
# One thread keeps a steady pace on a shared 2-core machine (busy threads spin-wait); raise it on your own.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$DEMO_DIR/demo_data.json" ]; then
    python pretrain_gpt.py --demo-prepare-only --demo-dir "$DEMO_DIR"
fi

GPT_MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128
)
TRAINING_ARGS=(
    --micro-batch-size 8 --global-batch-size 16 --train-iters 500
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.02 --clip-grad 1.0
    --lr 2e-3 --lr-decay-style cosine --min-lr 2e-4 --lr-warmup-iters 20
    --hidden-dropout 0.0 --attention-dropout 0.0
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
)
DATA_ARGS=(
    --data-path "$DEMO_DIR/stdlib_text_document" --split 98,2,0 --num-workers 0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DEMO_DIR/tokenizer.model"
)
EVAL_AND_LOGGING_ARGS=(
    --log-interval 10 --eval-interval 100 --eval-iters 8
    --save-interval 100 --save "$DEMO_DIR/checkpoints_tiny" --load "$DEMO_DIR/checkpoints_tiny"
    --tensorboard-dir "$DEMO_DIR/tensorboard_tiny"
)

python pretrain_gpt.py \
    "${GPT_MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
