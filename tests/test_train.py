"""The trainer, run for real: torchrun with 2 gloo ranks on CPU, a tiny ViT, shards of the
shipped Fashion-MNIST sample joined to a label folder laid out as `mlcd assign` writes it.

Runs are shared between tests (one module fixture starts them together):
- ``ref``: 40 uninterrupted steps (checkpoints, tensorboard, metrics);
- ``sigterm``: the same command, SIGTERM to torchrun after step 12, then the same command
  again: its final weights must equal ``ref``'s;
- ``sigkill``: one worker SIGKILLed after step 12 under ``--max-restarts 1``: torchrun
  restarts the group, which resumes and must also end on ``ref``'s weights.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcd_train import train
from mlcd_train.trainer.checkpoint import list_checkpoints
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import free_port
from tests.fixtures import make_sample_shards

ROOT = Path(__file__).resolve().parent.parent
K, TOPK, STEPS = 64, 3, 40
TINY = ["model.name=ViT-Tiny-4-28", "model.overrides={width: 32, layers: 2, heads: 2, output_dim: 16}",
        f"train.steps={STEPS}", "train.global_batch_size=8", "train.log_every=1", "train.keep_last=5",
        "loss.l=2", "loss.sample_rate=0.5", "loss.scale=16", "optim.warmup_steps=5", "optim.lr=2e-3",
        "data.num_workers=1", "data.shuffle_buffer=20", "seed=3"]


def make_labels(shards: Path, out: Path, k: int = K, topk: int = TOPK) -> Path:
    """A label folder as `mlcd assign` writes it, labels derived from the true class."""
    from mlcd_train.data.reader import ShardDataset, list_shards, shard_name

    out.mkdir(parents=True, exist_ok=True)
    for sh in list_shards(shards):
        keys, rows = [], []
        for s in ShardDataset([sh]):
            keys.append(s.key)
            rows.append([(s.cls * 6 + 2 * j + s.index % 2) % k for j in range(topk)])
        np.save(out / f"{shard_name(sh)}.labels.npy", np.asarray(rows, dtype=np.int32))
        np.save(out / f"{shard_name(sh)}.keys.npy", np.asarray(keys))
    (out / "meta.json").write_text(json.dumps({"k": k, "topk": topk, "centroids": "none", "embedder": "cls"}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_data")
    shards = make_sample_shards(tmp, n=400, shard_size=100)
    return shards, make_labels(shards, tmp / "labels")


def args(data, out, *extra):
    shards, labels = data
    return [f"output_dir={out}", f"data.shards={shards}", f"data.labels={labels}", *TINY, *extra]


def torchrun(data, out: Path, *extra, nproc=2, max_restarts=0) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.2",
           "-m", "mlcd_train.train", *args(data, out, *extra)]
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it a c10d restart reads the previous
    # attempt's gloo/NCCL addresses from the shared store (pytorch#135712); launch/ sets it too
    env = dict(os.environ, OMP_NUM_THREADS="1", MLCD_QUIET="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def log_text(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")


def wait(proc: subprocess.Popen, out: Path, timeout=150) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"torchrun did not finish in {timeout}s:\n{log_text(out)[-3000:]}")


def metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def load(folder: Path, name: str):
    return torch.load(folder / name, map_location="cpu", weights_only=False)


def assert_same_weights(a: Path, b: Path, tol=1e-4, ranks=2):
    ma, mb = load(a, "model.pt")["state_dict"], load(b, "model.pt")["state_dict"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.allclose(ma[k], mb[k], atol=tol, rtol=0), k
    for r in range(ranks):
        pa, pb = load(a, f"pfc_rank{r}.pt"), load(b, f"pfc_rank{r}.pt")
        assert torch.allclose(pa["weight"], pb["weight"], atol=tol, rtol=0), f"pfc rank {r}"
        for name, t in pa["optimizer"]["rows"].items():
            assert torch.allclose(t.double(), pb["optimizer"]["rows"][name].double(), atol=tol), name
    oa, ob = load(a, "optimizer.pt")["state"], load(b, "optimizer.pt")["state"]
    for i in oa:
        assert torch.allclose(oa[i]["exp_avg"], ob[i]["exp_avg"], atol=tol)


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """The three 2-rank runs, started together (they spend most of their time starting up)."""
    root = tmp_path_factory.mktemp("runs")
    ref, term, kill = root / "ref", root / "sigterm", root / "sigkill"
    # the reference reads in the trainer process (num_workers=0), the others through a loader
    # worker: one worker per rank yields the same stream, so the weights must still agree
    p_ref = torchrun(data, ref, "train.save_every=10", "data.num_workers=0")
    p_term = torchrun(data, term, "train.save_every=10")
    p_kill = torchrun(data, kill, "train.save_every=5", max_restarts=1)
    pending = {"term": (p_term, term), "kill": (p_kill, kill)}
    t0 = time.monotonic()
    while pending and time.monotonic() - t0 < 150:
        for name, (p, out) in list(pending.items()):
            m = metrics(out)
            if m and m[-1]["step"] >= 12:
                if name == "term":
                    p.send_signal(signal.SIGTERM)    # what SLURM / a preempting scheduler does
                else:
                    children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                    assert len(children) == 2, children
                    os.kill(int(children[1]), signal.SIGKILL)   # one worker dies hard
                del pending[name]
            elif p.poll() is not None:
                pytest.fail(f"{name} ended (rc {p.returncode}) before step 12:\n{log_text(out)[-3000:]}")
        time.sleep(0.02)
    assert not pending, f"step 12 not reached by {list(pending)}"
    rc_ref = wait(p_ref, ref)
    assert rc_ref == 0, log_text(ref)[-3000:]
    wait(p_term, term)
    first = log_text(term)
    stopped = [s for s, _ in list_checkpoints(term / "checkpoints")]
    p_term = torchrun(data, term, "train.save_every=10")     # the very same command again
    rc_kill = wait(p_kill, kill)
    rc_term = wait(p_term, term)
    return {"ref": ref, "term": (term, first, stopped, rc_term), "kill": (kill, rc_kill)}


@pytest.fixture(scope="module")
def ref(runs):
    return runs["ref"]


@pytest.mark.slow
def test_run_writes_checkpoints_tensorboard_metrics(ref):
    cks = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert cks == [f"step_{s:08d}" for s in (10, 20, 30, 40)]
    for c in cks:
        names = sorted(p.name for p in (ref / "checkpoints" / c).iterdir())
        assert names == ["meta.json", "model.pt", "optimizer.pt", "pfc_rank0.pt", "pfc_rank1.pt",
                         "trainer_state.pt"]
    m = load(ckpt(ref, 40), "model.pt")
    assert m["step"] == 40 and m["model_config"]["width"] == 32
    from mlcd_train.models import create_model_from_config

    create_model_from_config(m["model_config"]).load_state_dict(m["state_dict"])   # what export reads
    st = load(ckpt(ref, 40), "trainer_state.pt")
    assert st["step"] == 40 and st["samples_seen"] == 320 and len(st["rng"]) == 2
    rows = metrics(ref)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert {"step", "loss", "lr", "img_per_s", "data_wait", "grad_norm", "skipped_steps"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["img_per_s"] > 0 and 0 <= r["data_wait"] <= 1
    assert rows[-1]["loss"] < rows[0]["loss"]                 # it learns
    assert rows[4]["lr"] == pytest.approx(2e-3) and rows[-1]["lr"] < 1e-4   # warm-up then cosine
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(ref / "tb"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    for t in ("train/loss", "train/lr", "train/img_per_s", "train/data_wait", "train/grad_norm",
              "train/skipped_steps", "train/corrupt_samples"):
        assert t in tags
    assert len(ev.Scalars("train/loss")) == STEPS
    import yaml

    cfg = yaml.safe_load((ref / "config.yaml").read_text())
    assert cfg["train"]["steps"] == STEPS and cfg["loss"]["num_classes"] == K   # resolved from meta.json


@pytest.mark.slow
def test_sigterm_saves_and_restart_matches_uninterrupted(ref, runs):
    out, first, stopped, rc = runs["term"]
    assert "stop signal received" in first
    last = stopped[-1]
    assert 12 <= last < STEPS and f"saved step {last}" in first
    assert rc == 0
    assert f"resumed from {ckpt(out, last)}" in log_text(out)
    assert_same_weights(ckpt(ref, STEPS), ckpt(out, STEPS))
    steps = [r["step"] for r in metrics(out)]
    assert steps == list(range(1, STEPS + 1))                 # no step logged twice after the resume
    ref_loss = {r["step"]: r["loss"] for r in metrics(ref)}
    for r in metrics(out):                                    # the same data, step by step
        assert r["loss"] == pytest.approx(ref_loss[r["step"]], abs=1e-4)


@pytest.mark.slow
def test_sigkill_of_one_worker_restarts_and_finishes(ref, runs):
    out, rc = runs["kill"]
    assert rc == 0, log_text(out)[-3000:]
    assert "resumed from" in log_text(out)
    assert_same_weights(ckpt(ref, STEPS), ckpt(out, STEPS))
    assert [r["step"] for r in metrics(out)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_resume_on_one_rank_of_a_two_rank_checkpoint(data, ref, tmp_path):
    src = ckpt(ref, 20)
    out = tmp_path / "one"
    assert train.main(args(data, out, f"resume={src}", "train.steps=22", "train.save_every=100")) == 0
    got = ckpt(out, 22)
    st = load(got, "pfc_rank0.pt")
    assert st["world_size"] == 1 and st["weight"].shape == (K, 16)
    before = [load(src, f"pfc_rank{r}.pt") for r in range(2)]
    w0 = torch.cat([b["weight"] for b in before])
    n0 = torch.cat([b["optimizer"]["rows"]["step"] for b in before])
    n1 = st["optimizer"]["rows"]["step"]
    sampled = n1 - n0
    assert set(sampled.unique().tolist()) <= {0, 1, 2} and (sampled > 0).any() and (sampled == 0).any()
    # centres the two resumed steps did not sample are the 2-rank checkpoint's, re-split
    untouched = sampled == 0
    assert torch.equal(st["weight"][untouched], w0[untouched])
    assert not torch.equal(st["weight"][~untouched], w0[~untouched])
    assert load(got, "model.pt")["step"] == 22


def test_stream_resumes_in_the_same_order(data):
    """Batches after set_resume equal those of the uninterrupted stream (pixels and labels)."""
    from mlcd_train import config as C
    from mlcd_train.trainer.data import build_shard_loader

    cfg = C.build_config(None, args(data, "/tmp/unused", "data.num_workers=2"))

    def batches(start, n, rank=0):
        loader, _ = build_shard_loader(cfg, rank, 2, 4, start, 28)
        it = iter(loader)
        return [next(it)[:2] for _ in range(n)]

    full = batches(0, 7)
    again = batches(4, 3)
    for (x, y), (x2, y2) in zip(full[4:], again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other = batches(0, 2, rank=1)
    assert not torch.equal(full[0][0], other[0][0])            # ranks read different samples


def test_label_folder_mismatches_are_errors_naming_the_shard(data, tmp_path):
    shards, labels = data

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(labels, d)
        edit(d)
        return d

    def run(lbl, *extra):
        out = tmp_path / f"out_{lbl.name}"
        with pytest.raises(MLCDError) as e:
            train.main([f"output_dir={out}", f"data.shards={shards}", f"data.labels={lbl}", *TINY, *extra])
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())
        return str(e.value)

    missing = variant("missing", lambda d: (d / "shard-000002.labels.npy").unlink())
    assert "shard-000002" in run(missing) and "missing" in run(missing)

    def drop_row(d):
        lab = np.load(d / "shard-000001.labels.npy")
        np.save(d / "shard-000001.labels.npy", lab[:-1])
    msg = run(variant("count", drop_row))
    assert "shard-000001" in msg and "rows" in msg

    def swap_keys(d):
        shutil.copy(d / "shard-000001.keys.npy", d / "shard-000000.keys.npy")
    msg = run(variant("keys", swap_keys))
    assert "shard-000000" in msg and "keys" in msg

    assert "'loss.num_classes'" in run(labels, "loss.num_classes=10")
    assert "'loss.l'" in run(labels, "loss.l=4")
    with pytest.raises(MLCDError, match="'train.stepz'"):
        train.main([*args(data, tmp_path / "x"), "train.stepz=3"])


def test_nonfinite_loss_skips_then_aborts(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(MLCDError, match="not finite for 3 steps"):
        train.main([f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", *TINY[:2],
                    "train.steps=30", "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0",
                    "optim.lr=1e30", "optim.clip_grad_norm=0", "train.max_nonfinite_steps=3"])
    rows = metrics(out)
    assert rows and rows[-1]["skipped_steps"] >= 1


def _synthetic(out, *extra):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", *TINY[:2],
            "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0", *extra]


def test_sigusr1_saves_at_the_next_step_and_returns_0(tmp_path):
    import threading

    out = tmp_path / "usr1"

    def send():
        while not metrics(out) or metrics(out)[-1]["step"] < 3:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=send, daemon=True).start()
    assert train.main(_synthetic(out, "train.steps=400", "train.save_every=1000")) == 0
    (step,) = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert 3 <= step < 400 and metrics(out)[-1]["step"] == step
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL     # handlers restored


def test_resume_none_refuses_to_overwrite_a_run(tmp_path):
    out = tmp_path / "done"
    assert train.main(_synthetic(out, "train.steps=2")) == 0
    before = (out / "config.yaml").read_text()
    with pytest.raises(MLCDError, match="'resume'.*step_00000002"):
        train.main(_synthetic(out, "train.steps=3", "resume=none"))
    assert (out / "config.yaml").read_text() == before


def test_resume_path_with_later_checkpoints_refused(tmp_path):
    """resume=PATH into a folder holding later checkpoints would leave them to outlive (and be
    resumed instead of) the new run's own: refused, nothing removed."""
    out = tmp_path / "branch"
    assert train.main(_synthetic(out, "train.steps=3", "train.save_every=1", "train.keep_last=5")) == 0
    before = [s for s, _ in list_checkpoints(out / "checkpoints")]
    with pytest.raises(MLCDError, match=r"'resume'.*past step 1 .*step_00000002, step_00000003"):
        train.main(_synthetic(out, "train.steps=5", f"resume={out / 'checkpoints' / 'step_00000001'}"))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == before == [1, 2, 3]


