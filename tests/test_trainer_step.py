"""The trainer's step without host synchronisation, its device-side non-finite skip, the
typed batch, the log module (metrics.jsonl, wandb run id across a resume) and the FLOPs /
MFU / peak-memory fields."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from mlcd_train import partial_fc as P
from mlcd_train import train
from mlcd_train.trainer import perf
from mlcd_train.trainer.step import Batch, StepStats, accumulate_step, apply_step, guarded_step
from mlcd_train.utils.errors import MLCDError

TINY = ["model.name=ViT-Tiny-4-28", "model.overrides={width: 32, layers: 2, heads: 2, output_dim: 16}"]


def _synthetic(out, *extra):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", *TINY,
            "train.global_batch_size=4", "optim.warmup_steps=0", "train.save_every=1000", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _parts(fused: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    pfc = P.PartialFC(8, 30, sample_rate=0.5, scale=16.0, margin=0.2, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **({"fused": True} if fused else {}))
    return model, pfc, opt, pfc.make_optimizer(1e-2, weight_decay=0.1, kind="adamw")


def _snapshot(parts):
    model, pfc, opt, popt = parts
    return ([p.detach().clone() for p in model.parameters()], pfc.weight.detach().clone(),
            {k: v.clone() for k, v in popt.state[pfc.weight].items()},
            [{k: v.clone() for k, v in s.items()} for s in opt.state.values()])


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_step_is_skipped_on_the_device(fused):
    """sync=False: the figures come back as tensors, and a NaN loss leaves the backbone, its
    AdamW state and the Partial FC rows exactly as they were (fused AdamW through found_inf,
    foreach AdamW through the torch.where restore); a finite step afterwards applies."""
    parts = _parts(fused)
    model, pfc, opt, popt = parts
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    loss, gnorm, ok = apply_step(pfc(model(x), y), list(model.parameters()), 1.0, (opt, popt), sync=False)
    assert torch.is_tensor(ok) and bool(ok) and torch.is_tensor(loss) and torch.is_tensor(gnorm)
    opt.zero_grad(), popt.zero_grad()
    before = _snapshot(parts)
    bad = pfc(model(x), y) * float("nan")
    loss, gnorm, ok = apply_step(bad, list(model.parameters()), 1.0, (opt, popt), sync=False)
    assert not bool(ok) and not torch.isfinite(loss)
    after = _snapshot(parts)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert torch.equal(before[1], after[1])
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    for s0, s1 in zip(before[3], after[3]):
        assert all(torch.equal(s0[k], s1[k]) for k in s0)
    opt.zero_grad(), popt.zero_grad()
    assert apply_step(pfc(model(x), y), list(model.parameters()), 1.0, (opt, popt))[2]
    assert not torch.equal(before[1], pfc.weight)


def test_a_skipped_first_step_leaves_the_state_as_new():
    """A non-finite first step (no optimiser state yet) under the restore path: the next
    finite step gives what a model that never saw the bad step gets."""
    a, b = _parts(False), _parts(False)
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    ok = apply_step(a[1](a[0](x), y) * float("inf"), list(a[0].parameters()), 1.0, (a[2], a[3]), sync=False)[2]
    assert not bool(ok)
    a[2].zero_grad(), a[3].zero_grad()
    for parts in (a, b):
        parts[1].generator.manual_seed(1)
        apply_step(parts[1](parts[0](x), y), list(parts[0].parameters()), 1.0, (parts[2], parts[3]))
    for p, q in zip(a[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
    assert torch.equal(a[1].weight, b[1].weight)


def test_guarded_step_reads_nothing_on_the_host(monkeypatch):
    parts = _parts(True)
    model, pfc, opt, popt = parts
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name: reads.append(_n) or _r(self, *a))
    loss = pfc(model(x), y)
    reads.clear()  # PartialFC's own input check reads its label range
    loss.backward()
    ok = torch.tensor(False)
    guarded_step(opt, ok)
    guarded_step(popt, ok)
    assert reads == []


def test_step_stats_count_on_the_device():
    s = StepStats(torch.device("cpu"))
    seq = [True, False, False, True, False, False, False]
    for i, good in enumerate(seq):
        s.update(torch.tensor(float(i) if good else float("nan")), torch.tensor(1.0), torch.tensor(good))
    c = s.read()
    assert c["good"] == 2 and c["skipped"] == 5 and c["loss_sum"] == 3.0 and c["norm_sum"] == 2.0
    assert c["run"] == 3 and c["worst_run"] == 3
    s.update(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(True))
    c = s.read()  # the run carried into this window ended at 3
    assert c["good"] == 1 and c["skipped"] == 0 and c["run"] == 0 and c["worst_run"] == 3
    assert s.read()["worst_run"] == 0


def test_accumulate_step_takes_typed_batches():
    parts = _parts(False)
    model, pfc, opt, popt = parts
    x, y = torch.randn(6, 12), torch.randint(0, 30, (6, 2))
    b = Batch(x, y)
    assert len(b) == 6 and b.to(torch.device("cpu")).labels is not None
    out = accumulate_step(model, pfc, [Batch(x[:3], y[:3]), Batch(x[3:], y[3:])], list(model.parameters()), 1.0,
                          (opt, popt))
    assert out[2] and isinstance(out[0], float)


def _count_host_reads(monkeypatch) -> list:
    """Host reads (item, tolist, bool/float/int of a tensor) made by the trainer's own code
    (train.py, trainer/step.py); PartialFC's input check is another module's."""
    reads = []
    files = (str(Path(train.__file__)), str(Path(train.__file__).parent / "trainer" / "step.py"))
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if caller in files:
                reads.append((_name, caller, sys._getframe(1).f_code.co_name))
            return _real(self, *a)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


@pytest.mark.slow
def test_steps_between_sync_points_read_nothing_from_the_device(tmp_path, monkeypatch):
    """12 and 36 steps with one sync point (the last step) make the same number of host reads:
    the step itself reads nothing."""
    reads = _count_host_reads(monkeypatch)
    counts = []
    for n in (12, 36):
        reads.clear()
        assert train.main(_synthetic(tmp_path / f"r{n}", f"train.steps={n}", f"train.log_every={n}",
                                     f"train.stop_check_every={n}", f"train.save_every={n}")) == 0
        counts.append(len(reads))
    assert counts[0] == counts[1], reads


@pytest.mark.slow
def test_nonfinite_run_stops_at_the_next_sync_point_without_per_step_reads(tmp_path, monkeypatch):
    """lr 1e30 makes every step after the first non-finite; with log_every=100 and
    stop_check_every=6 the run is stopped at step 6 (limit 3, a run of 5 seen), the skipped
    steps were not applied, and no host read happened in the steps between."""
    reads = _count_host_reads(monkeypatch)
    out = tmp_path / "nan"
    with pytest.raises(MLCDError, match=r"not finite for 5 steps in a row \(seen at step 6; limit "
                                        r"train.max_nonfinite_steps=3\)"):
        train.main(_synthetic(out, "train.steps=30", "train.log_every=100", "train.stop_check_every=6",
                              "optim.lr=1e30", "optim.clip_grad_norm=0", "train.max_nonfinite_steps=3"))
    assert len(reads) <= 2, reads  # the one read of the counters at step 6


def test_stop_check_every_key():
    from mlcd_train import config as C

    base = ["output_dir=/tmp/x", "data.synthetic=true", "loss.num_classes=10", "train.steps=5",
            "train.global_batch_size=8"]
    assert C.validate(C.build_config(None, base)).train.stop_check_every == 10
    with pytest.raises(MLCDError, match="'train.stop_check_every': must be at least 1"):
        C.validate(C.build_config(None, base + ["train.stop_check_every=0"]))
    with pytest.raises(MLCDError, match="'train.peak_flops'"):
        C.validate(C.build_config(None, base + ["train.peak_flops=-1"]))


# ----------------------------------------------------------------------------- FLOPs, MFU, memory

@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [("ViT-Tiny-4-28", {"width": 32, "layers": 2, "heads": 2,
                                                                "output_dim": 16}),
                                             ("ViT-B-16-224", {}), ("ViT-L-14-336", {})])
def test_counted_vit_flops_equal_the_analytic_formula(name, overrides):
    from mlcd_train.models import create_model, model_config_to_dict

    with torch.device("meta"):
        m = create_model(name, **overrides)
    c = m.config
    counted = perf.forward_flops_per_image(model_config_to_dict(m), c.image_size)
    assert counted == perf.vit_forward_flops(c.width, c.layers, c.patch_size, c.image_size, c.mlp_ratio,
                                             c.output_dim)
    if name == "ViT-B-16-224":
        assert 17.4e9 < counted / 2 < 17.7e9  # the 17.6 GMACs usually quoted for ViT-B/16


@pytest.mark.slow
def test_log_has_model_flops_mfu_and_peak_memory(tmp_path):
    out = tmp_path / "m"
    assert train.main(_synthetic(out, "train.steps=4", "train.log_every=2")) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["tflops_per_device"] > 0 and r["mfu"] is None and r["peak_mem_gib"] > 0.05
    out2 = tmp_path / "m2"
    assert train.main(_synthetic(out2, "train.steps=2", "train.log_every=2", "train.peak_flops=1e9")) == 0
    (r,) = metrics(out2)
    assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / 1e9)
    assert perf.peak_flops(torch.device("cpu"), None) is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out2 / "tb"))
    ea.Reload()
    assert {"train/mfu", "train/tflops_per_device", "train/peak_mem_gib"} <= set(ea.Tags()["scalars"])


# ----------------------------------------------------------------------------- wandb

def _fake_wandb(monkeypatch):
    calls = []

    class Run:
        def log(self, d, step):
            calls.append(("log", step, d))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    return calls


@pytest.mark.slow
def test_wandb_run_id_is_kept_across_a_resume(tmp_path, monkeypatch):
    """train.wandb=PROJECT logs to wandb as well; the run id lives in OUT/wandb_run_id and a
    resume continues that run.  With wandb installed this runs it for real, offline;
    otherwise against a stand-in module."""
    from mlcd_train.trainer.metrics import wandb_module

    real = wandb_module() is not None
    calls = None
    if real:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    else:
        calls = _fake_wandb(monkeypatch)
    out = tmp_path / "wb"
    assert train.main(_synthetic(out, "train.steps=2", "train.log_every=1", "train.save_every=2",
                                 "train.wandb=mlcd-test")) == 0
    rid = (out / "wandb_run_id").read_text().strip()
    assert len(rid) == 16
    assert train.main(_synthetic(out, "train.steps=4", "train.log_every=1", "train.save_every=2",
                                 "train.wandb=mlcd-test")) == 0
    assert (out / "wandb_run_id").read_text().strip() == rid
    if real:
        runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
        assert len(runs) == 2 and all(r.endswith("-" + rid) for r in runs), runs
    else:
        inits = [c[1] for c in calls if c[0] == "init"]
        assert [i["id"] for i in inits] == [rid, rid] and inits[0]["resume"] == "allow"
        assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 4]
    # a fresh run in another folder gets another id
    assert train.main(_synthetic(tmp_path / "wb2", "train.steps=1", "train.wandb=mlcd-test")) == 0
    assert (tmp_path / "wb2" / "wandb_run_id").read_text().strip() != rid


@pytest.mark.slow
def test_wandb_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(MLCDError, match="'train.wandb': the wandb package is not installed"):
        train.main(_synthetic(tmp_path / "nw", "train.steps=1", "train.wandb=p"))


@pytest.mark.slow
def test_a_bad_wandb_run_id_file_is_refused(tmp_path, monkeypatch):
    _fake_wandb(monkeypatch)
    out = tmp_path / "bad"
    assert train.main(_synthetic(out, "train.steps=1", "train.save_every=1", "train.wandb=p")) == 0
    (out / "wandb_run_id").write_text("../../etc\n")
    with pytest.raises(MLCDError, match="wandb_run_id: not a wandb run id"):
        train.main(_synthetic(out, "train.steps=2", "train.wandb=p"))


@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("kind", ["fifo", "link", "folder"])
def test_a_metrics_log_that_is_not_a_regular_file_is_refused(tmp_path, kind, start):
    """OUT/metrics.jsonl is appended to: a FIFO there hung the trainer (open for append waits
    for a reader), a symlink made it write wherever the link points."""
    import os

    from mlcd_train.trainer.metrics import MetricsLog

    out = tmp_path / "run"
    out.mkdir()
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep\n")
    log = out / "metrics.jsonl"
    if kind == "fifo":
        os.mkfifo(log)
    elif kind == "link":
        log.symlink_to(target)
    else:
        log.mkdir()
    with pytest.raises(MLCDError, match=r"metrics\.jsonl: .*not a regular file"):
        MetricsLog(out, start, True)
    assert target.read_text() == "keep\n"
    assert os.path.lexists(log)  # nothing of the user's removed


def test_a_metrics_log_resume_keeps_its_earlier_steps(tmp_path):
    from mlcd_train.trainer.metrics import MetricsLog

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
    m = MetricsLog(out, 2, True)
    m.log({"step": 3, "loss": 1.0})
    m.close()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_clear_sharded_removes_a_link_not_its_target(tmp_path):
    from mlcd_train.trainer.parallel import MODEL_DCP, clear_sharded

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data").write_text("keep")
    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / MODEL_DCP).symlink_to(elsewhere, target_is_directory=True)
    clear_sharded(step)
    assert not (step / MODEL_DCP).exists() and not (step / MODEL_DCP).is_symlink()
    assert (elsewhere / "data").read_text() == "keep"


def _open_log_on_ranks(rank, world, out):
    from mlcd_train.trainer.metrics import open_metrics_log

    try:
        open_metrics_log(Path(out), 0, rank == 0, True)
    except MLCDError as exc:
        return str(exc)
    return None


@pytest.mark.slow  # two spawned gloo ranks: 5 s of CPU on 2 cores
def test_a_refused_metrics_log_stops_every_rank(tmp_path):
    """Only rank 0 logs: its refusal used to leave the other ranks in their first collective
    (a hang until the launcher's or NCCL's timeout); now every rank raises, naming the file."""
    import os

    from tests.dist_utils import run_distributed

    os.mkfifo(tmp_path / "metrics.jsonl")
    msgs = run_distributed(_open_log_on_ranks, 2, (str(tmp_path),), timeout=120)
    assert all(m is not None and "metrics.jsonl" in m and "FIFO" in m for m in msgs), msgs
    assert msgs[1].startswith("rank 0: ")
