"""Hostile inputs (issue 15): every file a stage reads may come from someone else.

One test per class of fault, each on the instance the issue names plus at least one other
place the same rule covers:

1. no code runs from a file we read (``weights_only=True``, ``allow_pickle=False``);
2. no path taken from a file leaves its folder;
3. no stage writes into (or clears) a folder it reads;
6. only regular files are read, their size checked before their bytes (gzip bombs too);
7. numeric command-line options out of range are refused naming the option;
9. meta files with values of the wrong JSON type are an error naming the file and key.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcd_train.utils.errors import MLCDError

TINY = ["model.name=ViT-Tiny-4-28", "model.overrides={width: 32, layers: 2, heads: 2, output_dim: 16}"]


def _synthetic(out, *extra):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", *TINY,
            "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0", *extra]


class _Payload:
    """Pickled, it calls ``Path.touch(marker)`` when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ----------------------------------------------------------------------- 1. code in files

def test_rng_state_round_trips_through_weights_only_save(tmp_path):
    from mlcd_train.trainer import checkpoint as ck

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    path = tmp_path / "state.pt"
    torch.save({"rng": [ck.rng_state()]}, path)
    want = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck.set_rng_state(torch.load(path, weights_only=True)["rng"][0])
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == want


def test_resume_never_runs_code_from_a_checkpoint(tmp_path):
    """resume=PATH loads model.pt, optimizer.pt, trainer_state.pt with weights_only=True: a
    clean checkpoint resumes, one with a pickled payload is refused before the payload runs."""
    from mlcd_train import train

    out = tmp_path / "run"
    assert train.main(_synthetic(out, "train.steps=2")) == 0
    step = out / "checkpoints" / "step_00000002"
    # the trainer state (RNG states included) loads without unpickling any object
    torch.load(step / "trainer_state.pt", weights_only=True)
    assert train.main(_synthetic(tmp_path / "branch", "train.steps=3", f"resume={step}")) == 0

    for name in ("model.pt", "trainer_state.pt", "optimizer.pt"):
        marker = tmp_path / f"pwned-{name}"
        evil = tmp_path / f"evil-{name}"
        shutil.copytree(step, evil)
        obj = torch.load(step / name, weights_only=True)
        obj["x"] = _Payload(str(marker))
        torch.save(obj, evil / name)
        with pytest.raises(MLCDError, match=f"{name}: .*could run code"):
            train.main(_synthetic(tmp_path / f"b-{name}", "train.steps=3", f"resume={evil}"))
        assert not marker.exists(), f"{name}: the pickled payload ran"


