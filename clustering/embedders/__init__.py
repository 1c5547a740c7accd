"""Embedder registry: a spec string -> an object that turns images into vectors.

    from clustering.embedders import get_embedder
    e = get_embedder("open_clip:ViT-B-32", pretrained="/models/vitb32.bin", device="cuda")
    e = get_embedder("hf:/models/clip-vit-large")          # a local Hugging Face directory
    e = get_embedder("mlcd:runs/exp1")                     # our trainer's checkpoint or export
    e = get_embedder("pca", dim=64, image_size=32)         # weights-free; call e.fit(...) first
    e = get_embedder("pca:EMB/pca.npz")                    # a fitted projection, re-loaded

A kind is one module and one :func:`register_embedder` call (``KIND:ARG`` specs go to its
factory).  ``open_clip``, ``hf`` and ``pca`` are registered here; ``mlcd`` (our own tower) is
registered by the ``mlcd_train`` package, which owns the towers it loads (importing any
``mlcd_train`` module registers it; clustering never imports mlcd_train, see
docs/architecture.md).  :func:`embedder_kinds` lists what is registered.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from mlcd_core.errors import MLCDError

if TYPE_CHECKING:  # torch is imported where it is used: `mlcd --help` imports this module
    import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)



class Embedder:
    """Base class: subclasses set spec, dim, transform and implement ``forward``."""

    spec: str = ""
    dim: int = 0
    needs_fit: bool = False

    def __init__(self, device=None, autocast: bool = True):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.autocast = autocast

    def to(self, device):
        import torch

        self.device = torch.device(device)
        m = getattr(self, "model", None)
        if m is not None:
            m.to(self.device)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        import torch

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


@dataclass(frozen=True)
class EmbedderKind:
    """One registered embedder kind: ``factory(arg, **opts)`` builds it from a ``KIND:ARG`` spec."""

    name: str
    factory: Callable[..., Embedder]
    usage: str                   # how a spec of this kind is written, e.g. "hf:PATH"
    missing_arg: Optional[str]   # the error when ARG is empty; None: the bare kind is valid ("pca")
    order: int = 100             # position in error messages and listings
    arg_is_path: bool = False    # ARG names a file or folder it reads (made absolute, kept apart from outputs)


_KINDS: dict[str, EmbedderKind] = {}


def register_embedder(name: str, factory: Callable[..., Embedder], *, usage: str,
                      missing_arg: Optional[str] = None, order: int = 100, arg_is_path: bool = False) -> None:
    """Register an embedder kind (idempotent for the same name; a later call replaces it)."""
    if not name or ":" in name:
        raise ValueError(f"embedder kind {name!r}: a non-empty name without ':'")
    _KINDS[name] = EmbedderKind(name, factory, usage, missing_arg, order, arg_is_path)


def spec_path(spec: str) -> Optional[str]:
    """The file or folder a spec's ARG names when its kind reads one (``hf:PATH``, ``mlcd:PATH``,
    ``pca:FILE``), else None."""
    kind, sep, arg = spec.partition(":")
    entry = _KINDS.get(kind)
    return arg if sep and arg and entry is not None and entry.arg_is_path else None


def embedder_kinds() -> list[EmbedderKind]:
    """The registered kinds, in their listing order."""
    return sorted(_KINDS.values(), key=lambda k: (k.order, k.name))


def get_embedder(spec: str, **opts) -> Embedder:
    """Build the embedder named by ``spec`` (see the module docstring); options per kind:

    open_clip: pretrained (tag or local file), device; hf: device; mlcd: device;
    pca: dim, image_size, projection (path of a fitted projection), device.
    """
    kind, _, arg = spec.partition(":")
    opts = {k: v for k, v in opts.items() if v is not None}
    entry = _KINDS.get(kind)
    if entry is None:
        usages = ", ".join(k.usage for k in embedder_kinds())
        hint = ("" if kind != "mlcd" else
                " (mlcd:PATH is registered by the mlcd_train package: run `mlcd embed`, under torchrun "
                "`torchrun ... -m mlcd_train.cli embed ...`, or import mlcd_train first)")
        raise MLCDError(f"unknown embedder {spec!r}: use one of {usages}{hint}")
    if not arg and entry.missing_arg is not None:
        raise MLCDError(entry.missing_arg)
    return entry.factory(arg, **opts)


def _open_clip(arg: str, **opts) -> Embedder:
    from clustering.embedders.open_clip import OpenClipEmbedder

    return OpenClipEmbedder(arg, **opts)


def _hf(arg: str, **opts) -> Embedder:
    from clustering.embedders.hf import HFEmbedder

    return HFEmbedder(arg, **opts)


def _pca(arg: str, **opts) -> Embedder:
    from clustering.embedders.pca import PCAEmbedder

    if arg:
        opts["projection"] = arg
    return PCAEmbedder(**opts)


register_embedder("open_clip", _open_clip, usage="open_clip:NAME", order=10,
                  missing_arg="open_clip embedder needs a model name: open_clip:NAME (or a config .json)")
register_embedder("hf", _hf, usage="hf:PATH", order=20, missing_arg="hf embedder needs a local directory: hf:PATH",
                  arg_is_path=True)
register_embedder("pca", _pca, usage="pca", order=5, arg_is_path=True)  # weights-free: listed first
