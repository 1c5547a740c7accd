"""Issue 15 leftovers: a huge k in a labels folder's meta.json is refused before the Partial FC
is allocated (mlcd_train/trainer/memory.py), and k is cross-checked against the centres the
meta.json names (trainer/data.py: check_k_against_centroids)."""
from __future__ import annotations

import json
import os
import re
import socket

import numpy as np
import pytest
import torch

from mlcd_train.cli import run_stage
from mlcd_train.trainer import memory as M
from mlcd_train.utils.errors import MLCDError

HOST = socket.gethostname()


def rec(need, free, host=HOST, device="cpu", num_local=10):
    return {"host": host, "device": device, "free": free, "need": need, "num_local": num_local}


# ------------------------------------------------------------------ the figure and the verdict
def test_pfc_bytes_is_what_the_partial_fc_and_its_optimiser_allocate():
    """The estimate counts every tensor of a rank's shard after a step: weight, its (dense)
    gradient, AdamW's two moments and the int64 step of each row."""
    from mlcd_train.partial_fc import PartialFC

    k, d = 37, 12
    pfc = PartialFC(d, k, sample_rate=1.0, loss="mlcd", world_size=1, rank=0)
    opt = pfc.make_optimizer(1e-3, kind="adamw")
    emb = torch.randn(4, d, requires_grad=True)
    labels = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    pfc(emb, labels).backward()
    opt.step()
    tensors = [pfc.weight, pfc.weight.grad, *opt.state[pfc.weight].values()]
    allocated = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    assert M.pfc_bytes(k, d) == allocated


def test_verdict_fits_refuses_and_sums_ranks_that_share_a_memory():
    gib = 1 << 30
    assert M.memory_verdict([rec(gib, 8 * gib)], 100, 16, "L/meta.json: key 'k'") is None
    msg = M.memory_verdict([rec(8 * gib, 8 * gib)], 100, 16, "L/meta.json: key 'k'")
    assert msg.startswith("L/meta.json: key 'k': k=100 classes need 8.0 GiB") and "8.0 GiB free" in msg
    assert "labels folder is wrong" in msg and "more ranks" in msg and "\n" not in msg
    # two CPU ranks on one host share its RAM: 2 x 5 GiB > 90% of 8 GiB; on two hosts each fits
    two = [rec(5 * gib, 8 * gib), rec(5 * gib, 8 * gib)]
    assert "ranks 0, 1 (sharing cpu" in M.memory_verdict(two, 100, 16, "s")
    assert M.memory_verdict([rec(5 * gib, 8 * gib, host="a"), rec(5 * gib, 8 * gib, host="b")], 100, 16, "s") is None
    # two GPUs of one host have their own memory; two ranks on one GPU do not
    gpus = [rec(5 * gib, 8 * gib, device="cuda:0"), rec(5 * gib, 8 * gib, device="cuda:1")]
    assert M.memory_verdict(gpus, 100, 16, "s") is None
    gpus[1]["device"] = "cuda:0"
    assert "sharing cuda:0" in M.memory_verdict(gpus, 100, 16, "s")
    # the least free memory a rank of the group saw is the figure; unknown memory is not judged
    assert "rank 0" in M.memory_verdict([rec(5 * gib, 5 * gib)], 100, 16, "s")
    assert M.memory_verdict([rec(1 << 60, None)], 100, 16, "s") is None


def test_ranks_are_summed_by_the_memory_they_share_not_by_index(monkeypatch):
    """Ranks that each see one GPU through CUDA_VISIBLE_DEVICES all call it cuda:0: the GPU's UUID
    tells them apart (8 ranks x 11.9 GiB on 8 GPUs of 75 GiB fit); one GPU shared is summed."""
    gib = 1 << 30
    eight = [dict(rec(12 * gib, 75 * gib, device="cuda:0"), memory=f"gpu:GPU-{i}") for i in range(8)]
    assert M.memory_verdict(eight, 10 ** 8, 512, "s") is None
    for r in eight:
        r["memory"] = "gpu:GPU-0"
    assert "ranks 0, 1, 2, 3, 4, 5, 6, 7 (sharing cuda:0" in M.memory_verdict(eight, 10 ** 8, 512, "s")
    # the CPU: two containers of one machine (one boot id) share its memory whatever their host names
    cpu = [dict(rec(5 * gib, 8 * gib, host="a"), memory="boot1:cpu"), dict(rec(5 * gib, 8 * gib, host="b"),
                                                                       memory="boot1:cpu")]
    assert "ranks 0, 1" in M.memory_verdict(cpu, 100, 16, "s")
    cpu[1]["memory"] = "boot2:cpu"
    assert M.memory_verdict(cpu, 100, 16, "s") is None
    # what a rank reports: the GPU's UUID when torch knows it
    monkeypatch.setattr(M, "_gpu_uuid", lambda index: "GPU-abc")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gib, 80 * gib))
    assert M.memory_record(10, 16, torch.device("cuda", 0))["memory"] == "gpu:GPU-abc"


