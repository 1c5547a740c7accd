"""``mlcd plan``: GPU memory per rank of a training config, before renting the GPUs.

    mlcd plan --config vit_l14_paper --gpus 64 --gpu-memory 80
    mlcd plan --config vit_b32_paper --gpus 80 --gpu-memory 40 train.global_batch_size=16384

What is counted, per GPU, for the trainer as it is (mlcd_train/train.py):

- weights: the backbone's fp32 parameters (the trainer keeps fp32 parameters and autocasts;
  there is no separate master copy), 4 bytes per parameter;
- gradients: fp32, 4 bytes per parameter; under DDP also its gradient buckets (another 4
  bytes per parameter: the trainer builds DDP with the default gradient_as_bucket_view=False);
- optimiser: AdamW's exp_avg and exp_avg_sq in fp32, 8 bytes per parameter;
- Partial FC: this rank's ceil(k / N) centres x embed dim in fp32, their dense gradient
  (the kernel writes one [rows, d] tensor) and the row-sparse AdamW state (exp_avg,
  exp_avg_sq: 2 x rows x d fp32, and an int64 step per row), plus its workspace (logit
  column chunks of max_chunk_elems elements, the all-gathered embeddings and their
  gradients);
- activations at the per-GPU (micro-)batch: what autograd saves for the backward pass, plus
  the gradients in flight while one block runs backward.  For a ViT derived from its
  shapes (:func:`vit_activations`: per block and token, the residual input and the one after
  attention in fp32, the layer-norm outputs, q/k/v, the attention output and the MLP's two
  [T, mlp] tensors in the autocast dtype; the bf16 copies of the weight matrices that
  autocast keeps for backward).  With activation checkpointing only each block's input is
  kept, and one block is recomputed at a time.  For a ResNet, measured by a forward pass
  on the CPU at batch 2 that sums the tensors autograd saves (:func:`resnet_activations`),
  scaled to the batch (and by 2/4 for bf16/fp16: an estimate);
- DDP: everything above per GPU; FSDP (full sharding; our trainer runs DDP, this column is
  for planning): weights, gradients and optimiser state divided by N, plus one unsharded
  block (its gathered weights and gradients).

The largest per-GPU batch that fits is solved from usable = gpu_memory x (1 - headroom)
(the CUDA context, the caching allocator's fragmentation and the NCCL buffers live in the
headroom, 10 % by default); the accumulation steps are the smallest a with the config's
per-GPU batch = a x micro-batch <= that largest batch.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from mlcd_train import config as C
from mlcd_train.utils.errors import MLCDError
from mlcd_core.args import nonneg_float, positive_float, positive_int

GIB = 1024 ** 3
PFC_CHUNK = {"cuda": 1 << 26, "cpu": 1 << 21}  # PartialFC's default max_chunk_elems per device


@dataclass
class Precision:
    act: int     # bytes of an activation saved in the autocast dtype
    res: int     # bytes of the fp32 residual stream / layer-norm statistics
    autocast: bool


def precision_of(cfg: C.Config, device: str) -> Precision:
    if device == "cuda" and cfg.train.precision in ("bf16", "fp16"):
        return Precision(2, 4, True)
    return Precision(4, 4, False)


def _model(cfg: C.Config, meta: bool = True):
    from mlcd_train.models import create_model

    overrides = dict(cfg.model.overrides)
    if cfg.data.image_size and "image_size" not in overrides:
        overrides["image_size"] = cfg.data.image_size
    if cfg.model.drop_path is not None:
        overrides["drop_path"] = cfg.model.drop_path
    if meta:
        with torch.device("meta"):
            return create_model(cfg.model.name, **overrides)
    return create_model(cfg.model.name, **overrides)


# ----------------------------------------------------------------------------- activations

def vit_activations(vc, batch: int, prec: Precision, checkpointing: bool) -> dict:
    """Bytes autograd keeps for backward (``saved``) and the gradients in flight during one
    block's backward (``transient``) of a ViT config ``vc`` at ``batch`` images."""
    T = vc.grid_size ** 2 + 1
    D, M, L, H = vc.width, vc.mlp_dim, vc.layers, vc.heads
    a, r = prec.act, prec.res
    bt = batch * T
    stats = 2 * 4 * bt                                  # layer norm: mean and rstd, fp32
    mlp = (3 if vc.act == "quick_gelu" else 2) * a * M  # fc out, (sigmoid,) activation out
    # per token: x and x + attn (fp32 residuals), ln_1 / ln_2 outputs, q, k, v, attention out
    block = bt * (2 * r * D + (1 + 1 + 3 + 1) * a * D + mlp) + 2 * stats + 4 * batch * H * T  # + softmax lse
    if vc.drop_path > 0:
        block += bt * 2 * a * D                         # the two branch outputs the masks multiply
    pixels = batch * 3 * vc.image_size ** 2 * a         # conv1's input (cast under autocast)
    edges = pixels + 2 * bt * r * D + stats + batch * (r + a) * D   # ln_pre in, last block out, ln_post / proj
    weights = 0
    if prec.autocast:  # the bf16 copies of every weight matrix, kept for backward
        weights = a * (L * (4 * D * D + 2 * D * M) + 3 * D * vc.patch_size ** 2 + D * (vc.output_dim or 0))
    # gradients in flight beyond what is saved, as measured on the CPU (tests/test_plan.py):
    # without checkpointing one [T, mlp] gradient and two residual ones while the last MLP runs
    # backward; with it, the peak comes when a block has been recomputed: its input gradient
    if checkpointing:
        saved = edges + L * bt * r * D + block - bt * r * D + weights  # block inputs, one block recomputed
        transient = bt * r * D                                          # (its input counted once)
    else:
        saved = edges + L * block + weights
        transient = bt * (a * M + 2 * r * D)
    return {"saved": int(saved), "transient": int(transient)}


