"""``hf:PATH``: a local Hugging Face vision model directory (offline; nothing is downloaded).

Supported: ``CLIPVisionModel`` / ``MLCDVisionModel`` (pooled output), ``CLIPVisionModelWithProjection``
(image_embeds) and a full ``CLIPModel`` (image features through the visual projection): when a
visual projection is present it is applied.  Preprocessing: the directory's image processor
config when present, else CLIP's eval transform at the config's image size.
"""
from __future__ import annotations

import os

import torch

from clustering.embedders import CLIP_MEAN, CLIP_STD, Embedder, clip_transform
from mlcd_core.errors import MLCDError


class HFEmbedder(Embedder):
    def __init__(self, path: str, device=None, **_):
        super().__init__(device)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise MLCDError(f"{path}: not a Hugging Face model directory (no config.json)")
        import transformers
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        arch = (cfg.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModel
        try:
            # safetensors only (a pickled pytorch_model.bin could run code), and every key used:
            # transformers fills a key it does not find with random weights and only warns (a
            # folder written without the vision_model. prefix, read by transformers 4.x)
            model, info = cls.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                              output_loading_info=True)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise MLCDError(f"{path}: cannot load the model with safetensors weights ({first[:300]})") from None
        missing = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
        if missing:
            raise MLCDError(f"{path}: transformers {transformers.__version__} finds no weights for {missing[:4]} "
                            f"in this folder (they would be random); was it written for another layout?")
        self.model = model.eval().to(self.device)
        vcfg = getattr(cfg, "vision_config", cfg)
        size = int(getattr(vcfg, "image_size", 224))
        mean, std = CLIP_MEAN, CLIP_STD
        pp = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pp):
            from mlcd_core.io import json_field, load_json

            p = load_json(pp, expect=dict)
            mean = json_field(p, "image_mean", list, pp, default=mean)
            std = json_field(p, "image_std", list, pp, default=std)
            if len(mean) != 3 or len(std) != 3 or not all(isinstance(v, (int, float)) for v in [*mean, *std]):
                raise MLCDError(f"{pp}: image_mean and image_std should be 3 numbers each")
            crop = json_field(p, "crop_size", (dict, int), pp, default=size)
            size = json_field(crop, "height", int, pp) if isinstance(crop, dict) else crop
        self.transform = clip_transform(size, mean, std)
        self.kind = type(model).__name__
        if hasattr(model, "get_image_features"):
            self.dim = int(cfg.projection_dim)
        elif hasattr(model, "visual_projection"):
            self.dim = int(model.visual_projection.out_features)
        else:
            self.dim = int(vcfg.hidden_size)
        self.spec = f"hf:{os.path.abspath(path)}"

    def forward(self, pixels):
        m = self.model
        if hasattr(m, "get_image_features"):
            out = m.get_image_features(pixel_values=pixels)
            return out if torch.is_tensor(out) else out.pooler_output
        out = m(pixel_values=pixels)
        if getattr(out, "image_embeds", None) is not None:
            return out.image_embeds
        return out.pooler_output

    @property
    def weights_path(self):
        return self.spec[len("hf:"):]

    def describe(self) -> dict:
        return {"spec": self.spec, "dim": self.dim, "class": self.kind}
