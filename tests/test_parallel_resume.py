"""Resumes across train.parallel and the stop signal agreed every train.stop_check_every
steps, on 2 gloo ranks (one spawn runs every trainer back to back on a synthetic stream):
- ``ddp``: 12 uninterrupted steps (checkpoints every 3): the reference;
- ``d2f``: 3 steps under ddp, then the same folder resumed under fsdp to step 6;
- ``f2d``: 3 steps under fsdp, then resumed under ddp to step 6;
- ``stop``: SIGTERM to rank 0 alone during step 6 with stop_check_every=4 and no log step in
  between: both ranks stop together at step 8 and save; the same command resumes to 12.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlcd_train import config as C
from mlcd_train.export import read_train_checkpoint
from mlcd_train.trainer.checkpoint import list_checkpoints
from tests.dist_utils import run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TINY = ["model.name=ViT-Tiny-4-28", "model.overrides={width: 32, layers: 2, heads: 2, output_dim: 16}",
        "data.synthetic=true", "data.synthetic_batches=4", "loss.num_classes=32", "loss.l=2",
        "loss.sample_rate=0.5", "loss.scale=16", "train.global_batch_size=8", "train.keep_last=10",
        "optim.warmup_steps=2", "optim.lr=2e-3", "seed=3", "train.device=cpu",
        "optim.schedule=constant"]  # the learning rate does not depend on train.steps: a 3-step run continues as
# the first 3 steps of the 12-step reference


def _train(rank, world, out, *extra):
    from mlcd_train.train import Trainer
    from mlcd_train.utils.dist import DistInfo

    cfg = C.build_config(None, [f"output_dir={out}", *TINY, *extra])
    t = Trainer(cfg, DistInfo(rank=rank, world_size=world, local_rank=rank, backend="gloo"))
    assert t.run() == 0
    return t


def _ranks(rank, world, root):
    import os
    import signal

    from mlcd_train import train

    root = Path(root)
    _train(rank, world, root / "ddp", "train.steps=12", "train.save_every=3", "train.log_every=1")
    _train(rank, world, root / "d2f", "train.steps=3", "train.save_every=3", "train.log_every=1")
    _train(rank, world, root / "d2f", "train.steps=6", "train.save_every=3", "train.log_every=1",
           "train.parallel=fsdp")
    _train(rank, world, root / "f2d", "train.steps=3", "train.save_every=3", "train.log_every=1",
           "train.parallel=fsdp")
    _train(rank, world, root / "f2d", "train.steps=6", "train.save_every=3", "train.log_every=1")
    real = train.lr_factor

    def lr_factor(step, *a):
        if rank == 0 and step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the signal reaches one rank only
        return real(step, *a)

    train.lr_factor = lr_factor
    try:
        stop = ["train.steps=12", "train.save_every=1000", "train.log_every=100", "train.stop_check_every=4"]
        _train(rank, world, root / "stop", *stop)
    finally:
        train.lr_factor = real
    stopped = [s for s, _ in list_checkpoints(root / "stop" / "checkpoints")]
    _train(rank, world, root / "stop", *stop)
    return stopped


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("presume")
    stopped = run_distributed(_ranks, 2, (str(root),), timeout=1400)
    return root, stopped


def ckpt(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step_{n:08d}"


def rel_close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp(min=1e-12)
        assert err <= tol, f"{k}: relative difference {err:.3g}"


def centres(folder: Path) -> dict:
    return {r: torch.load(folder / f"pfc_rank{r}.pt", map_location="cpu", weights_only=True)["weight"]
            for r in range(2)}


def test_a_ddp_checkpoint_resumes_under_fsdp(runs):
    root, _ = runs
    assert (ckpt(root / "d2f", 3) / "model.pt").is_file()                    # written under ddp
    assert (ckpt(root / "d2f", 6) / "model_dcp" / ".metadata").is_file()     # continued under fsdp
    rel_close(read_train_checkpoint(ckpt(root / "d2f", 6))[0], read_train_checkpoint(ckpt(root / "ddp", 6))[0],
              1e-5)
    rel_close(centres(ckpt(root / "d2f", 6)), centres(ckpt(root / "ddp", 6)), 1e-5)


def test_an_fsdp_checkpoint_resumes_under_ddp(runs):
    root, _ = runs
    assert (ckpt(root / "f2d", 3) / "model_dcp" / ".metadata").is_file()
    assert (ckpt(root / "f2d", 6) / "model.pt").is_file()
    rel_close(read_train_checkpoint(ckpt(root / "f2d", 6))[0], read_train_checkpoint(ckpt(root / "ddp", 6))[0],
              1e-5)
    rel_close(centres(ckpt(root / "f2d", 6)), centres(ckpt(root / "ddp", 6)), 1e-5)


def test_stop_signal_is_agreed_at_the_next_check_and_resumes_exactly(runs):
    root, stopped = runs
    assert stopped == [[8], [8]]  # both ranks stopped at the check after the signal, and saved there
    a = read_train_checkpoint(ckpt(root / "stop", 12))[0]
    b = read_train_checkpoint(ckpt(root / "ddp", 12))[0]
    for k in b:
        assert torch.equal(a[k], b[k]), k
    ca, cb = centres(ckpt(root / "stop", 12)), centres(ckpt(root / "ddp", 12))
    assert all(torch.equal(ca[r], cb[r]) for r in range(2))
