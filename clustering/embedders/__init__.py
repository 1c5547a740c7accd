"""Embedder registry: a spec string -> an object that turns images into vectors.

    from clustering.embedders import get_embedder
    e = get_embedder("open_clip:ViT-B-32", pretrained="/models/vitb32.bin", device="cuda")
    e = get_embedder("hf:/models/clip-vit-large")          # a local Hugging Face directory
    e = get_embedder("mlcd:runs/exp1")                     # our trainer's checkpoint or export
    e = get_embedder("pca", dim=64, image_size=32)         # weights-free; call e.fit(...) first
    e = get_embedder("pca:EMB/pca.npz")                    # a fitted projection, re-loaded

A kind is one module (its :class:`Embedder` subclass) and one :func:`register_embedder` call
(``KIND:ARG`` specs go to its factory).  ``open_clip``, ``hf`` and ``pca`` are registered here;
``mlcd`` (our own tower) is registered by the ``mlcd_train`` package, which owns the towers
it loads (importing any ``mlcd_train`` module registers it; clustering never imports
mlcd_train, see docs/architecture.md).  :func:`embedder_kinds` lists what is registered.

What the stages need to know of a kind comes from its registration, never from its name:

  ``options``     the :class:`EmbedderOption` s it takes (``mlcd embed``'s flags and
                 :func:`clustering.embed.embed`'s keywords; those with a ``probe_flag`` are
                 ``mlcd probe``'s too);
  ``reads``       the files a spec reads besides a path ARG (kept apart from any output);
  ``state_file``  for a kind fitted on the corpus: the file in EMB its fitted state is saved
                 to, which ``KIND:EMB/FILE`` re-loads (:func:`fitted_spec`: the probe
                 embeds its test split with the state fitted on the training split).

Every embedder has:
  ``spec``       the canonical spec string recorded in EMB/meta.json;
  ``dim``        the output dimension;
  ``transform``  PIL RGB image -> float tensor [3, H, W] (run in DataLoader workers);
  ``__call__(batch)``  float tensor [B, 3, H, W] -> float32 tensor [B, dim], NOT normalised
                 (``mlcd embed`` L2-normalises); runs under ``torch.inference_mode`` and, on
                 CUDA, bf16 autocast;
  ``device``, ``to(device)``, ``describe()`` (a dict for meta.json), ``identity()``;
  a fitted kind also: ``needs_fit`` (True until fitted or loaded), ``fit_samples`` (the
  first images of the shards the fit reads), ``fit(batches)``, ``save(path)``,
  ``load(path)``, ``resume(path)`` (a state saved by an earlier run into the same folder,
  refused when it contradicts the options asked now) and ``state_key`` (the describe() key
  naming the state file, recorded relative to EMB).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from mlcd_core.args import positive_int
from mlcd_core.errors import MLCDError

if TYPE_CHECKING:  # torch is imported where it is used: `mlcd --help` imports this module
    import torch

#: images a CPU forward takes at once (``Embedder.__call__`` slices a larger batch)
CPU_CHUNK = 128
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)



class Embedder:
    """Base class: subclasses set spec, dim, transform and implement ``forward``; a kind fitted
    on the corpus (``state_file`` in its registration) also ``needs_fit``, ``fit_samples``,
    ``fit``, ``save``, ``load`` and, when it checks a saved state against its options,
    ``resume``."""

    spec: str = ""
    dim: int = 0
    needs_fit: bool = False
    #: how many images (the first ones of the shards, in shard order) ``fit`` is given
    fit_samples: int = 0
    #: the describe() key naming the fitted state file (recorded relative to EMB); None: none
    state_key: Optional[str] = None

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
            batch = batch.to(self.device, non_blocking=True)
            step = CPU_CHUNK if self.device.type == "cpu" else len(batch)
            if len(batch) <= step:
                return self.forward(batch).float()
            # on the CPU a large batch runs in slices of CPU_CHUNK images: a tower's activations
            # then stay in cache (ResNet-18-w16-28 on one thread: 396 img/s at 1024, 833 at 128)
            return torch.cat([self.forward(batch[i:i + step]).float() for i in range(0, len(batch), step)])

    def describe(self) -> dict:
        return {"spec": self.spec, "dim": self.dim}

    def fit(self, batches) -> "Embedder":  # pragma: no cover - fitted kinds only
        """Fit on the transformed images: an iterable of [B, 3, H, W] tensors."""
        raise NotImplementedError(f"{type(self).__name__} is not fitted on data")

    def save(self, path) -> None:  # pragma: no cover - fitted kinds only
        raise NotImplementedError(f"{type(self).__name__} has no fitted state to save")

    def load(self, path) -> None:  # pragma: no cover - fitted kinds only
        raise NotImplementedError(f"{type(self).__name__} has no fitted state to load")

    def resume(self, path) -> None:
        """Load the state an earlier run fitted into this folder; a subclass refuses one that
        contradicts the options asked now (an MLCDError naming ``path``)."""
        self.load(path)

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
class EmbedderOption:
    """An option of an embedder kind: ``name`` is the keyword of the kind's factory and of
    :func:`clustering.embed.embed`, ``flag`` is ``mlcd embed``'s flag, ``probe_flag`` (None: not
    offered) ``mlcd probe``'s, whose name with ``_`` is :func:`mlcd_train.probe.probe`'s keyword.
    One option may serve several kinds (registered once per kind, the same declaration)."""

    name: str
    flag: str
    type: Callable[[str], Any]
    default: Any
    help: str
    probe_flag: Optional[str] = None

    @property
    def probe_name(self) -> Optional[str]:
        return self.probe_flag.lstrip("-").replace("-", "_") if self.probe_flag else None


@dataclass(frozen=True)
class EmbedderKind:
    """One registered embedder kind: ``factory(arg, **opts)`` builds it from a ``KIND:ARG`` spec
    (``opts``: ``device`` and the values of its ``options``)."""

    name: str
    factory: Callable[..., Embedder]
    usage: str                   # how a spec of this kind is written, e.g. "hf:PATH"
    missing_arg: Optional[str]   # the error when ARG is empty; None: the bare kind is valid ("pca")
    order: int = 100             # position in error messages and listings
    arg_is_path: bool = False    # ARG names a file or folder it reads (made absolute, kept apart from outputs)
    options: tuple = ()          # EmbedderOption s it takes
    state_file: Optional[str] = None  # fitted on the corpus: saved as EMB/<state_file>, reloaded by KIND:FILE
    forms: Optional[str] = None  # the spec forms in --model's help (default: usage)
    reads: Optional[Callable[[str, dict], list]] = None  # (arg, options) -> [(option name or None, path)]


_KINDS: dict[str, EmbedderKind] = {}


def register_embedder(name: str, factory: Callable[..., Embedder], *, usage: str,
                      missing_arg: Optional[str] = None, order: int = 100, arg_is_path: bool = False,
                      options: tuple = (), state_file: Optional[str] = None, forms: Optional[str] = None,
                      reads: Optional[Callable[[str, dict], list]] = None) -> None:
    """Register an embedder kind (idempotent for the same name; a later call replaces it).

    ``options``: its :class:`EmbedderOption` s; ``state_file``: the file name in EMB of a
    state the kind fits on the corpus (its embedders then have ``needs_fit`` and the fit
    hooks, and ``KIND:FILE`` must re-load such a file); ``reads(arg, options)``: the files a
    spec reads beyond a path ARG, as (option name, path) pairs; ``forms``: --model's help."""
    if not name or ":" in name:
        raise ValueError(f"embedder kind {name!r}: a non-empty name without ':'")
    for o in options:
        other = next((x for k in _KINDS.values() if k.name != name for x in k.options
                      if x.name == o.name or x.flag == o.flag), None)
        if other is not None and other != o:
            raise ValueError(f"embedder kind {name!r}: option {o.name!r} ({o.flag}) differs from the one "
                             f"another kind declares ({other.name!r}, {other.flag})")
    _KINDS[name] = EmbedderKind(name, factory, usage, missing_arg, order, arg_is_path, tuple(options),
                                state_file, forms, reads)


