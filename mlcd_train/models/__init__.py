"""Vision towers: a ViT with learned absolute positions (CLIP style) or RoPE2D (MLCD bigG), and
timm's ResNets (``family="resnet"``).

>>> from mlcd_train.models import create_model, list_models
>>> model = create_model("ViT-Tiny-4-28", pos_embed="rope2d")
"""
from .registry import (FAMILIES, PRESETS, build_model, config_from_dict, create_model, create_model_from_config,
                       family_of, get_model_config, list_models, model_config_to_dict)
from .resnet import ResNetConfig, is_resnet, timm_resnet
from .vit import ViTConfig, VisionTransformer, count_params, vit_flops_per_image

__all__ = ["FAMILIES", "ResNetConfig", "build_model", "family_of", "is_resnet", "timm_resnet",
           "PRESETS", "ViTConfig", "VisionTransformer", "config_from_dict", "count_params", "create_model",
           "create_model_from_config", "get_model_config", "list_models", "model_config_to_dict",
           "vit_flops_per_image"]