def _saved_by_child(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, int]:
    """Bytes of the tensors autograd saves in a forward pass, by top-level child module
    (each storage counted once, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    out: dict[str, int] = {}
    current = ["(top)"]
    handles = []
    for name, child in model.named_children():
        handles.append(child.register_forward_pre_hook(lambda m, i, n=name: current.__setitem__(0, n)))
        handles.append(child.register_forward_hook(lambda m, i, o: current.__setitem__(0, "(top)")))

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params and key not in seen:
            seen.add(key)
            out[current[0]] = out.get(current[0], 0) + st.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(pixels)
    finally:
        for h in handles:
            h.remove()
    return out


def resnet_activations(cfg: C.Config, batch: int, prec: Precision, checkpointing: bool, probe: int = 2) -> dict:
    """Saved-tensor bytes of the ResNet measured on the CPU at ``probe`` images (fp32), scaled
    to ``batch`` and to the autocast dtype.  With checkpointing (timm checkpoints each stage):
    the stem, the stages' inputs and the largest stage."""
    torch.manual_seed(0)
    model = _model(cfg, meta=False).train()
    size = model.config.image_size
    by = _saved_by_child(model, torch.randn(probe, 3, size, size))
    scale = batch / probe * prec.act / 4
    stages = {k: v for k, v in by.items() if k.startswith("layer")}
    if checkpointing and stages:
        with torch.no_grad():  # the stages' inputs: the outputs of the stem and of each stage but the last
            x = torch.randn(probe, 3, size, size)
            x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
            inputs = {}
            for name in sorted(stages):
                inputs[name] = x.numel() * 4
                x = getattr(model, name)(x)
        rest = sum(v for k, v in by.items() if k not in stages)
        # kept: every stage's input; recomputed: one stage at a time (its input is already counted)
        saved = (rest + sum(inputs.values()) + max(v - inputs[k] for k, v in stages.items())) * scale
    else:
        saved = sum(by.values()) * scale
    transient = max(stages.values()) * scale / 4 if stages else 0  # one block's gradients, roughly
    return {"saved": int(saved), "transient": int(transient)}


# ----------------------------------------------------------------------------- the plan

