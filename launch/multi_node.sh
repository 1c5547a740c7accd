#!/usr/bin/env bash
# Several machines, c10d rendezvous.  Run the SAME command on every node:
#   MASTER_ADDR=node0 NNODES=4 launch/multi_node.sh --config vit_l14_paper output_dir=/shared/runs/l14 ...
# Environment:
#   MASTER_ADDR   host of the rendezvous (any one of the nodes; required)
#   MASTER_PORT   its port (default 29500), reachable from every node
#   NNODES        number of nodes, or MIN:MAX for an elastic range (required)
#   GPUS          processes per node (default: all GPUs of this node)
#   RDZV_ID       job id shared by all nodes (default mlcd-$MASTER_ADDR-$MASTER_PORT)
#   MAX_RESTARTS  restarts of the whole group after a failure (default 3); every restart
#                 resumes from the newest complete checkpoint in output_dir
# output_dir must be on a file system every node sees (checkpoints are written by every rank).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
: "${NNODES:?set NNODES (number of nodes)}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS=${GPUS:-$(procs_here)}
RDZV_ID=${RDZV_ID:-mlcd-$MASTER_ADDR-$MASTER_PORT}
print_env
exec $PYTHON -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    "${TORCHRUN_FT[@]}" -m mlcd_train.train "$@"
