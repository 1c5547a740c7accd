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

**Restarts under torchrun.**  With torchrun's c10d rendezvous (``--standalone``, or
``--rdzv-backend c10d``) and its default static one, every worker is a client of one TCP
store that the torchrun agent hosts for the whole job (``TORCHELASTIC_USE_AGENT_STORE=True``).
After ``--max-restarts`` restarts the group, that store still holds the previous attempt's
keys, gloo's and NCCL's addresses included: a plain ``init_process_group`` reads the dead
workers' addresses and fails or waits (pytorch/pytorch#135712; torch's own workaround is
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).  ``init_distributed`` therefore never lets the
process group use the agent's store as it is: the ranks first agree on a fresh key prefix
of their own (:func:`_join_attempt`) and build the group under it, so a restart works with or
without that variable, whatever the restart counts of the nodes say.

**Time limits** (seconds, environment): ``MLCD_DIST_START_TIMEOUT`` (default 600) bounds
forming the group: connecting to the store, every rank joining, the backend's connections;
``MLCD_DIST_TIMEOUT`` (default 1800) bounds every collective of the run.  Past either, the
stage stops with an :class:`MLCDError` naming the variable, not a silent wait.
"""
from __future__ import annotations

import atexit
import datetime
import os
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlcd_core.errors import MLCDError


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


START_TIMEOUT_VAR, TIMEOUT_VAR = "MLCD_DIST_START_TIMEOUT", "MLCD_DIST_TIMEOUT"
DEFAULT_START_TIMEOUT_S, DEFAULT_TIMEOUT_S = 600.0, 1800.0


def _env_seconds(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        s = float(v)
    except ValueError:
        s = float("nan")
    if not s > 0 or s == float("inf"):
        raise MLCDError(f"environment variable {name}={v!r}: expected a positive number of seconds")
    return s


def dist_timeouts() -> tuple[float, float]:
    """(start-up, collective) time limits in seconds from MLCD_DIST_START_TIMEOUT / MLCD_DIST_TIMEOUT."""
    return (_env_seconds(START_TIMEOUT_VAR, DEFAULT_START_TIMEOUT_S),
            _env_seconds(TIMEOUT_VAR, DEFAULT_TIMEOUT_S))


def _uses_agent_store() -> bool:
    """True when torchrun's agent hosts the store at MASTER_ADDR:MASTER_PORT for all attempts."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


_POLL_S = 0.05


def _join_attempt(store, rank: int, world: int, deadline: float, limit_s: float) -> str:
    """Agree with the other ranks on a key prefix no earlier attempt has used; returns it.

    ``store`` may hold any keys of earlier attempts of the job (torchrun's agent store).  Rank
    0 draws a new attempt id and publishes it under ``mlcd/attempt``; every other rank
    publishes a fresh nonce under ``mlcd/hello/<rank>``.  Rank 0 answers each nonce it reads
    with ``mlcd/<attempt>/welcome/<nonce>``; a rank takes the attempt id once its own nonce is
    answered under it (only this attempt's rank 0 can have seen that nonce, so an id left by a
    dead rank 0 is never taken) and confirms with ``mlcd/<attempt>/joined/<rank>``.  Rank 0
    returns when every rank has confirmed; a stale ``hello`` only earns an unused answer.
    """
    def expired(what: str) -> MLCDError:
        return MLCDError(f"distributed start-up: {what} within {limit_s:g} s ({START_TIMEOUT_VAR}; "
                         f"rank {rank} of {world}, store {os.environ.get('MASTER_ADDR')}:"
                         f"{os.environ.get('MASTER_PORT')}); no checkpoint was touched")

    if rank == 0:
        attempt = uuid.uuid4().hex
        store.set("mlcd/attempt", attempt)
        others = list(range(1, world))
        hello = [f"mlcd/hello/{r}" for r in others]
        answered: set[bytes] = set()
        while True:
            missing = [r for r in others if not store.check([f"mlcd/{attempt}/joined/{r}"])]
            if not missing:
                return attempt
            if time.monotonic() > deadline:
                raise expired(f"ranks {missing} did not join")
            present = [k for k in hello if store.check([k])]
            nonces = set(store.multi_get(present)) - answered if present else set()
            if nonces:
                store.multi_set([f"mlcd/{attempt}/welcome/{n.decode()}" for n in nonces], ["1"] * len(nonces))
                answered |= nonces
            time.sleep(_POLL_S)
    nonce = uuid.uuid4().hex
    store.set(f"mlcd/hello/{rank}", nonce)
    while True:
        if store.check(["mlcd/attempt"]):
            attempt = store.get("mlcd/attempt").decode()
            if store.check([f"mlcd/{attempt}/welcome/{nonce}"]):
                store.set(f"mlcd/{attempt}/joined/{rank}", "1")
                return attempt
        if time.monotonic() > deadline:
            raise expired("rank 0 did not answer")
        time.sleep(_POLL_S)


