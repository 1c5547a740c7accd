"""``open_clip:NAME``: an open_clip image tower (open_clip's own factory and eval preprocessing).

NAME is a model name of open_clip's registry (``ViT-B-32``) or the path of a model config
``.json`` (open_clip's format: embed_dim, vision_cfg, text_cfg), registered under its file
stem.  ``pretrained`` is an open_clip tag (downloads: not offline) or a local checkpoint file
(works offline).  Only the image tower is kept; the output is ``model.visual(pixels)``.
"""
from __future__ import annotations

import os
import pickle

from clustering.embedders import Embedder
from mlcd_core.errors import MLCDError


class OpenClipEmbedder(Embedder):
    def __init__(self, name: str, pretrained: str | None = None, device=None, **_):
        super().__init__(device)
        import open_clip

        model_name = name
        if name.endswith(".json"):
            if not os.path.isfile(name):
                raise MLCDError(f"{name}: open_clip model config not found")
            open_clip.add_model_config(name)
            model_name = os.path.splitext(os.path.basename(name))[0]
        elif model_name not in open_clip.list_models():
            raise MLCDError(f"open_clip:{name}: unknown open_clip model (a registry name or a config .json)")
        if pretrained and os.path.sep in pretrained and not os.path.isfile(pretrained):
            raise MLCDError(f"{pretrained}: open_clip checkpoint not found")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(  # torch.load(weights_only=True)
                model_name, pretrained=pretrained or None, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise MLCDError(f"{pretrained}: open_clip checkpoint holds more than tensors and plain values; refused, "
                            f"as loading it could run code (weights_only=True: {str(exc).splitlines()[0][:160]})"
                            ) from None
        except (RuntimeError, ValueError, KeyError) as exc:
            raise MLCDError(f"open_clip:{name} (pretrained {pretrained}): cannot build the model: {exc}") from None
        self.model = model.visual.eval().to(self.device)
        self.transform = preprocess
        self.dim = int(getattr(self.model, "output_dim", 0) or model.visual.proj.shape[1])
        self.spec = f"open_clip:{name}"
        self.pretrained = os.path.abspath(pretrained) if pretrained and os.path.isfile(pretrained) else pretrained

    def forward(self, pixels):
        return self.model(pixels)

    @property
    def weights_path(self):
        return self.pretrained if self.pretrained and os.path.isfile(self.pretrained) else None

    def describe(self) -> dict:
        return {"spec": self.spec, "dim": self.dim, "pretrained": self.pretrained}
