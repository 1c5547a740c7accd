"""Embedder registry: a spec string -> an object that turns images into vectors.

    from clustering.embedders import get_embedder
    e = get_embedder("open_clip:ViT-B-32", pretrained="/models/vitb32.bin", device="cuda")
    e = get_embedder("hf:/models/clip-vit-large")          # a local Hugging Face directory
    e = get_embedder("mlcd:runs/exp1")                     # our trainer's checkpoint or export
    e = get_embedder("pca", dim=64, image_size=32)         # weights-free; call e.fit(...) first
    e = get_embedder("pca:EMB/pca.npz")                    # a fitted projection, re-loaded

Every embedder has:
  ``spec``       the canonical spec string recorded in EMB/meta.json;
  ``dim``        the output dimension;
  ``transform``  PIL RGB image -> float tensor [3, H, W] (run in DataLoader workers);
  ``__call__(batch)``  float tensor [B, 3, H, W] -> float32 tensor [B, dim], NOT normalised
                 (``mlcd embed`` L2-normalises); runs under ``torch.inference_mode`` and, on
                 CUDA, bf16 autocast;
  ``device``, ``to(device)``, ``describe()`` (a dict for meta.json);
  ``needs_fit`` (True for an unfitted pca) with ``fit(batches)`` and ``save(path)``.
"""
from __future__ import annotations

import contextlib

import torch

from mlcd_train.utils.errors import MLCDError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)



class Embedder:
    """Base class: subclasses set spec, dim, transform and implement ``forward``."""

    spec: str = ""
    dim: int = 0
    needs_fit: bool = False

    def __init__(self, device=None, autocast: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = autocast

    def to(self, device):
        self.device = torch.device(device)
        m = getattr(self, "model", None)
        if m is not None:
            m.to(self.device)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16)
               if self.autocast and self.device.type == "cuda" else contextlib.nullcontext())
        with torch.inference_mode(), ctx:
            out = self.forward(batch.to(self.device, non_blocking=True))
        return out.float()

    def describe(self) -> dict:
        return {"spec": self.spec, "dim": self.dim}

    #: the file (or model folder) the weights come from; None when there is none (a tag)
    weights_path: str | None = None

    def identity(self) -> dict:
        """describe() plus a content fingerprint of the weights: what EMB/meta.json records,
        so a rerun into the same folder refuses to mix rows of two models under one spec
        (another --pretrained file, a run folder whose newest checkpoint moved on, a refit)."""
        from clustering.store import file_fingerprint

        ident = dict(self.describe())
        ident["weights_sha"] = file_fingerprint(self.weights_path) if self.weights_path else None
        return ident


def clip_transform(image_size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """Resize (shorter side, bicubic), centre crop, to tensor, normalise: CLIP's eval transform."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def get_embedder(spec: str, **opts) -> Embedder:
    """Build the embedder named by ``spec`` (see the module docstring); options per kind:

    open_clip: pretrained (tag or local file), device; hf: device; mlcd: device;
    pca: dim, image_size, projection (path of a fitted projection), device.
    """
    kind, _, arg = spec.partition(":")
    opts = {k: v for k, v in opts.items() if v is not None}
    if kind == "open_clip":
        from clustering.embedders.open_clip import OpenClipEmbedder

        if not arg:
            raise MLCDError("open_clip embedder needs a model name: open_clip:NAME (or a config .json)")
        return OpenClipEmbedder(arg, **opts)
    if kind == "hf":
        from clustering.embedders.hf import HFEmbedder

        if not arg:
            raise MLCDError("hf embedder needs a local directory: hf:PATH")
        return HFEmbedder(arg, **opts)
    if kind == "mlcd":
        from clustering.embedders.mlcd import MLCDEmbedder

        if not arg:
            raise MLCDError("mlcd embedder needs a checkpoint or export: mlcd:PATH")
        return MLCDEmbedder(arg, **opts)
    if kind == "pca":
        from clustering.embedders.pca import PCAEmbedder

        if arg:
            opts["projection"] = arg
        return PCAEmbedder(**opts)
    raise MLCDError(f"unknown embedder {spec!r}: use one of open_clip:NAME, hf:PATH, mlcd:PATH, pca")
