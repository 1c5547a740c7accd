"""Resumes across train.parallel and numbers of ranks, and the stop signal agreed every
train.stop_check_every steps, on 2 and 3 gloo ranks (one spawn runs every trainer back to back on
a synthetic stream):
- ``ddp``: 12 uninterrupted steps (checkpoints every 3): the reference;
- ``d2f``: 3 steps under ddp, then the same folder resumed under fsdp to step 6;
- ``f2d``: 3 steps under fsdp, then resumed under ddp to step 6;
- ``stop``: SIGTERM to rank 0 alone during step 6 with stop_check_every=4 and no log step in
  between: both ranks stop together at step 8 and save; the same command resumes to 12.
- ``r`` (its own spawns): 3 fsdp steps on 2 ranks, resumed on 3 ranks to step 5, then on 2
  ranks to step 6: after each load the backbone is the saved one bit for bit, and every rank
  holds its new class range of the saved centres and optimiser rows (load_partial_fc re-splits
  them); a copy of step 3 missing one centre shard is refused on all 3 ranks in one line.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlcd_train import config as C
from mlcd_train.export import read_train_checkpoint
from mlcd_train.trainer.checkpoint import list_checkpoints
from tests.dist_utils import comparable, run_distributed

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
        x, y = comparable(k, a[k]).double(), comparable(k, b[k]).double()
        err = (x - y).norm() / y.norm().clamp(min=1e-12)
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


# --------------------------------------------------------------------------- another number of ranks

RESHARD = ["train.parallel=fsdp", "train.global_batch_size=6", "train.log_every=1"]  # 6 = 3 x 2 = 2 x 3


def _resumed(rank, world, out, steps):
    """Resume ``out`` under fsdp on ``world`` ranks: this rank's view after the load (rank 0's
    full backbone, this rank's class centres and their optimiser rows), then train to ``steps``."""
    from mlcd_train.train import Trainer
    from mlcd_train.trainer import parallel as par
    from mlcd_train.utils.dist import DistInfo

    cfg = C.build_config(None, [f"output_dir={out}", *TINY, *RESHARD, f"train.steps={steps}",
                                f"train.save_every={steps}"])
    t = Trainer(cfg, DistInfo(rank=rank, world_size=world, local_rank=rank, backend="gloo"))
    start = t.setup()
    backbone = par.full_state_dict(t.core, sharded=True)
    rows = {k: v.detach().clone() for k, v in t.pfc_opt.state[t.pfc.weight].items()}
    seen = (start, backbone, t.pfc.class_start, t.pfc.weight.detach().clone(), rows)
    _train(rank, world, out, *RESHARD, f"train.steps={steps}", f"train.save_every={steps}")
    return seen


def _incomplete(rank, world, folder):
    """A resume from a checkpoint whose class-centre shards are not one complete set."""
    from mlcd_train.utils.errors import MLCDError

    try:
        _train(rank, world, Path(folder).parent / "broken_run", *RESHARD, "train.steps=5", f"resume={folder}")
    except MLCDError as exc:
        return str(exc)
    return None


def _on_two(rank, world, root):
    _train(rank, world, Path(root) / "r", *RESHARD, "train.steps=3", "train.save_every=3")


def _on_three(rank, world, out, broken):
    return _incomplete(rank, world, broken), _resumed(rank, world, out, 5)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """fsdp on 2 ranks to step 3; resumed on 3 ranks to step 5; resumed on 2 ranks to step 6."""
    import shutil

    root = tmp_path_factory.mktemp("reshard")
    run_distributed(_on_two, 2, (str(root),), timeout=600)
    broken = root / "copy" / "step_00000003"  # a copy of step 3 without one of its two centre shards
    shutil.copytree(ckpt(root / "r", 3), broken)
    (broken / "pfc_rank1.pt").unlink()
    three = run_distributed(_on_three, 3, (str(root / "r"), str(broken)), timeout=600)
    on2 = run_distributed(_resumed, 2, (str(root / "r"), 6), timeout=600)
    return root, [s for _, s in three], on2, [e for e, _ in three]


def _check_resumed(seen: list, folder: Path, world: int):
    want = read_train_checkpoint(folder)[0]
    assert [s[0] for s in seen] == [int(folder.name.split("_")[1])] * world
    from mlcd_train.export import strip_prefixes

    got = strip_prefixes(seen[0][1])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # the backbone as saved, bit for bit
    saved = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(folder.glob("pfc_rank*.pt"))]
    full = torch.cat([s["weight"] for s in saved])
    opt_rows = {k: torch.cat([s["optimizer"]["rows"][k] for s in saved]) for k in saved[0]["optimizer"]["rows"]}
    assert len(saved) != world and sum(s[3].shape[0] for s in seen) == full.shape[0] == 32
    for _, _, start, w, rows in seen:  # each rank's class range of the saved centres and optimiser rows
        assert torch.equal(w, full[start:start + w.shape[0]])
        for k, v in rows.items():
            assert torch.equal(v, opt_rows[k][start:start + w.shape[0]]), k
    assert any(r[4]["step"].sum() > 0 for r in seen)  # the optimiser rows carry the training so far


def _losses(out: Path) -> dict:
    import json

    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_an_fsdp_checkpoint_of_2_ranks_resumes_on_3_and_back_on_2(resharded):
    root, on3, on2, _ = resharded
    _check_resumed(on3, ckpt(root / "r", 3), 3)
    _check_resumed(on2, ckpt(root / "r", 5), 2)
    assert sorted(p.name for p in ckpt(root / "r", 5).glob("pfc_rank*.pt")) == [f"pfc_rank{r}.pt" for r in range(3)]
    assert (ckpt(root / "r", 6) / "model_dcp" / ".metadata").is_file()
    losses = _losses(root / "r")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # it trained on: the backbone moved from step 3 to 5 to 6
    a, b, c = (read_train_checkpoint(ckpt(root / "r", s))[0] for s in (3, 5, 6))
    assert any(not torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(b[k], c[k]) for k in b)


def test_an_incomplete_set_of_centre_shards_is_one_line_on_every_rank(resharded):
    *_, errors = resharded
    assert errors[0] is not None and errors == [errors[0]] * 3 and "\n" not in errors[0]
    assert "shards do not form one complete set (world sizes [2], ranks [0])" in errors[0]
