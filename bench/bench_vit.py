"""Training-step throughput of our ViT against timm's VisionTransformer of identical dimensions.

One step = zero grads, forward, a scalar loss, backward (no optimiser: it is the same for
both).  The two models are timed alternately in one run, medians of several repeats;
ratio = our images/s / timm's images/s, target >= 0.95 for the CLIP-style tower.  The
RoPE2D tower is timed against transformers' MLCDVisionModel of the same dims (target >= 0.95).
CPU rows use one thread and count process CPU time, not wall time: on a shared machine other
processes then slow neither side's figure (images/s are per CPU-second).

On a GPU (when one is present) it also measures ViT-B/16-224 and ViT-L/14-224 bf16 training
images/s and model FLOPs utilisation (3 x forward FLOPs per image; peak from
``MLCD_PEAK_TFLOPS`` or the device name).

    python -m bench.bench_vit [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.common import format_table, row
from mlcd_train.models import create_model, get_model_config, vit_flops_per_image

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40": 181.0, "A10": 125.0, "V100": 125.0}


def timm_twin(config):
    """timm's VisionTransformer with the same dims as our config (CLIP layout: pre-norm, class token)."""
    from timm.models.vision_transformer import VisionTransformer

    import torch.nn as nn

    act = nn.GELU
    if config.act == "quick_gelu":
        from open_clip.transformer import QuickGELU
        act = QuickGELU
    return VisionTransformer(img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.width,
                             depth=config.layers, num_heads=config.heads, mlp_ratio=config.mlp_ratio,
                             qkv_bias=True, pre_norm=True, global_pool="token", class_token=True,
                             num_classes=config.output_dim or 0, act_layer=act)


def _step_fn(model, x, autocast_dtype=None):
    device_type = x.device.type

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x)
        out.float().square().mean().backward()
        if device_type == "cuda":
            torch.cuda.synchronize()
    return step


def _alternate(fns: dict, rounds: int, warmup: int = 2, clock=time.perf_counter) -> dict:
    """Median seconds per step of each fn, one step of each in turn per round, so that load
    changes on a shared machine hit every model alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def hf_mlcd_twin(config):
    """transformers' MLCDVisionModel with the same dims (the reference for the RoPE2D tower)."""
    from transformers import MLCDVisionModel

    from mlcd_train.convert import hf_config_for

    return MLCDVisionModel(hf_config_for(dict(vars(config), pos_embed="rope2d")))


def _hf_step_fn(model, x, autocast_dtype=None):
    device_type = x.device.type

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(pixel_values=x).pooler_output
        out.float().square().mean().backward()
        if device_type == "cuda":
            torch.cuda.synchronize()
    return step


def cpu_rows(quick: bool, threads: int = 1) -> list[dict]:
    """CPU rows: one thread, process CPU time (robust to other processes on a shared machine)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    cases = [("ViT-Tiny-4-28", 32), ("ViT-Small-8-64", 16)]
    if not quick:
        cases.append(("ViT-B-32-224", 4))
    repeats = 9 if quick else 21
    rows = []
    try:
        for name, batch in cases:
            torch.manual_seed(0)
            ours = create_model(name).train()
            rope = create_model(name, pos_embed="rope2d").train()
            ref = timm_twin(ours.config).train()
            ref_rope = hf_mlcd_twin(rope.config).train()
            x = torch.randn(batch, 3, ours.config.image_size, ours.config.image_size)
            t = _alternate({"ours": _step_fn(ours, x), "timm": _step_fn(ref, x), "rope": _step_fn(rope, x),
                            "hf": _hf_step_fn(ref_rope, x)}, rounds=repeats, clock=time.process_time)
            ips = {k: batch / v for k, v in t.items()}
            note = f"batch {batch}, {threads} thread, process CPU time, median of {repeats} alternated steps"
            rows.append(row("vit", f"{name} abs fwd+bwd img/s (CPU fp32)", ips["ours"], ips["timm"],
                            "timm VisionTransformer", ips["ours"] / ips["timm"], ">= 0.95", note))
            rows.append(row("vit", f"{name} rope2d fwd+bwd img/s (CPU fp32)", ips["rope"], ips["hf"],
                            "transformers MLCDVisionModel", ips["rope"] / ips["hf"], ">= 0.95",
                            note + f"; rope2d/abs {ips['rope'] / ips['ours']:.2f}"))
    finally:
        torch.set_num_threads(old_threads)
    return rows


def _peak_tflops() -> float | None:
    if os.environ.get("MLCD_PEAK_TFLOPS"):
        return float(os.environ["MLCD_PEAK_TFLOPS"])
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def gpu_rows(quick: bool) -> list[dict]:
    rows = []
    peak = _peak_tflops()
    for name, batch in [("ViT-B-16-224", 128), ("ViT-L-14-224", 64)]:
        torch.manual_seed(0)
        ours = create_model(name).cuda().train()
        ref = timm_twin(ours.config).cuda().train()
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        t = _alternate({"ours": _step_fn(ours, x, torch.bfloat16), "timm": _step_fn(ref, x, torch.bfloat16)},
                       rounds=10 if quick else 30, warmup=5)
        ips = {k: batch / v for k, v in t.items()}
        flops = 3 * vit_flops_per_image(get_model_config(name))
        mfu = {k: (v * flops / 1e12 / peak if peak else float("nan")) for k, v in ips.items()}
        note = f"bf16 autocast, batch {batch}, {torch.cuda.get_device_name()}"
        rows.append(row("vit", f"{name} train img/s (GPU bf16)", ips["ours"], ips["timm"],
                        "timm VisionTransformer", ips["ours"] / ips["timm"], ">= 0.95", note))
        rows.append(row("vit", f"{name} MFU (GPU bf16)", mfu["ours"], mfu["timm"], "timm VisionTransformer",
                        mfu["ours"] / mfu["timm"] if mfu["timm"] else float("nan"), None,
                        f"peak {peak} TFLOPs" if peak else "set MLCD_PEAK_TFLOPS for MFU"))
        del ours, ref
        torch.cuda.empty_cache()
    return rows


def run(quick: bool = False) -> list[dict]:
    rows = cpu_rows(quick)
    if torch.cuda.is_available():
        rows += gpu_rows(quick)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small models and fewer repeats")
    args = p.parse_args()
    print(format_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
