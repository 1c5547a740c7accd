# Sourced by the launch scripts: picks the Python, builds torchrun's fault-tolerance flags and
# prints the environment a distributed run depends on (NCCL settings first: most multi-node
# failures are an interface or InfiniBand setting).
PYTHON=${PYTHON:-python}
# Forward SIGUSR1 (SLURM's usual warning signal) as well as SIGTERM to the workers, and give
# them time to write a checkpoint before torchrun's SIGKILL (default 30 s: too short for a
# bigG run with a million class centres).
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-300}
MAX_RESTARTS=${MAX_RESTARTS:-3}
TORCHRUN_FT=(--max-restarts "$MAX_RESTARTS")
if $PYTHON -m torch.distributed.run --help 2>/dev/null | grep -q -- "--signals-to-handle"; then
    TORCHRUN_FT+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" --shutdown-timeout "$SHUTDOWN_TIMEOUT")
fi
# Sensible defaults; override any of them in the environment.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# With torchrun's c10d rendezvous, workers share the agent's TCP store; after a restart they
# can read the previous attempt's NCCL / gloo addresses from it and fail to connect
# (pytorch/pytorch#135712).  A store of their own per attempt avoids that.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

gpus_here() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | wc -l; else echo 1; fi
}

print_env() {
    echo "== mlcd launch on $(hostname) at $(date -u +%FT%TZ)"
    echo "   torchrun flags: ${TORCHRUN_FT[*]}"
    local v
    for v in $(env | grep -E '^(NCCL_|TORCH_NCCL_|TORCH_DISTRIBUTED|TORCH_DISABLE_SHARE|GLOO_|MASTER_|CUDA_VISIBLE_DEVICES|OMP_NUM_THREADS|SLURM_JOB_ID|SLURM_NNODES|SLURM_NODEID)' | cut -d= -f1 | sort); do
        echo "   $v=${!v}"
    done
    [ -z "${NCCL_SOCKET_IFNAME:-}" ] && echo "   (NCCL_SOCKET_IFNAME unset: NCCL picks an interface; set it, e.g. ib0 or eth0, if ranks cannot connect)"
    [ -z "${NCCL_IB_HCA:-}" ] && echo "   (NCCL_IB_HCA unset: NCCL uses every InfiniBand adapter it finds)"
    return 0
}