def _group_store(rank: int, world: int, start_s: float):
    """The store the process group is built on: fresh keys for this attempt, whoever hosts it."""
    addr, port = os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT")
    if not addr or port is None:
        raise MLCDError("distributed start-up: MASTER_ADDR and MASTER_PORT must be set for a "
                        f"{world}-rank run (torchrun sets them; under srun the sbatch script exports them)")
    start = datetime.timedelta(seconds=start_s)
    deadline = time.monotonic() + start_s
    if _uses_agent_store():
        store = dist.TCPStore(addr, port, is_master=False, timeout=start)
        prefix = f"mlcd/{_join_attempt(store, rank, world, deadline, start_s)}/pg"
    else:
        # a store of this attempt's own, hosted by rank 0 (what env:// would build)
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=start, multi_tenant=True)
        prefix = "default_pg"
    return store, dist.PrefixStore(prefix, store)


def init_distributed(device: str | None = None, backend: str | None = None,
                     timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed when launched by torchrun/SLURM; idempotent.

    ``device``: "cpu", "cuda" or None (CUDA when available).  ``backend``: None picks NCCL
    for CUDA and gloo for CPU.  ``timeout_s``: the collective time limit (default
    MLCD_DIST_TIMEOUT); forming the group is bounded by MLCD_DIST_START_TIMEOUT.
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
            start_s, op_s = dist_timeouts()
            op_s = timeout_s or op_s
            kw = {}
            if use_cuda and backend == "nccl":
                kw["device_id"] = dev
            try:
                base, store = _group_store(rank, world, start_s)
                dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                        timeout=datetime.timedelta(seconds=op_s), **kw)
                base.set_timeout(datetime.timedelta(seconds=op_s))
                if backend == "gloo":  # once per process, however many groups it forms
                    atexit.unregister(_cleanup_at_exit)
                    atexit.register(_cleanup_at_exit)
            except MLCDError:
                raise
            except (RuntimeError, OSError) as exc:  # DistStoreError, DistNetworkError, gloo/NCCL
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise MLCDError(f"distributed start-up: rank {rank} of {world} could not form the group "
                                f"({first[:300]}); {START_TIMEOUT_VAR}={start_s:g} s bounds this wait, "
                                "no checkpoint was touched") from None
        return DistInfo(rank, world, local, dev, backend)
    return DistInfo(0, 1, local, dev, None)


def _cleanup_at_exit() -> None:
    """Destroy a gloo process group when the interpreter exits, while it is still whole.

    A stage that returns without :func:`cleanup` (embed, cluster, assign under torchrun) used to
    leave the group to interpreter finalisation: gloo's worker threads then drop the last
    tensors of finished work and take the GIL of an interpreter being torn down, and a rank
    dies with SIGABRT after its work is done (seen in CI on the distributed k-means; torch's
    own atexit fix, pytorch/pytorch#179291, was abandoned).  atexit handlers run before that
    teardown.  gloo's threads stop only when the last reference to the group goes, and after
    an uncaught exception the traceback's frames (``sys.last_traceback``) may hold one, so the
    hook drops those first.  Destroying sends nothing to the other ranks (it waits only for
    this rank's own queued work).  Only gloo: for NCCL the end of the group is left to the
    stage (the trainer destroys its own; :func:`mlcd_core.stage.run_main` does after a stage
    that succeeded), since a communicator with work in flight may block in its destruction.
    """
    import gc
    import sys

    for name in ("last_exc", "last_type", "last_value", "last_traceback"):
        if hasattr(sys, name):  # an uncaught exception's frames: they may hold the group
            setattr(sys, name, None)
    try:
        cleanup()
        gc.collect()  # the group's last references (in reference cycles), so its threads stop here
    except Exception:  # noqa: BLE001 - the stage's work is done and written; exit as it would have
        pass


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