def unregister_embedder(name: str) -> None:
    """Remove a kind (tests that register one of their own)."""
    _KINDS.pop(name, None)


def spec_path(spec: str) -> Optional[str]:
    """The file or folder a spec's ARG names when its kind reads one (``hf:PATH``, ``mlcd:PATH``,
    ``pca:FILE``), else None."""
    kind, sep, arg = spec.partition(":")
    entry = _KINDS.get(kind)
    return arg if sep and arg and entry is not None and entry.arg_is_path else None


def spec_reads(spec: str, options: Optional[dict] = None) -> list:
    """What a spec (with these option values) reads, as (option name, path) pairs; the option
    name is None for the spec's own ARG.  An unknown kind reads nothing (it is refused later)."""
    kind, _, arg = spec.partition(":")
    entry = _KINDS.get(kind)
    if entry is None:
        return []
    path = spec_path(spec)
    found = [(None, path)] if path else []
    if entry.reads is not None:
        found += list(entry.reads(arg, dict(options or {})))
    return found


def fitted_spec(spec: str, folder: str) -> Optional[str]:
    """The spec that applies the state ``embed`` fits into the EMB ``folder`` for ``spec``
    (``KIND:folder/<state_file>``), or None when ``spec`` fits nothing (a kind without
    ``state_file``, or a spec that already names its state file)."""
    kind, _, arg = spec.partition(":")
    entry = _KINDS.get(kind)
    if entry is None or entry.state_file is None or arg:
        return None
    return f"{kind}:{os.path.join(folder, entry.state_file)}"


