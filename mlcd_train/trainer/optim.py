"""Backbone optimiser and learning-rate schedule.

- Weight decay only on weight matrices: parameters with fewer than 2 dimensions (biases,
  norm scales) and the model's ``no_weight_decay()`` names (class embedding, position
  embeddings, RoPE class angles) get none.
- ``optim.name=adamw``: ``torch.optim.AdamW``, fused (CUDA and CPU) unless ``optim.fused=false``.
  ``apex_adam`` / ``apex_lamb``: apex's FusedAdam / FusedLAMB; apex is optional, asking for
  it without it installed is a config error.
- Schedule: linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine down to
  ``lr * min_lr_ratio`` at ``train.steps`` (or constant).  It is a pure function of the step,
  so resuming needs nothing but the step.
"""
from __future__ import annotations

import math

import torch

from mlcd_train.utils.errors import MLCDError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: torch.nn.Module, ocfg, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, ocfg.weight_decay)
    betas = tuple(float(b) for b in ocfg.betas)
    if ocfg.name == "adamw":
        # fused by default (CUDA, and the CPU kernels of torch >= 2.4): 3-4x faster than foreach on
        # the CPU, and it skips a non-finite step on a device flag (found_inf, trainer/step.py)
        fused = ocfg.fused if ocfg.fused is not None else device.type in ("cuda", "cpu")
        kw = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=ocfg.lr, betas=betas, eps=ocfg.eps, **kw)
    try:
        import apex.optimizers as ao  # noqa: F401
    except ImportError:
        raise MLCDError(f"config key 'optim.name': {ocfg.name} needs NVIDIA apex, which is not installed "
                        "(install it built for your torch and CUDA, or use optim.name=adamw)") from None
    if device.type != "cuda":
        raise MLCDError(f"config key 'optim.name': {ocfg.name} runs on CUDA only; use optim.name=adamw on CPU")
    cls = ao.FusedAdam if ocfg.name == "apex_adam" else ao.FusedLAMB
    kw = {"adam_w_mode": True} if ocfg.name == "apex_adam" else {}
    return cls(groups, lr=ocfg.lr, betas=betas, eps=ocfg.eps, **kw)


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base lr for optimiser step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizers: list[tuple[torch.optim.Optimizer, float]], factor: float) -> None:
    for opt, base in optimizers:
        for g in opt.param_groups:
            g["lr"] = base * factor
