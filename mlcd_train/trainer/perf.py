"""Model FLOPs, MFU and peak memory for the trainer's log.

- :func:`forward_flops_per_image`: the backbone's forward FLOPs for one image, counted once at
  start by ``torch.utils.flop_counter.FlopCounterMode`` on a copy of the tower built on the
  meta device (no memory, no compute; any model family).  :func:`vit_forward_flops` is the
  analytic count of our ViT (tests check the two agree).
- A training step costs 3 x the forward (the backward is two matmuls per forward matmul),
  plus the Partial FC: 2 x embedding x sampled classes per image forward, 3 x for training.
- MFU = achieved FLOP/s of one device / its peak: ``train.peak_flops``, else the dense bf16
  peak of a known GPU (:data:`PEAK_BF16`, by the CUDA device name), else n/a (the CPU).
- Peak memory: ``torch.cuda.max_memory_allocated`` over the log window on a GPU; on the CPU
  the process's peak resident set (``resource.getrusage``, since the process started).
"""
from __future__ import annotations

import sys

import torch

# dense bf16 / fp16 tensor-core peaks (FLOP/s), from the vendors' data sheets
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def forward_flops_per_image(model_config: dict, image_size: int) -> int:
    """FLOPs of one forward pass on one image (FlopCounterMode on a meta-device copy)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mlcd_train.models import create_model_from_config

    with torch.device("meta"):
        net = create_model_from_config(dict(model_config))
        x = torch.empty(1, 3, image_size, image_size)
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return int(counter.get_total_flops())


def vit_forward_flops(width: int, layers: int, patch: int, image_size: int, mlp_ratio: float = 4.0,
                      output_dim: int | None = None, cls_token: bool = True) -> int:
    """The analytic forward FLOPs of one image through a ViT (2 per multiply-add): patch
    embedding, per layer the qkv / output projections, attention scores and mix, the MLP; the
    final projection.  Norms, softmax and activations are left out (as the counter does)."""
    n_patch = (image_size // patch) ** 2
    n = n_patch + (1 if cls_token else 0)
    hidden = int(width * mlp_ratio)
    flops = 2 * n_patch * 3 * patch * patch * width                      # patch embedding
    per_layer = 2 * n * width * 3 * width + 2 * n * width * width        # qkv, out projection
    per_layer += 2 * n * n * width * 2                                    # q k^T and attn @ v
    per_layer += 2 * n * width * hidden * 2                               # MLP
    flops += layers * per_layer
    if output_dim:
        flops += 2 * width * output_dim
    return flops


def train_flops_per_image(forward: int, embedding_size: int, sampled_classes: int) -> int:
    """Training FLOPs per image: 3 x the backbone forward + 3 x the Partial FC logits."""
    return 3 * forward + 3 * 2 * embedding_size * sampled_classes


def peak_flops(device: torch.device, given: float | None) -> float | None:
    """The device's peak FLOP/s for MFU: ``train.peak_flops``, a known GPU's bf16 peak, or None."""
    if given:
        return float(given)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16.items():
            if key in name:
                return value
    return None


def peak_memory_gib(device: torch.device, reset: bool = True) -> float:
    """Peak memory since the last call (GPU: allocated by torch) or the process peak RSS (CPU)."""
    if device.type == "cuda":
        v = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return v / 2**30
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)
