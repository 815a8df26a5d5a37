#!/bin/bash
# Launch pretrain_gpt.py on several nodes with torchrun's c10d rendezvous (docs/multinode.md).
# Run the same command on every node; the flags after the script go to pretrain_gpt.py:
#
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0.cluster:29500 \
#       scripts/pretrain_gpt_multinode.sh --tensor-model-parallel-size 8 --num-layers 24 ...
#
# NNODES          number of nodes (or MIN:MAX for an elastic range)            required
# RDZV_ENDPOINT   host:port that every node can reach; the agent there hosts the rendezvous store   required
# NPROC_PER_NODE  processes per node (default: the GPUs nvidia-smi lists, else 1)
# RDZV_ID         job id shared by the nodes (default: $SLURM_JOB_ID, else "mcore")
# MAX_RESTARTS    torchrun restarts of the whole worker group after a failure (default 0)
# PYTHON          the interpreter (default: python)
# Over gloo (CPU), set GLOO_SOCKET_IFNAME to the network interface the nodes share if the host name
# resolves to an unusable one; NCCL_SOCKET_IFNAME likewise for NCCL.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the node that hosts the rendezvous}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-${SLURM_JOB_ID:-mcore}}" \
    --max_restarts "${MAX_RESTARTS:-0}" \
    "$REPO/pretrain_gpt.py" "$@"
