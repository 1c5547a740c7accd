"""Distributed setup shared by every stage.

``init_distributed()`` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) or, inside an ``srun`` job step only, SLURM's (SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID; MASTER_ADDR and MASTER_PORT exported by the sbatch
script), picks NCCL when CUDA is available and gloo otherwise, and returns a
:class:`DistInfo`.  With none of those variables it runs as a single process without
creating a process group.  Nothing here runs at import time.

An sbatch batch shell or a salloc shell also has SLURM_NTASKS and SLURM_PROCID=0 (of the
whole job); a stage run there is one process, not rank 0 of SLURM_NTASKS, so SLURM's
variables count only where SLURM_STEP_ID names a task step.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlcd_train.utils.errors import MLCDError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise MLCDError(f"environment variable {n}={v!r}: expected an integer") from None
    return None


# Step ids from 0xfffffff0 up are SLURM's special steps (batch script, extern, interactive,
# pending: 0xfffffffa-0xffffffff across versions), never an srun task step.
_SLURM_SPECIAL_STEP = 0xFFFFFFF0


def _slurm_task_step() -> bool:
    """True inside an ``srun`` job step: SLURM_STEP_ID set and a real (numeric) task step."""
    v = os.environ.get("SLURM_STEP_ID", "").strip()
    return v.isdigit() and int(v) < _SLURM_SPECIAL_STEP


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or SLURM variables; (0, 1, 0) otherwise.

    SLURM's count only inside an srun step (see the module docstring); the world size is the
    step's task count, SLURM_STEP_NUM_TASKS (SLURM_NTASKS only where that is absent).
    """
    rank = _env_int("RANK")
    world = _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK")
    if rank is None and _slurm_task_step() and os.environ.get("MASTER_ADDR"):
        world = _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        rank, local = _env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID")
        if world is None or rank is None:
            return 0, 1, 0
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local or 0))
    return rank or 0, world or 1, local or 0


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun/SLURM; idempotent.

    ``device``: "cpu", "cuda" or None (CUDA when available).  ``backend``: None picks NCCL
    for CUDA and gloo for CPU.
    """
    rank, world, local = world_from_env()
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local % max(torch.cuda.device_count(), 1))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1:
        backend = backend or ("nccl" if use_cuda else "gloo")
        if not dist.is_initialized():
            kw = {}
            if use_cuda and backend == "nccl":
                kw["device_id"] = dev
            dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s), **kw)
        return DistInfo(rank, world, local, dev, backend)
    return DistInfo(0, 1, local, dev, None)


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
