"""Evaluation during training: a k-NN top-1 of the current backbone on held-out ground truth.

``eval.train`` (the k-NN's memory) and ``eval.test`` (what is scored) are shard folders with
ground-truth ``cls`` (``mlcd shards`` output); every ``eval.every`` steps and at the last step
rank 0 embeds both with the backbone in eval mode and scores a cosine k-NN (k = 20, votes
weighted by exp(sim / 0.07), as ``mlcd probe``).  The images are decoded once, resized (the
shorter side, bicubic) and centre-cropped to the model's size, and kept in memory as uint8
(``eval.max_train`` / ``eval.max_test`` cap how many).

Nothing here touches the training stream: the loader is not read, the backbone runs under
``no_grad`` in eval mode (batch-norm statistics and drop path untouched) and every random
draw happens inside ``torch.random.fork_rng``, so a run with evaluation ends on the very
same weights as one without (a test checks this), and exact resume still holds.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mlcd_train.utils.errors import MLCDError


def _load_split(shards: str, image_size: int, limit: int) -> tuple[torch.Tensor, np.ndarray]:
    from PIL import Image

    from mlcd_train.data.reader import ShardDataset

    images, labels = [], []
    for s in ShardDataset(shards, rank=0, world_size=1):
        if s.cls is None:
            raise MLCDError(f"config key 'eval.train'/'eval.test': shard {s.shard} sample {s.key!r} has no "
                            "ground-truth class (cls); evaluation needs labelled shards")
        img = s.image.convert("RGB")
        w, h = img.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        images.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        labels.append(int(s.cls))
        if limit and len(images) >= limit:
            break
    if not images:
        raise MLCDError(f"{shards}: no samples for evaluation")
    return torch.stack(images), np.asarray(labels, dtype=np.int64)


class KNNEvaluator:
    """k-NN top-1 of a backbone on (eval.train, eval.test); built on rank 0 only."""

    def __init__(self, ecfg, image_size: int, mean, std, device: torch.device):
        self.cfg = ecfg
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.train_x, self.train_y = _load_split(ecfg.train, image_size, ecfg.max_train)
        self.test_x, test_y = _load_split(ecfg.test, image_size, ecfg.max_test)
        # a split numbers its classes on its own: test ids mapped to the training ids by name (as the probe does)
        from mlcd_train.probe import align_test_classes

        self.test_y = align_test_classes(ecfg.train, ecfg.test, test_y)

    @torch.no_grad()
    def _embed(self, model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
        out = []
        bs = self.cfg.batch_size
        for i in range(0, len(images), bs):
            x = images[i:i + bs].float().div_(255.0)
            x = ((x - self.mean) / self.std).to(self.device)
            out.append(model(x).float().cpu())
        return torch.cat(out).numpy()

    def evaluate(self, model: torch.nn.Module) -> float:
        """k-NN top-1 (a fraction) of ``model``; its train/eval mode and every RNG are left as found."""
        from mlcd_train.probe import knn_classify

        was = model.training
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model.eval()
            try:
                tr = self._embed(model, self.train_x)
                te = self._embed(model, self.test_x)
            finally:
                model.train(was)
        n = int(max(self.train_y.max(), self.test_y.max())) + 1
        return knn_classify(tr, self.train_y, te, self.test_y, k=self.cfg.knn_k,
                            temperature=self.cfg.temperature, num_classes=n)["top1"]


def best_meta(out: Path) -> dict | None:
    """``OUT/best/meta.json`` (step and k-NN top-1 of the best checkpoint so far), or None."""
    from mlcd_train.utils.io import load_json

    p = Path(out) / "best" / "meta.json"
    if not p.is_file():
        return None
    try:  # read as any meta file (regular file, size checked); a bad one counts as no best yet
        d = load_json(p, expect=dict)
    except MLCDError:
        return None
    return d if isinstance(d.get("knn_top1"), (int, float)) else None


def save_best(out: Path, step: int, top1: float, state_dict: dict, model_config: dict) -> None:
    """``OUT/best/model.pt`` (the trainer's model.pt format) then ``meta.json``: a kill between
    the two leaves no meta.json, and the folder counts as incomplete (never as the old best)."""
    from mlcd_train.utils.io import atomic_save_json, atomic_torch_save

    folder = Path(out) / "best"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        os.unlink(folder / "meta.json")
    except FileNotFoundError:
        pass
    atomic_torch_save({"state_dict": state_dict, "model_config": model_config, "step": step}, folder / "model.pt")
    atomic_save_json(folder / "meta.json", {"step": step, "knn_top1": top1})
