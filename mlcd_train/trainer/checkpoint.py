"""Trainer checkpoints: ``OUT/checkpoints/step_XXXXXXXX/`` (docs/architecture.md).

    model.pt          {"state_dict", "model_config", "step"}   (rank 0)
    optimizer.pt      backbone optimiser state                  (rank 0; replicated under DDP)
    trainer_state.pt  step, samples seen, data position, counters, RNG states of every rank
    pfc_rank{r}.pt    each rank's class-centre shard and its optimiser state
    meta.json         written last, after a barrier: its presence marks the checkpoint complete

Every file goes through a temporary name and a rename (utils.io), so a kill during a save
leaves the previous checkpoint untouched and this one without ``meta.json``; such a folder
is ignored by :func:`latest_complete` and removed by the next resume.  Only the newest
``keep_last`` complete checkpoints are kept.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mlcd_train.utils.io import atomic_save_json, atomic_torch_save, load_json, remove_stale_tmp

STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) sorted by step; with ``complete_only`` only folders that have meta.json."""
    root = Path(root)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and (not complete_only or (p / "meta.json").is_file()):
                out.append((int(m.group(1)), p))
    return sorted(out)


def latest_complete(root: Path) -> Path | None:
    ck = list_checkpoints(root)
    return ck[-1][1] if ck else None


def clean_incomplete(root: Path) -> list[Path]:
    """Remove step folders without meta.json (a save that was killed); rank 0 only."""
    removed = []
    for _, p in list_checkpoints(root, complete_only=False):
        if not (p / "meta.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        else:
            remove_stale_tmp(p)
    return removed


def prune(root: Path, keep_last: int) -> None:
    ck = list_checkpoints(root)
    for _, p in ck[:-keep_last] if keep_last > 0 else []:
        # meta.json first: a kill during the rmtree leaves an incomplete folder, never one
        # still marked complete with some of its files gone
        (p / "meta.json").unlink(missing_ok=True)
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_main_files(folder: Path, step: int, model_state: dict, model_config: dict,
                    optimizer_state: dict, trainer_state: dict) -> None:
    atomic_torch_save({"state_dict": model_state, "model_config": model_config, "step": step},
                      folder / "model.pt")
    atomic_torch_save(optimizer_state, folder / "optimizer.pt")
    atomic_torch_save(trainer_state, folder / "trainer_state.pt")


def write_meta(folder: Path, meta: dict) -> None:
    atomic_save_json(folder / "meta.json", meta)


def read_meta(folder: Path) -> dict:
    return load_json(Path(folder) / "meta.json")


def load(folder: Path, name: str):
    return torch.load(Path(folder) / name, map_location="cpu", weights_only=False)