def embedder_kinds() -> list[EmbedderKind]:
    """The registered kinds, in their listing order."""
    return sorted(_KINDS.values(), key=lambda k: (k.order, k.name))


def embedder_options() -> list[EmbedderOption]:
    """Every kind's options, once each, in the kinds' listing order."""
    seen: dict[str, EmbedderOption] = {}
    for k in embedder_kinds():
        for o in k.options:
            seen.setdefault(o.name, o)
    return list(seen.values())


def model_help() -> str:
    """The spec forms of every registered kind, for a --model flag's help."""
    return " | ".join(k.forms or k.usage for k in embedder_kinds())


def embedder_kind(spec: str) -> EmbedderKind:
    """The registered kind of ``spec``; an unknown kind is an MLCDError listing the known ones."""
    kind = spec.partition(":")[0]
    entry = _KINDS.get(kind)
    if entry is None:
        usages = ", ".join(k.usage for k in embedder_kinds())
        hint = ("" if kind != "mlcd" else
                " (mlcd:PATH is registered by the mlcd_train package: run `mlcd embed`, under torchrun "
                "`torchrun ... -m mlcd_train.cli embed ...`, or import mlcd_train first)")
        raise MLCDError(f"unknown embedder {spec!r}: use one of {usages}{hint}")
    return entry


def kind_options(spec: str, values: dict) -> dict:
    """The option values ``spec``'s kind takes, from ``values`` (option name -> value; None or
    absent: the option's default); options of other kinds are left out."""
    return {o.name: o.default if values.get(o.name) is None else values[o.name]
            for o in embedder_kind(spec).options}


def get_embedder(spec: str, **opts) -> Embedder:
    """Build the embedder named by ``spec`` (see the module docstring); options per kind:

    open_clip: pretrained (tag or local file), device; hf: device; mlcd: device;
    pca: dim, image_size, projection (path of a fitted projection), pca_fit_samples, device.
    """
    _, _, arg = spec.partition(":")
    opts = {k: v for k, v in opts.items() if v is not None}
    entry = embedder_kind(spec)
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


def _open_clip_reads(arg: str, options: dict) -> list:
    """open_clip reads a config ``.json`` NAME and a local ``--pretrained`` file."""
    found = [(None, arg)] if arg.endswith(".json") else []
    pretrained = options.get("pretrained")
    if pretrained and os.path.exists(pretrained):
        found.append(("pretrained", pretrained))
    return found


PRETRAINED = EmbedderOption("pretrained", "--pretrained", str, None,
                            "open_clip: pretrained tag or local checkpoint file", probe_flag="--pretrained")
PCA_OPTIONS = (
    EmbedderOption("dim", "--dim", positive_int, 64, "pca: output dimension (default 64)", probe_flag="--pca-dim"),
    EmbedderOption("image_size", "--image-size", positive_int, 32, "pca: images resized to S x S (default 32)",
                   probe_flag="--pca-image-size"),
    EmbedderOption("pca_fit_samples", "--pca-fit-samples", positive_int, 5000,
                   "pca: images the projection is fitted on (the first ones, default 5000)"),
)

register_embedder("open_clip", _open_clip, usage="open_clip:NAME", order=10,
                  missing_arg="open_clip embedder needs a model name: open_clip:NAME (or a config .json)",
                  options=(PRETRAINED,), reads=_open_clip_reads)
register_embedder("hf", _hf, usage="hf:PATH", order=20, missing_arg="hf embedder needs a local directory: hf:PATH",
                  arg_is_path=True)
register_embedder("pca", _pca, usage="pca", order=5, arg_is_path=True,  # weights-free: listed first
                  options=PCA_OPTIONS, state_file="pca.npz", forms="pca | pca:FILE.npz")