def test_a_containers_memory_limit_counts(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("400000\n")
    assert M._cgroup_free(str(tmp_path)) == 600000
    (tmp_path / "memory.max").write_text("max\n")
    assert M._cgroup_free(str(tmp_path)) is None
    monkeypatch.setattr(M, "_cgroup_free", lambda: 1234)
    assert M.free_bytes(torch.device("cpu")) == 1234  # less than the machine's MemAvailable


def test_free_bytes_cpu_and_cuda(monkeypatch, tmp_path):
    free = M.free_bytes(torch.device("cpu"))
    assert free is not None and 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123 << 20, 1 << 40))
    assert M.free_bytes(torch.device("cuda", 0)) == 123 << 20
    # MemAvailable parsed in kB; a file without it or a FIFO (never opened blocking) gives None
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:  1000 kB\nMemAvailable:     2048 kB\n")
    assert M._meminfo_available(str(f)) == 2048 * 1024
    f.write_text("MemTotal:  1000 kB\n")
    assert M._meminfo_available(str(f)) is None
    os.mkfifo(tmp_path / "fifo")
    assert M._meminfo_available(str(tmp_path / "fifo")) is None


def test_check_on_cuda_uses_the_gpus_free_memory(monkeypatch):
    """A rank on a GPU is judged by torch.cuda.mem_get_info (no GPU needed: patched)."""
    from mlcd_core.dist import DistInfo

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 80 << 30))
    info = DistInfo(rank=0, world_size=1, device=torch.device("cuda", 0))
    M.check_pfc_memory(1000, 512, info, "s")  # 8 MB: fits
    want = r"s: k=1000000 classes need 7\.6 GiB .*\(cuda:0 of .* 1\.0 GiB free there. Either k is too"
    with pytest.raises(MLCDError, match=want):
        M.check_pfc_memory(1_000_000, 512, info, "s")


def _two_ranks(rank, world_size):
    """Rank 1 alone sees too little memory: both ranks raise the same message."""
    from mlcd_core.dist import DistInfo
    from mlcd_train.train import gather_objects

    M.free_bytes = lambda device: (1 << 40) if rank == 0 else (1 << 20)
    info = DistInfo(rank=rank, world_size=world_size)
    try:
        M.check_pfc_memory(100_000, 64, info, "L/meta.json: key 'k'", gather=lambda r: gather_objects(r, info))
    except MLCDError as exc:
        return str(exc)
    return None


@pytest.mark.slow  # two spawned ranks
def test_two_ranks_stop_together_with_one_message():
    from tests.dist_utils import run_distributed

    a, b = run_distributed(_two_ranks, world_size=2)
    assert a is not None and a == b and "ranks 0, 1" in a and "1.0 MiB free" in a


# ------------------------------------------------------------------ through mlcd train
def _labels_run(tmp_path):
    from tests.fixtures import make_random_shards
    from tests.test_train import TINY, make_labels

    sh = make_random_shards(tmp_path, n=8, size=8, num_classes=2, shard_size=4)
    lbl = make_labels(sh, tmp_path / "labels", k=4, topk=2)
    out = tmp_path / "out"

    def train():
        return run_stage("train", [f"output_dir={out}", f"data.shards={sh}", f"data.labels={lbl}", *TINY,
                                   "train.global_batch_size=4", "data.num_workers=0", "train.steps=1",
                                   "eval.every=0"])
    return lbl, out, train


def _set_meta(lbl, **kw):
    meta = json.loads((lbl / "meta.json").read_text())
    meta.update(kw)
    (lbl / "meta.json").write_text(json.dumps(meta))


def test_train_refuses_a_huge_k_in_one_line_and_a_corrected_run_then_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(M, "free_bytes", lambda device: 64 << 30)  # any machine: 64 GiB free
    lbl, out, train = _labels_run(tmp_path)
    _set_meta(lbl, k=2 ** 31 - 1)
    capsys.readouterr()
    assert train() == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error" in x]
    assert len(lines) == 1 and "Traceback" not in err
    assert f"{lbl}/meta.json: key 'k': k=2147483647 classes need" in lines[0] and "free there" in lines[0]
    assert not out.exists() or not any(out.rglob("*"))  # nothing written (the lock is gone too)
    _set_meta(lbl, k=4)
    assert train() == 0
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").is_file()


# ------------------------------------------------------------------ k against the centres
def test_k_cross_checked_against_the_centres_the_meta_names(tmp_path, capsys):
    from mlcd_train.trainer.data import check_k_against_centroids, labels_meta

    def read(lbl):  # what the trainer does on rank 0
        meta = labels_meta(str(lbl))
        check_k_against_centroids(meta, lbl / "meta.json", meta["k"])
        return meta

    lbl = tmp_path / "labels"
    lbl.mkdir()
    cent = tmp_path / "cl" / "centroids.npy"
    cent.parent.mkdir()
    np.save(cent, np.zeros((5, 3), np.float32))
    meta = {"k": 4, "topk": 2, "centroids": str(cent)}
    (lbl / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert read(lbl)["k"] == 4  # a warning, not a refusal (the trainer never reads the centres)
    err = capsys.readouterr().err
    assert re.search(r"warning: .*labels/meta.json: key 'k' is 4, but the centres .*centroids.npy\) hold 5", err)
    assert len(err.strip().splitlines()) == 1
    np.save(cent, np.zeros((4, 3), np.float32))
    assert read(lbl)["k"] == 4 and capsys.readouterr().err == ""
    # not checked (never blocks, never hangs): gone, relative, a FIFO, not a .npy
    for c in (str(tmp_path / "gone.npy"), "centroids.npy", str(tmp_path / "fifo"), str(lbl / "meta.json")):
        if c.endswith("fifo"):
            os.mkfifo(c)
        (lbl / "meta.json").write_text(json.dumps({**meta, "k": 7, "centroids": c}))
        assert read(lbl)["k"] == 7
