#!/bin/bash
# Multi-node launch with torchrun (2 nodes x 8 GPUs). Run the same command on every node:
#
#   MASTER=node0.example.org ./examples/torchrun/run_2nodes.sh        # from the repo root
#
# Lightning detects the torchelastic environment (TorchElasticEnvironment) from the variables
# torchrun sets; --trainer.devices must equal --nproc-per-node and --trainer.num_nodes --nnodes.
# Extra arguments are passed on to `blueedit fit`.
set -euo pipefail

: "${MASTER:?set MASTER to the hostname or IP of the rendezvous node}"
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
RDZV_PORT=${RDZV_PORT:-29500}
RDZV_ID=${RDZV_ID:-blueedit-$USER}
CONFIG=${CONFIG:-examples/slurm/llama3_8b_ddp.yaml}

# Shared filesystem: the statistics written by the first run are reused by all later runs.
export BLUEEDIT_CACHE=${BLUEEDIT_CACHE:-/shared/$USER/blueedit-cache}
export HF_HOME=${HF_HOME:-$BLUEEDIT_CACHE/hf}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false

exec torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-id "$RDZV_ID" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$MASTER:$RDZV_PORT" \
    -m blueedit fit --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" "$@"
