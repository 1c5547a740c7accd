#!/usr/bin/env bash
# One machine, every GPU: launch/single_node.sh --config vit_b32_paper output_dir=runs/b32 key=value ...
#   GPUS=4 launch/single_node.sh ...      (default: one process per visible GPU, see gpus_here in
#                                          common.sh; 1 without GPUs; CPU: GPUS=2 trains on 2 gloo ranks)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
GPUS=${GPUS:-$(procs_here)}
print_env
exec $PYTHON -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$GPUS" \
    "${TORCHRUN_FT[@]}" -m mlcd_train.train "$@"