def test_logged_means_count_only_applied_steps(tmp_path, monkeypatch):
    """A log window of 4 steps, the middle two skipped as non-finite: the logged grad norm is
    the mean over the two applied steps, not their sum over 4."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def norm(params, max_norm):
        real(params, max_norm)
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) in (2, 3) else 1.0)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", norm)
    out = tmp_path / "skip"
    assert train.main(_synthetic(out, "train.steps=4", "train.log_every=4", "train.max_nonfinite_steps=5")) == 0
    (row,) = metrics(out)
    assert row["skipped_steps"] == 2 and row["grad_norm"] == pytest.approx(1.0)


def test_resume_with_other_stream_settings_is_reported(tmp_path, capsys):
    out = tmp_path / "chg"
    assert train.main(_synthetic(out, "train.steps=2", "seed=3")) == 0
    capsys.readouterr()
    assert train.main(_synthetic(out, "train.steps=3", "seed=4", "train.global_batch_size=2")) == 0
    err = capsys.readouterr().err
    assert "other data-stream settings (batch_per_rank 4 -> 2; seed 3 -> 4)" in err
    assert train.main(_synthetic(out, "train.steps=4", "seed=4", "train.global_batch_size=2")) == 0
    assert "data-stream settings" not in capsys.readouterr().err


def test_repeated_key_in_a_label_file_is_an_error(tmp_path):
    """Labels are joined by key: with key 'a' twice, one sample would silently get the other's row."""
    from mlcd_train.trainer.data import LabelTable

    np.save(tmp_path / "s.keys.npy", np.asarray(["a", "b", "a"]))
    np.save(tmp_path / "s.labels.npy", np.asarray([[0], [1], [2]], dtype=np.int32))
    with pytest.raises(MLCDError, match=r"shard s: key 'a' appears 2 times in .*s\.keys\.npy"):
        LabelTable(str(tmp_path), 1).get("s", "b")
    np.save(tmp_path / "s.keys.npy", np.asarray(["a", "b", "c"]))
    assert LabelTable(str(tmp_path), 1).get("s", "c").tolist() == [2]


