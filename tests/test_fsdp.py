"""train.parallel=fsdp (FSDP2 + sharded DCP checkpoints) against DDP, on 2 gloo ranks.

One spawn of 2 ranks runs four trainers back to back on the same synthetic stream (the
batches are a function of (seed, rank, step)), a tiny ViT:
- ``ddp``: 4 steps (the reference);
- ``fsdp``: 4 steps, checkpoints at 2 and 4 (train.async_save=true, which on the CPU falls
  back to synchronous saves); rank 0 returns the live model's full state dict at the end;
- ``inter``: fsdp, 2 steps (synchronous save), then the same output_dir with train.steps=4,
  which resumes.
The parent process then checks the weights, exports, and resumes an fsdp checkpoint of 2
ranks on 1 process.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mlcd_train import config as C
from mlcd_train.export import export_checkpoint, read_train_checkpoint
from tests.dist_utils import comparable, run_distributed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # 4 trainer runs on 2 spawned ranks

TINY = ["model.name=ViT-Tiny-4-28", "model.overrides={width: 32, layers: 2, heads: 2, output_dim: 16}",
        "data.synthetic=true", "data.synthetic_batches=4", "loss.num_classes=32", "loss.l=2",
        "loss.sample_rate=0.5", "loss.scale=16", "train.global_batch_size=8", "train.log_every=1",
        "train.keep_last=5", "optim.warmup_steps=2", "optim.lr=2e-3", "seed=3", "train.device=cpu"]


def _cfg(out: Path, *extra):
    return C.build_config(None, [f"output_dir={out}", *TINY, *extra])


def _train(rank, world, out, *extra):
    from mlcd_train.train import Trainer
    from mlcd_train.utils.dist import DistInfo

    t = Trainer(_cfg(out, *extra), DistInfo(rank=rank, world_size=world, local_rank=rank, backend="gloo"))
    assert t.run() == 0
    return t


def _ranks(rank, world, root):
    from mlcd_train.trainer.parallel import full_state_dict

    root = Path(root)
    _train(rank, world, root / "ddp", "train.steps=4", "train.save_every=4")
    t = _train(rank, world, root / "fsdp", "train.steps=4", "train.save_every=2", "train.parallel=fsdp",
               "train.async_save=true")
    live = full_state_dict(t.core, sharded=True)
    _train(rank, world, root / "inter", "train.steps=2", "train.save_every=2", "train.parallel=fsdp")
    _train(rank, world, root / "inter", "train.steps=4", "train.save_every=2", "train.parallel=fsdp")
    return live


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    live = run_distributed(_ranks, 2, (str(root),), timeout=1200)[0]
    return root, live


def step(out: Path, n: int) -> Path:
    return out / "checkpoints" / f"step_{n:08d}"


def backbone(folder: Path) -> dict:
    return read_train_checkpoint(folder)[0]


def rel_close(a: dict, b: dict, tol: float):
    """Relative difference of every tensor, the attention's key bias left out (dist_utils.comparable)."""
    assert a.keys() == b.keys()
    for k in a:
        x, y = comparable(k, a[k]).double(), comparable(k, b[k]).double()
        err = (x - y).norm() / y.norm().clamp(min=1e-12)
        assert err <= tol, f"{k}: relative difference {err:.3g}"


def pfc(folder: Path, rank: int) -> dict:
    return torch.load(folder / f"pfc_rank{rank}.pt", map_location="cpu", weights_only=True)


def test_fsdp_checkpoint_layout(runs):
    root, _ = runs
    f = step(root / "fsdp", 4)
    assert (f / "model_dcp" / ".metadata").is_file() and (f / "optim_dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (f / "model_dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (f / "model.pt").exists() and not list(f.glob(".*.tmp"))
    assert (f / "meta.json").is_file() and (step(root / "fsdp", 2) / "meta.json").is_file()
    assert (step(root / "ddp", 4) / "model.pt").is_file()


def test_fsdp_matches_ddp(runs):
    """The same 4 steps under FSDP and DDP end on the same backbone and class centres."""
    root, _ = runs
    a, b = step(root / "fsdp", 4), step(root / "ddp", 4)
    rel_close(backbone(a), backbone(b), 1e-5)
    for r in range(2):
        pa, pb = pfc(a, r), pfc(b, r)
        rel_close({"w": pa["weight"]}, {"w": pb["weight"]}, 1e-5)


def test_export_of_fsdp_run_is_the_live_full_state_dict(runs, tmp_path):
    root, live = runs
    meta = export_checkpoint(root / "fsdp", tmp_path / "x.pt")
    assert meta["step"] == 4
    sd = torch.load(tmp_path / "x.pt", map_location="cpu", weights_only=True)
    assert list(sd) == list(live)
    for k in live:
        assert torch.equal(sd[k], live[k]), k
    # the same native file as a DDP checkpoint's export: same keys, order, dtypes, config
    meta_ddp = export_checkpoint(root / "ddp", tmp_path / "y.pt")
    sd_ddp = torch.load(tmp_path / "y.pt", map_location="cpu", weights_only=True)
    assert list(sd_ddp) == list(sd) and all(sd[k].dtype == sd_ddp[k].dtype for k in sd)
    assert meta_ddp["model_config"] == meta["model_config"]


def test_interrupted_fsdp_run_resumes_to_the_same_weights(runs):
    root, _ = runs
    # the stopped run's checkpoint is the uninterrupted run's at the same step
    rel_close(backbone(step(root / "inter", 2)), backbone(step(root / "fsdp", 2)), 1e-7)
    a, b = step(root / "inter", 4), step(root / "fsdp", 4)
    rel_close(backbone(a), backbone(b), 1e-6)
    for r in range(2):
        pa, pb = pfc(a, r), pfc(b, r)
        rel_close({"w": pa["weight"]}, {"w": pb["weight"]}, 1e-6)
        for name, t in pa["optimizer"]["rows"].items():
            assert torch.allclose(t.double(), pb["optimizer"]["rows"][name].double(), atol=1e-7), name


def test_fsdp_checkpoint_of_two_ranks_resumes_on_one_process(runs, tmp_path):
    """DCP reshards the backbone and its AdamW state onto one process; training continues."""
    from mlcd_train.train import Trainer
    from mlcd_train.utils.dist import DistInfo

    root, _ = runs
    out = tmp_path / "one"
    shutil.copytree(root / "fsdp", out)
    t = Trainer(_cfg(out, "train.steps=5", "train.parallel=fsdp"), DistInfo())
    assert t.setup() == 4
    want = backbone(step(root / "fsdp", 4))
    got = {k: v.detach() for k, v in t.core.state_dict().items()}
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert len(t.opt.state) == len(list(t.core.parameters()))
    assert all(int(s["step"]) == 4 for s in t.opt.state.values())
    t2 = Trainer(_cfg(out, "train.steps=5", "train.parallel=fsdp"), DistInfo())
    assert t2.run() == 0
    assert (step(out, 5) / "model_dcp" / ".metadata").is_file()
    assert not torch.equal(backbone(step(out, 5))["proj"], want["proj"])
