"""``pca``: a weights-free baseline embedder for offline use.

Pixels resized to ``image_size`` x ``image_size`` RGB (values in [0, 1], flattened), centred and
PCA-whitened to ``dim``: ``z = (x - mean) @ components.T / sqrt(eigenvalues + eps)``.  The
projection is fitted on a sample (:meth:`PCAEmbedder.fit`) and saved as an ``.npz``
(``mean``, ``components``, ``eigenvalues``, ``image_size``) beside the embeddings
(``EMB/pca.npz``); ``get_embedder("pca:EMB/pca.npz")`` applies it to another split.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from clustering.embedders import Embedder
from mlcd_core.errors import MLCDError

EPS = 1e-5


class PCAEmbedder(Embedder):
    state_key = "projection"  # describe()'s key naming the fitted file (EMB/pca.npz, kept relative)

    def __init__(self, dim: int = 64, image_size: int = 32, projection: str | None = None, device=None,
                 pca_fit_samples: int = 5000, **_):
        super().__init__(device="cpu" if device is None else device, autocast=False)
        self.image_size = int(image_size)
        self.dim = int(dim)
        self.fit_samples = int(pca_fit_samples)
        self.projection = None
        self.mean = self.w = None
        if projection is not None:
            self.load(projection)
        self.spec = "pca"

    @property
    def needs_fit(self) -> bool:
        return self.w is None

    @property
    def transform(self):
        return _PixelTransform(self.image_size)

    def fit(self, batches) -> "PCAEmbedder":
        """Fit on an iterable of [B, 3, S, S] tensors (the transform's output)."""
        xs = [b.reshape(len(b), -1).double() for b in batches]
        if not xs:
            raise MLCDError("pca: no images to fit the projection on")
        x = torch.cat(xs)
        n, f = x.shape
        if self.dim > min(n - 1, f):
            raise MLCDError(f"pca: --dim {self.dim} needs more than {self.dim} fit images and at most "
                            f"{f} pixels values (got {n} images)")
        mean = x.mean(0)
        xc = x - mean
        cov = xc.T @ xc / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: self.dim]
        self._set(mean.numpy(), evecs[:, order].T.numpy(), evals[order].clamp_min(0).numpy())
        return self

    def _set(self, mean, components, eigenvalues):
        self.mean_np, self.components_np, self.eigen_np = mean, components, eigenvalues
        self.mean = torch.from_numpy(np.asarray(mean, dtype=np.float32))
        w = np.asarray(components, dtype=np.float64) / np.sqrt(np.asarray(eigenvalues, dtype=np.float64) + EPS)[:, None]
        self.w = torch.from_numpy(w.astype(np.float32))  # [dim, f]
        self.dim = int(self.w.shape[0])

    def save(self, path) -> None:
        from mlcd_core.io import atomic_open

        with atomic_open(path, "wb") as f:
            np.savez(f, mean=self.mean_np, components=self.components_np, eigenvalues=self.eigen_np,
                     image_size=np.int64(self.image_size))
        self.projection = os.path.abspath(path)

    def load(self, path) -> None:
        from mlcd_core.io import safe_np_load

        try:  # a regular file, never unpickled
            z = safe_np_load(path, "pca projection")
            mean, comp, ev, size = z["mean"], z["components"], z["eigenvalues"], int(z["image_size"])
        except (KeyError, ValueError, OSError, TypeError, AttributeError) as exc:
            raise MLCDError(f"{path}: not a pca projection (.npz with mean, components, eigenvalues, "
                            f"image_size): {exc}") from None
        self.image_size = size
        self._set(mean, comp, ev)
        self.projection = os.path.abspath(path)

    def resume(self, path) -> None:
        """Load the projection an earlier run fitted into this EMB folder; refused when it is not
        of the ``dim`` and ``image_size`` asked now."""
        asked = (self.dim, self.image_size)
        self.load(path)
        if (self.dim, self.image_size) != asked:
            raise MLCDError(f"{path}: holds a dim-{self.dim} projection, --dim {asked[0]} was asked "
                            f"(image size {self.image_size} vs {asked[1]}); use --overwrite or another --out")

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            raise MLCDError("pca: the projection is not fitted (fit() or pca:PATH)")
        x = pixels.reshape(len(pixels), -1).float().cpu()
        return (x - self.mean) @ self.w.T

    @property
    def weights_path(self):
        return self.projection

    def describe(self) -> dict:
        return {"spec": self.spec, "dim": self.dim, "image_size": self.image_size, "projection": self.projection}


class _PixelTransform:
    """PIL RGB -> float tensor [3, S, S] in [0, 1] (bilinear resize); PIL only, picklable."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img):
        from PIL import Image

        from mlcd_core.reader import to_rgb8

        img = to_rgb8(img).resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