def _corrupt_every_fifth(src: Path, dst: Path) -> Path:
    """A copy of shard folder ``src`` where every fifth sample's image bytes are garbage."""
    import io
    import tarfile

    dst.mkdir(parents=True)
    shutil.copy(src / "sizes.json", dst / "sizes.json")
    for tar in sorted(src.glob("*.tar")):
        with tarfile.open(tar) as tin, tarfile.open(dst / tar.name, "w") as tout:
            for i, m in enumerate(m for m in tin.getmembers() if m.name.endswith(".png")):
                data = tin.extractfile(m).read() if i % 5 != 2 else b"not a png"
                key = m.name[: -len(".png")]
                for name, blob in ((m.name, data), (key + ".cls", tin.extractfile(key + ".cls").read())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tout.addfile(info, io.BytesIO(blob))
    return dst


def test_stream_resumes_in_the_same_order_past_corrupt_samples(data, tmp_path):
    """Each worker's position (records, corrupt ones included) travels with its batches; fed
    back to the loader it resumes exactly, where counting batches x B would be off by the
    corrupt samples before the resume point."""
    from mlcd_train import config as C
    from mlcd_train.trainer.data import build_shard_loader

    shards = _corrupt_every_fifth(data[0], tmp_path / "shards")
    labels = make_labels(shards, tmp_path / "labels")
    cfg = C.build_config(None, [f"output_dir={tmp_path / 'o'}", f"data.shards={shards}", f"data.labels={labels}",
                                *TINY, "data.num_workers=2", "data.max_corrupt_fraction=0.5"])

    def batches(start, n, positions=None):
        loader, _ = build_shard_loader(cfg, 0, 2, 4, start, 28, positions=positions)
        it = iter(loader)
        return [next(it) for _ in range(n)]

    full = batches(0, 7)
    positions = {int(b[5][-1]): int(b[6][-1]) for b in full[:4]}  # as the trainer keeps them
    assert sum(positions.values()) > 16  # corrupt records were passed over before the resume point
    again = batches(4, 3, positions)
    for b, b2 in zip(full[4:], again):
        assert torch.equal(b[0], b2[0]) and torch.equal(b[1], b2[1])
    blind = batches(4, 3)  # without positions: shifted by the corrupt samples
    assert not all(torch.equal(b[0], b2[0]) for b, b2 in zip(full[4:], blind))


def test_trainer_resume_is_exact_past_corrupt_samples(data, tmp_path):
    """6 steps straight against 3, then a resume to 6, on shards with corrupt samples: the
    checkpoint carries each loader worker's position, so the weights agree exactly."""
    shards = _corrupt_every_fifth(data[0], tmp_path / "shards")
    labels = make_labels(shards, tmp_path / "labels")

    def run(out, steps):
        return train.main([f"output_dir={out}", f"data.shards={shards}", f"data.labels={labels}", *TINY,
                           f"train.steps={steps}", "train.save_every=3", "data.max_corrupt_fraction=0.5",
                           "data.num_workers=2"])

    assert run(tmp_path / "straight", 6) == 0
    assert run(tmp_path / "resumed", 3) == 0 and run(tmp_path / "resumed", 6) == 0
    state = load(ckpt(tmp_path / "resumed", 3), "trainer_state.pt")
    assert sum(state["positions"][0].values()) > 3 * 8  # corrupt records were passed over
    assert_same_weights(ckpt(tmp_path / "straight", 6), ckpt(tmp_path / "resumed", 6), tol=0, ranks=1)


def test_resume_drops_a_cut_metrics_line(tmp_path):
    """A metrics line cut short (kill, full disk) is dropped on resume instead of stopping it."""
    out = tmp_path / "cut"
    assert train.main(_synthetic(out, "train.steps=2", "train.save_every=1")) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert train.main(_synthetic(out, "train.steps=3", "train.save_every=1")) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
