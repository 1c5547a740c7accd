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
# With torchrun's c10d rendezvous, workers share the agent's TCP store, which keeps the previous
# attempt's NCCL / gloo addresses after a restart (pytorch/pytorch#135712).  Every mlcd stage
# builds its group under a fresh key prefix per attempt (mlcd_train/utils/dist.py), so restarts
# work either way; this setting (rank 0 hosts a store of its own per attempt) is kept as a
# second line of defence for anything else the workers run.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

# GPUs this process may use: the entries of CUDA_VISIBLE_DEVICES when it is set (empty: none;
# like CUDA, counting stops at an invalid entry such as -1), otherwise the GPUs nvidia-smi
# lists (physical GPUs: a GPU split into MIG instances counts once), 0 without nvidia-smi.
# An nvidia-smi that is present but fails (driver not loaded, ...) is an error, not a silent
# CPU run: a message on stderr and status 1; set GPUS to bypass it.
gpus_here() {
    local n=0 d out
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        local IFS=,
        for d in $CUDA_VISIBLE_DEVICES; do
            d=${d//[[:space:]]/}
            case $d in ''|-*|NoDevFiles) break ;; esac
            n=$((n + 1))
        done
        echo "$n"
        return 0
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1; then echo 0; return 0; fi
    if ! out=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>&1); then
        echo "mlcd launch: nvidia-smi failed: ${out:-no output}" >&2
        echo "mlcd launch: fix the NVIDIA driver, or set GPUS=N (processes per node; e.g. GPUS=1 with train.device=cpu)" >&2
        return 1
    fi
    printf '%s\n' "$out" | grep -c '[^[:space:]]' || true
}

# Processes to start on this node by default: one per GPU, or one CPU process without GPUs.
procs_here() {
    local n
    n=$(gpus_here) || return 1
    if [ "$n" -eq 0 ]; then
        echo "mlcd launch: no GPU visible; starting 1 process (CPU)" >&2
        n=1
    fi
    echo "$n"
}

# OpenMP threads per process: CPUS / PROCS, at least 1 (4 CPUs for 8 GPUs must not give 0).
threads_per_proc() {
    local cpus=${1:-} procs=${2:-}
    [[ $cpus =~ ^[0-9]+$ ]] || cpus=1
    [[ $procs =~ ^[0-9]+$ ]] && [ "$procs" -gt 0 ] || procs=1
    local t=$((cpus / procs))
    [ "$t" -ge 1 ] || t=1
    echo "$t"
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
