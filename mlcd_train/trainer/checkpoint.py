"""Trainer checkpoints: ``OUT/checkpoints/step_XXXXXXXX/`` (docs/architecture.md).

    model.pt          {"state_dict", "model_config", "step"}   (rank 0)
    optimizer.pt      backbone optimiser state                  (rank 0; replicated under DDP)
    trainer_state.pt  step, samples seen, data position, counters, RNG states of every rank
                      (as tensors and plain values: :func:`rng_state`)
    pfc_rank{r}.pt    each rank's class-centre shard and its optimiser state
    meta.json         written last, after a barrier: its presence marks the checkpoint complete

Under ``train.parallel=fsdp`` (trainer/parallel.py) ``model.pt`` and ``optimizer.pt`` are
replaced by ``model_dcp/`` and ``optim_dcp/``, torch.distributed.checkpoint folders that every
rank writes its part of (resharded on load to any number of ranks); ``meta.json`` then also
holds ``"parallel": "fsdp"`` and the ``model_config`` (what ``mlcd export`` reads beside them).

Every file goes through a temporary name and a rename (utils.io), so a kill during a save
leaves the previous checkpoint untouched and this one without ``meta.json``; such a folder
is ignored by :func:`latest_complete` and removed by the next resume.  Every file is loaded
with ``torch.load(weights_only=True)`` (:func:`load`): a checkpoint cannot run code.  Only the newest
``keep_last`` complete checkpoints are kept.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.io import (atomic_save_json, atomic_torch_save, json_field, load_json, remove_stale_tmp,
                                 safe_torch_load)

STEP_RE = re.compile(r"^step_(\d{8,})$")  # step_dir() pads to 8 digits; later steps have more


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
    """RNG states of python, numpy, torch (and CUDA) as plain values and tensors only, so that
    ``trainer_state.pt`` loads with ``weights_only=True`` (no numpy object is pickled)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                     "gauss_next": gauss},
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                    "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict, where: str = "trainer_state.pt") -> None:
    """Restore what :func:`rng_state` returned; a malformed state is an MLCDError naming ``where``."""
    try:
        py, nps = st["python"], st["numpy"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
        np.random.set_state((str(nps["kind"]), nps["keys"].numpy().astype(np.uint32), int(nps["pos"]),
                             int(nps["has_gauss"]), float(nps["cached_gaussian"])))
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state(st["cuda"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise MLCDError(f"{where}: malformed RNG state ({type(exc).__name__}: {str(exc)[:100]})") from None


def save_main_files(folder: Path, step: int, model_state: dict, model_config: dict,
                    optimizer_state: dict, trainer_state: dict) -> None:
    atomic_torch_save({"state_dict": model_state, "model_config": model_config, "step": step},
                      folder / "model.pt")
    atomic_torch_save(optimizer_state, folder / "optimizer.pt")
    atomic_torch_save(trainer_state, folder / "trainer_state.pt")


def save_trainer_state(folder: Path, state: dict) -> None:
    """``trainer_state.pt`` alone (train.py's fsdp path, whose model and optimiser are sharded)."""
    atomic_torch_save(state, Path(folder) / "trainer_state.pt")


def write_meta(folder: Path, meta: dict) -> None:
    atomic_save_json(folder / "meta.json", meta)


def read_meta(folder: Path) -> dict:
    """``meta.json`` of a checkpoint folder: a dict whose ``step`` is an integer >= 0."""
    path = Path(folder) / "meta.json"
    meta = load_json(path, expect=dict)
    if json_field(meta, "step", int, path) < 0:
        raise MLCDError(f"{path}: key 'step' is negative ({meta['step']})")
    return meta


def load(folder: Path, name: str):
    """One file of a checkpoint folder, loaded with ``weights_only=True``: tensors and plain
    values only, so a tampered file cannot run code.  ``model.pt`` and ``trainer_state.pt``
    are checked for the keys and types the trainer reads (MLCDError naming file and key)."""
    path = Path(folder) / name
    obj = safe_torch_load(path, "checkpoint file")
    if name in _EXPECTED:
        if not isinstance(obj, dict):
            raise MLCDError(f"{path}: not an mlcd checkpoint file (a {type(obj).__name__}, not a dict)")
        for key, kind in _EXPECTED[name].items():
            if key not in obj:
                raise MLCDError(f"{path}: key {key!r} is missing")
            if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
                raise MLCDError(f"{path}: key {key!r} should be {getattr(kind, '__name__', kind)}, "
                                f"found {type(obj[key]).__name__}")
        if name == "trainer_state.pt":
            for key in ("rng", "positions"):
                v = obj.get(key)
                if key in obj and (not isinstance(v, list) or len(v) != obj["world_size"]
                                   or not all(isinstance(r, dict) for r in v)):
                    raise MLCDError(f"{path}: key {key!r} should hold one dict per rank "
                                    f"(world_size {obj['world_size']})")
    return obj


_EXPECTED = {
    "model.pt": {"state_dict": dict, "model_config": dict, "step": int},
    "trainer_state.pt": {"step": int, "world_size": int, "rng": list},
}