def _pfc(cfg: C.Config, gpus: int, embed: int, global_micro: int, device: str) -> dict:
    """This rank's Partial FC shard.  Workspace: the [global batch, column chunk] logits and
    their gradient plus two more of that size in backward (at most max_chunk_elems each, fewer
    when the sampled columns are fewer), and the gathered embeddings, normalised, and their
    two gradients ([global batch, d] fp32 each)."""
    k = cfg.loss.num_classes or 0
    rows = math.ceil(k / gpus) if k else 0
    cols = min(rows, max(int(cfg.loss.sample_rate * rows), math.ceil(global_micro * cfg.loss.l / gpus)))
    logits = min(PFC_CHUNK[device], global_micro * cols)
    return {"rows": rows, "weights": 4 * rows * embed, "grads": 4 * rows * embed,
            "optimizer": 8 * rows * embed + 8 * rows,
            "workspace": 4 * 4 * logits + 4 * 4 * global_micro * embed}


def plan(cfg: C.Config, gpus: int, gpu_memory_gb: float, headroom: float = 0.1, device: str = "cuda",
         batch: int | None = None) -> dict:
    """The memory plan (bytes) of ``cfg`` on ``gpus`` GPUs of ``gpu_memory_gb`` GiB each.
    ``batch``: the per-GPU micro-batch to price (default: the config's global batch / gpus)."""
    if gpus < 1:
        raise MLCDError(f"--gpus: must be at least 1, got {gpus}")
    gb = cfg.train.global_batch_size
    if not gb or gb % gpus:
        raise MLCDError(f"config key 'train.global_batch_size': {gb} is not divisible by --gpus {gpus}")
    per_gpu = gb // gpus
    b = batch or per_gpu
    prec = precision_of(cfg, device)
    model = _model(cfg)
    vit = type(model.config).__name__ == "ViTConfig"
    nparam = sum(p.numel() for p in model.parameters())
    if vit:
        blocks = list(model.transformer.resblocks)
        block_params = max(sum(p.numel() for p in blk.parameters()) for blk in blocks)
    else:
        block_params = max(sum(p.numel() for p in getattr(model, n).parameters()) for n in
                           ("layer1", "layer2", "layer3", "layer4"))
    embed = model.embed_dim

    def acts(bs: int, ckpt: bool) -> dict:
        if vit:
            return vit_activations(model.config, bs, prec, ckpt)
        return resnet_activations(cfg, bs, prec, ckpt)

    pfc = _pfc(cfg, gpus, embed, b * gpus, device)
    out = {"model": cfg.model.name, "params": nparam, "gpus": gpus, "global_batch": gb, "per_gpu_batch": per_gpu,
           "micro_batch": b, "precision": cfg.train.precision if prec.autocast else "fp32",
           "gpu_memory": gpu_memory_gb * GIB, "usable": gpu_memory_gb * GIB * (1 - headroom),
           "pfc_rows": pfc["rows"], "embed_dim": embed, "num_classes": cfg.loss.num_classes, "modes": {}}
    for mode in ("ddp", "fsdp"):
        shard = gpus if mode == "fsdp" else 1
        state = {"weights": 4 * nparam / shard, "grads": 4 * nparam / shard, "optimizer": 8 * nparam / shard}
        if mode == "ddp":
            state["ddp_buckets"] = 4 * nparam
        else:
            state["unsharded_block"] = 8 * block_params
        state.update({"pfc_weights": pfc["weights"], "pfc_grads": pfc["grads"], "pfc_optimizer": pfc["optimizer"],
                      "pfc_workspace": pfc["workspace"]})
        fixed = sum(state.values())
        fixed -= state["pfc_workspace"]
        for ckpt in (False, True):
            def need(bs: int, ckpt: bool = ckpt) -> int:
                a = acts(bs, ckpt)
                return a["saved"] + a["transient"] + _pfc(cfg, gpus, embed, bs * gpus, device)["workspace"]

            ab = acts(b, ckpt)
            total = fixed + state["pfc_workspace"] + ab["saved"] + ab["transient"]
            room = out["usable"] - fixed
            lo, hi = 0, 1
            while need(hi) <= room and hi < 1 << 24:  # need() grows with the batch: double, then bisect
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if need(mid) <= room else (lo, mid)
            max_batch = lo
            accum = None
            if max_batch >= 1:
                accum = next(n for n in range(math.ceil(per_gpu / max_batch), per_gpu + 1) if per_gpu % n == 0)
            out["modes"][(mode, ckpt)] = {**state, "activations": ab["saved"], "act_transient": ab["transient"],
                                          "total": total, "fits": total <= out["usable"], "max_batch": max_batch,
                                          "accum_steps": accum}
    return out


