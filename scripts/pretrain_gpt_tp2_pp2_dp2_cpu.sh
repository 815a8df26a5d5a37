#!/bin/bash
# The tiny GPT on 8 CPU ranks: tensor parallel 2 x pipeline parallel 2 x data parallel 2, with the
# distributed optimizer (ZeRO-1) and sequence parallelism, over gloo. Same demo data as
# pretrain_gpt_tiny_cpu.sh (generated on first use); extra flags are appended.
# The 8 ranks share this machine's cores: one thread each (OMP_NUM_THREADS), so expect it to be
# slower than the one-process run on a 2-core machine; it shows the layout, not a speed-up.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-demo_output}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -f "$DEMO_DIR/demo_data.json" ]; then
    python pretrain_gpt.py --demo-prepare-only --demo-dir "$DEMO_DIR"
fi

DISTRIBUTED_ARGS=(
    --nproc_per_node 8 --nnodes 1 --master_addr localhost --master_port "${MASTER_PORT:-29500}"
)
GPT_MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4
    --seq-length 128 --max-position-embeddings 128
)
TRAINING_ARGS=(
    --micro-batch-size 4 --global-batch-size 16 --train-iters 100
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --init-method-std 0.02 --clip-grad 1.0
    --lr 2e-3 --lr-decay-style cosine --min-lr 2e-4 --lr-warmup-iters 10
    --hidden-dropout 0.0 --attention-dropout 0.0
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    --sequence-parallel --use-distributed-optimizer --distributed-backend gloo
)
DATA_ARGS=(
    --data-path "$DEMO_DIR/stdlib_text_document" --split 98,2,0 --num-workers 0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DEMO_DIR/tokenizer.model"
)
EVAL_AND_LOGGING_ARGS=(
    --log-interval 10 --eval-interval 50 --eval-iters 4
    --save-interval 50 --save "$DEMO_DIR/checkpoints_tp2_pp2_dp2" --load "$DEMO_DIR/checkpoints_tp2_pp2_dp2"
)

torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py \
    "${GPT_MODEL_ARGS[@]}" "${TRAINING_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" \
    "${DATA_ARGS[@]}" "${EVAL_AND_LOGGING_ARGS[@]}" "$@"