def test_partial_fc_and_embeddings_never_unpickle(tmp_path):
    """Other loads: a PartialFC shard, a probe's cached features and an EMB classes file."""
    from mlcd_train import partial_fc as P
    from mlcd_train.utils.io import safe_np_load, safe_torch_load

    marker = tmp_path / "pwned"
    torch.save({"format": "x", "evil": _Payload(str(marker))}, tmp_path / "pfc_rank0.pt")
    pfc = P.PartialFC(num_classes=8, embedding_size=4, sample_rate=1.0)
    with pytest.raises(MLCDError, match="pfc_rank0.pt"):
        P.load_partial_fc(pfc, tmp_path)
    with pytest.raises(MLCDError, match="could run code"):
        safe_torch_load(tmp_path / "pfc_rank0.pt")
    assert not marker.exists()
    np.save(tmp_path / "obj.npy", np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(MLCDError, match="obj.npy"):
        safe_np_load(tmp_path / "obj.npy")
    assert not marker.exists()


# ----------------------------------------------------------------------- helpers

def _stage(name, argv, capsys):
    """(exit status, stderr) of ``mlcd NAME ARGV`` as the command runs it (MLCDError -> 2)."""
    from mlcd_train.cli import run_stage

    capsys.readouterr()
    rc = run_stage(name, [str(a) for a in argv])
    return rc, capsys.readouterr().err


def _emb(root, **kw):
    from tests.test_cluster import make_mixture_emb

    make_mixture_emb(root, n_shards=2, n=60, d=8, k=4, **kw)
    return root


def _centroids(tmp_path, emb_root):
    from clustering import kmeans

    cl = tmp_path / "cl"
    assert kmeans.main(["--emb", str(emb_root), "--k", "4", "--out", str(cl), "--threads", "1", "--niter", "2"]) == 0
    return cl


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# ----------------------------------------------------------------------- 2. paths from data

def test_shard_names_from_meta_files_stay_in_their_folder(tmp_path, capsys):
    """A shard name ``../elsewhere/evil`` in EMB/meta.json made assign write outside --out and
    delete a file there; names in sizes.json, the shards progress file and list files too."""
    from clustering import store

    emb = _emb(tmp_path / "emb")
    cl = _centroids(tmp_path, emb)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for suffix in (".npy", ".keys.npy", ".cls.npy"):  # a valid shard, reachable only through ..
        shutil.copy(emb / f"part-000000{suffix}", elsewhere / f"evil{suffix}")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "evil.keys.npy").write_bytes(b"precious")
    meta = json.loads((emb / "meta.json").read_text())
    meta["counts"] = {"../elsewhere/evil": 60}
    (emb / "meta.json").write_text(json.dumps(meta))
    rc, err = _stage("assign", ["--emb", emb, "--centroids", cl / "centroids.npy", "--topk", "2",
                                "--out", tmp_path / "lbl" / "x", "--threads", "1"], capsys)
    assert rc == 2 and "emb/meta.json" in err and "'../elsewhere/evil' is not a plain file name" in err
    assert not list(tmp_path.glob("**/evil.labels.npy"))
    rc, err = _stage("assign", ["--emb", emb, "--centroids", cl / "centroids.npy", "--topk", "2",
                                "--out", victim / "sub", "--overwrite", "--threads", "1"], capsys)
    assert rc == 2 and (victim / "evil.keys.npy").read_bytes() == b"precious"
    with pytest.raises(MLCDError, match="meta.json: shard name"):
        store.open_emb(emb)

    # sizes.json of a shard folder names the tars every reader opens
    from mlcd_train.data.reader import list_shards, read_sizes

    shards = tmp_path / "shards"
    shards.mkdir()
    (tmp_path / "outside.tar").write_bytes(b"")
    (shards / "sizes.json").write_text(json.dumps({"../outside.tar": 1}))
    with pytest.raises(MLCDError, match=r"shards/sizes.json: shard name '../outside.tar'"):
        list_shards(shards)
    (shards / "a.tar").write_bytes(b"")
    (shards / "sizes.json").write_text(json.dumps({"a.tar": "many"}))
    with pytest.raises(MLCDError, match=r"sizes.json: count of 'a.tar'"):
        read_sizes([str(shards / "a.tar")])


def test_list_file_entries_stay_in_the_list_folder(tmp_path, capsys):
    from PIL import Image

    from mlcd_train.data import shards

    (tmp_path / "data").mkdir()
    Image.new("RGB", (4, 4), "red").save(tmp_path / "data" / "in.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "secret.png")
    lst = tmp_path / "data" / "list.txt"
    lst.write_text(f"in.png\n../secret.png\n{tmp_path / 'secret.png'}\n")
    out = tmp_path / "out"
    assert shards.main(["--input", str(lst), "--out", str(out)]) == 0
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["reason"].split(" (")[0] for s in skipped] == [f"outside {tmp_path / 'data'}"] * 2
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 1}
    # --list-root widens the folder on purpose
    assert shards.main(["--input", str(lst), "--out", str(tmp_path / "out2"), "--list-root", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "out2" / "sizes.json").read_text()) == {"shard-000000.tar": 3}


def test_shards_progress_file_names_are_checked(tmp_path):
    from mlcd_train.data import shards

    with pytest.raises(MLCDError, match=r"progress.json: shard name '../../x.tar'"):
        p = tmp_path / "progress.json"
        p.write_text(json.dumps({"signature": "s", "shards": [{"name": "../../x.tar", "count": 1, "consumed": 1}],
                                 "skipped": []}))
        shards._read_progress(p, "shard")