def format_plan(p: dict) -> str:
    g = lambda v: f"{v / GIB:8.2f}"  # noqa: E731
    lines = [f"mlcd plan: {p['model']} ({p['params'] / 1e6:.1f}M parameters), {p['precision']}, "
             f"{p['gpus']} GPUs x {p['gpu_memory'] / GIB:.0f} GiB (usable {p['usable'] / GIB:.1f} GiB), "
             f"global batch {p['global_batch']} = {p['per_gpu_batch']} per GPU, priced at micro-batch "
             f"{p['micro_batch']}; Partial FC {p['pfc_rows']} of k={p['num_classes']} centres x {p['embed_dim']} "
             "per GPU", "GiB per GPU                 DDP   DDP+ckpt      FSDP  FSDP+ckpt"]
    cols = [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]
    rows = [("weights (fp32)", "weights"), ("gradients (fp32)", "grads"), ("DDP gradient buckets", "ddp_buckets"),
            ("FSDP unsharded block", "unsharded_block"), ("AdamW state (2 x fp32)", "optimizer"),
            ("Partial FC centres", "pfc_weights"), ("Partial FC gradient", "pfc_grads"),
            ("Partial FC AdamW state", "pfc_optimizer"), ("Partial FC workspace", "pfc_workspace"),
            ("activations (saved)", "activations"), ("activations (in flight)", "act_transient"),
            ("total", "total")]
    for label, key in rows:
        lines.append(f"{label:<24}" + "".join(f"{g(p['modes'][c].get(key, 0))}  " for c in cols))
    lines.append(f"{'fits':<24}" + "".join(f"{'yes' if p['modes'][c]['fits'] else 'NO':>8}  " for c in cols))
    lines.append(f"{'largest batch per GPU':<24}" + "".join(f"{p['modes'][c]['max_batch']:>8}  " for c in cols))
    lines.append(f"{'accumulation steps':<24}" + "".join(
        f"{p['modes'][c]['accum_steps'] if p['modes'][c]['accum_steps'] else '-':>8}  " for c in cols))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlcd plan", description="Memory per GPU of a training config: weights, "
                                "gradients, optimiser, Partial FC shard, activations (with and without "
                                "checkpointing), under DDP and FSDP; the largest batch that fits and the "
                                "accumulation steps the config's global batch then needs.")
    p.add_argument("--config", "-c", required=True, help="YAML config file or preset name in configs/")
    p.add_argument("--gpus", type=positive_int, required=True, help="number of GPUs (ranks)")
    p.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--headroom", type=nonneg_float, default=0.1,  # < 1 checked in main
                   help="fraction kept free for the CUDA context, allocator fragmentation, NCCL (default 0.1)")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="per-GPU micro-batch to price (default: global / gpus)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.headroom < 1:
        raise MLCDError(f"--headroom: must be in [0, 1), got {args.headroom}")
    if args.gpu_memory <= 0:
        raise MLCDError(f"--gpu-memory: must be positive, got {args.gpu_memory}")
    if args.batch is not None and args.batch < 1:
        raise MLCDError(f"--batch: must be at least 1, got {args.batch}")
    cfg = C.build_config(args.config, args.overrides)
    if not cfg.loss.num_classes:
        raise MLCDError("config key 'loss.num_classes': needed to size the Partial FC (set loss.num_classes=K)")
    print(format_plan(plan(cfg, args.gpus, args.gpu_memory, args.headroom, batch=args.batch)))
    return 0


if __name__ == "__main__":
    from mlcd_train.cli import run_stage

    sys.exit(run_stage("plan", sys.argv[1:]))
