#!/usr/bin/env bash
# Run `stemdist denoise` under torchrun, on one node or on several.
#
# One node, 4 GPUs:
#   launch/torchrun.sh 4 cube.zarr --out runs/cube --config default
# Several nodes (run the same line on every node; NODE_RANK = 0 .. NNODES-1, MASTER_ADDR = node 0):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 launch/torchrun.sh 4 cube.zarr --out runs/cube
# Resume after an interruption: the same command with --resume.
# CPU-only (tests, laptops): add --accelerator cpu; processes then talk over gloo.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC_PER_NODE INPUT --out RUN_DIR [stemdist denoise options]}
shift
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ]; then
  exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m stemdist denoise "$@"
fi
exec torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}" \
  -m stemdist denoise "$@"
