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
