"""``mlcd:PATH``: our own tower, so a student can re-embed and re-cluster a corpus.

PATH is a native export ``X.pt`` (with its ``X.json`` sidecar), a trainer ``model.pt``, a
``step_XXXXXXXX`` folder, or a run / checkpoints folder (its newest complete checkpoint).
Loading goes through ``mlcd_train.export`` (the same code ``mlcd export`` and ``convert`` use).
Preprocessing: CLIP's eval transform at the model's image size with the trainer's default
CLIP mean/std.  Output: ``model(pixels)`` ([B, output_dim or width]).

It lives in mlcd_train (the towers' package) and is registered with clustering's embedder
registry by ``mlcd_train/__init__.py``: clustering stays below mlcd_train (docs/architecture.md).
"""
from __future__ import annotations

import os

from clustering.embedders import Embedder, clip_transform


class MLCDEmbedder(Embedder):
    def __init__(self, path: str, device=None, **_):
        super().__init__(device)
        from mlcd_train import export

        src = export.find_checkpoint(path) if os.path.isdir(path) else path
        model = export.load_model(src)
        self.model = model.eval().to(self.device)
        cfg = model.config
        self.dim = int(cfg.output_dim or cfg.width)
        self.transform = clip_transform(int(cfg.image_size))
        self.spec = f"mlcd:{os.path.abspath(path)}"
        self.source = os.path.abspath(str(src))

    def forward(self, pixels):
        return self.model(pixels)

    @property
    def weights_path(self):
        return self.source

    def describe(self) -> dict:
        return {"spec": self.spec, "dim": self.dim, "checkpoint": self.source}
