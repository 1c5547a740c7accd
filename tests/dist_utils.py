"""Run a function in W gloo processes on CPU and collect what each returns.

    results = run_distributed(fn, world_size=2, args=(a, b))   # fn(rank, world_size, *args)

``fn`` must be a module-level function (it is pickled into spawned processes).  Each
process gets a gloo group on a free local port, one torch thread, and a hard timeout: a hang
fails the test instead of freezing CI.  An exception in any rank is re-raised here with
that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = None
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn, world_size: int, args: tuple = (), timeout: float = 120.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the list of results."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s (hang?)")
        results, errors = [], []
        for r in range(world_size):
            path = os.path.join(out_dir, f"{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r} died without a result (exit code {procs[r].exitcode})")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} failed:\n{value}")
            results.append(value)
        if errors:  # every rank's error: the first one is often only "connection closed by peer"
            raise RuntimeError("\n".join(errors))
        return results


def comparable(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` without the attention's key bias (the middle third of ``in_proj_bias``): adding a
    constant to every key shifts each query's logits alike, so its gradient is zero in exact
    arithmetic and what the ranks' summation order leaves there is rounding noise, which AdamW
    (an update of about lr per step whatever the gradient's size) turns into weights that differ
    by their whole size between DDP and FSDP (measured on an AVX-512 CPU: the key bias 0.23-0.35
    relative, the query and value biases 1e-7)."""
    if isinstance(name, str) and name.endswith("in_proj_bias"):
        w = t.numel() // 3
        return torch.cat([t[:w], t[2 * w:]])
    return t
