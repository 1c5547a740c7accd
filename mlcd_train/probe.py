"""``mlcd probe``: linear probe and k-NN classification on frozen features.

Two standard ways to judge a representation without fine-tuning it:

* **Linear probe**, following CLIP's protocol (Radford et al. 2021, appendix A.3): a
  multinomial logistic regression fitted with L-BFGS on standardised features; the L2
  strength is chosen on a held-out part of the training split (a log-spaced sweep), then the
  classifier is refitted on the whole training split with that strength and scored on the
  test split.  Implemented in torch (``torch.optim.LBFGS``, full batch), no new dependency.
* **k-NN**, as in InstDisc / DINO: cosine similarity to every training feature, the k = 20
  nearest vote for their class with weight ``exp(sim / T)``, T = 0.07.

The command embeds a train and a test shard folder (shards with ground-truth ``cls``)
with any embedder of the clustering registry (``pca``, ``open_clip:NAME``, ``hf:PATH``,
``mlcd:PATH``), caches the features under ``OUT/features/<embedder-slug>/<split>.npy``
(reused when present), prints top-1 accuracies and writes ``OUT/probe.json``.

The core functions (:func:`linear_probe`, :func:`knn_classify`) work on in-memory arrays.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mlcd_train.utils.errors import MLCDError

DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-6, 1, 8))


# --------------------------------------------------------------------------- linear probe
def _standardise(train: torch.Tensor, *others: torch.Tensor):
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float,
                            max_iter: int = 500, tol: float = 1e-7):
    """Multinomial logistic regression, full-batch L-BFGS.

    Minimises ``mean cross-entropy + l2 * ||W||^2`` (the bias is not penalised).
    Returns ``(W [d, C], b [C])`` in float64.
    """
    x = x.double()
    y = y.long()
    d = x.shape[1]
    w = torch.zeros(d, num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(w, b, x, y) -> float:
    if len(y) == 0:
        return float("nan")
    pred = (x.double() @ w + b).argmax(1)
    return float((pred == y.long()).double().mean())


def linear_probe(train_x, train_y, test_x, test_y, l2_grid=DEFAULT_L2_GRID, val_fraction: float = 0.2,
                 seed: int = 0, max_iter: int = 500, num_classes: int | None = None) -> dict:
    """CLIP-style linear probe; returns top-1 on the test split and the sweep.

    ``l2_grid``: L2 strengths tried on the held-out ``val_fraction`` of the training split
    (the best validation accuracy wins; ties go to the stronger regularisation).  With a
    single value, no validation split is made.
    """
    tx = torch.as_tensor(np.asarray(train_x), dtype=torch.float64)
    ty = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    vx = torch.as_tensor(np.asarray(test_x), dtype=torch.float64)
    vy = torch.as_tensor(np.asarray(test_y), dtype=torch.long)
    if tx.ndim != 2 or vx.ndim != 2 or tx.shape[1] != vx.shape[1]:
        raise MLCDError(f"linear probe: features must be [n, d] with the same d, got {tuple(tx.shape)} "
                        f"and {tuple(vx.shape)}")
    if len(tx) != len(ty) or len(vx) != len(vy):
        raise MLCDError("linear probe: features and labels have different lengths")
    if num_classes is None:
        num_classes = int(max(ty.max(), vy.max() if len(vy) else 0)) + 1
    grid = [float(v) for v in l2_grid]
    sweep = []
    if len(grid) > 1:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(tx), generator=g)
        n_val = max(1, int(round(len(tx) * val_fraction)))
        val_idx, fit_idx = perm[:n_val], perm[n_val:]
        fx, sx = _standardise(tx[fit_idx], tx[val_idx])
        best = None
        for l2 in grid:
            w, b = fit_logistic_regression(fx, ty[fit_idx], num_classes, l2, max_iter=max_iter)
            acc = _accuracy(w, b, sx, ty[val_idx])
            sweep.append({"l2": l2, "val_top1": acc})
            if best is None or acc >= best[1]:  # >=: ties go to the larger l2 (grid ascending)
                best = (l2, acc)
        best_l2 = best[0]
    else:
        best_l2 = grid[0]
    fx, sx = _standardise(tx, vx)
    w, b = fit_logistic_regression(fx, ty, num_classes, best_l2, max_iter=max_iter)
    return {"top1": _accuracy(w, b, sx, vy), "train_top1": _accuracy(w, b, fx, ty), "l2": best_l2,
            "sweep": sweep, "num_classes": num_classes, "n_train": len(tx), "n_test": len(vx)}


# --------------------------------------------------------------------------- k-NN
def knn_predict(train_x, train_y, test_x, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, batch_size: int = 1024) -> np.ndarray:
    """Cosine k-NN with ``exp(sim / T)`` weighted votes; returns the predicted class of each test row."""
    tx = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_x), dtype=torch.float32), dim=1)
    ty = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    qx = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_x), dtype=torch.float32), dim=1)
    if num_classes is None:
        num_classes = int(ty.max()) + 1
    k = min(k, len(tx))
    preds = []
    for start in range(0, len(qx), batch_size):
        sim = qx[start:start + batch_size] @ tx.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, ty[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)


def knn_classify(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> dict:
    test_y = np.asarray(test_y)
    if num_classes is None:
        num_classes = int(max(np.max(train_y), np.max(test_y) if len(test_y) else 0)) + 1
    pred = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)
    top1 = float((pred == test_y).mean()) if len(test_y) else float("nan")
    return {"top1": top1, "k": k, "temperature": temperature}
