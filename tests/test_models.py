"""The ViT towers and their registry (CPU, tiny configs)."""
import pytest
import torch

from mlcd_train.models import (ViTConfig, VisionTransformer, create_model, create_model_from_config,
                               get_model_config, list_models, model_config_to_dict)
from mlcd_train.utils.errors import MLCDError

CPU_PRESETS = ["ViT-Tiny-4-28", "ViT-Tiny-4-32", "ViT-Small-8-64"]
CLIP_PRESETS = ["ViT-B-32-224", "ViT-B-16-224", "ViT-L-14-224", "ViT-L-14-336"]
BIGG = ["ViT-bigG-14-224", "ViT-bigG-14-336", "ViT-bigG-14-448"]


def tiny(pos_embed, **kw):
    torch.manual_seed(0)
    cfg = dict(width=32, layers=2, heads=2, output_dim=16)
    cfg.update(kw)
    return create_model("ViT-Tiny-4-28", pos_embed=pos_embed, **cfg).eval()


def test_registry_names_and_cpu_presets_build_both_kinds():
    names = list_models()
    for n in CLIP_PRESETS + BIGG + CPU_PRESETS:
        assert n in names
    assert any(get_model_config(n).image_size <= 32 for n in CPU_PRESETS)
    assert any(get_model_config(n).image_size == 64 for n in CPU_PRESETS)
    for n in CPU_PRESETS:
        for pe in ("abs", "rope2d"):
            m = create_model(n, pos_embed=pe)
            c = m.config
            assert (c.name, c.pos_embed) == (n, pe)
            x = torch.randn(2, 3, c.image_size, c.image_size)
            assert m(x).shape == (2, c.output_dim)
            assert ("positional_embedding" in m.state_dict()) == (pe == "abs")
            assert ("class_pos_emb" in m.state_dict()) == (pe == "rope2d")


@pytest.mark.parametrize("name", CLIP_PRESETS)
def test_clip_presets_have_open_clips_exact_layout(name):
    """Built on the meta device (no memory): same names and shapes as open_clip's tower of those dims."""
    from open_clip.transformer import VisionTransformer as OCViT

    c = get_model_config(name)
    with torch.device("meta"):
        ours = create_model(name)
        ref = OCViT(image_size=c.image_size, patch_size=c.patch_size, width=c.width, layers=c.layers,
                    heads=c.heads, mlp_ratio=c.mlp_ratio, output_dim=c.output_dim)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name", BIGG)
def test_bigg_presets_match_transformers_mlcd_shapes(name):
    """bigG (meta device): every tensor of transformers' default MLCD config has our counterpart."""
    from transformers import MLCDVisionConfig, MLCDVisionModel

    from mlcd_train.convert import hf_to_native_state_dict

    c = get_model_config(name)
    assert (c.pos_embed, c.output_dim, c.image_size) == ("rope2d", None, int(name.rsplit("-", 1)[1]))
    with torch.device("meta"):
        ours = create_model(name)
        ref = MLCDVisionModel(MLCDVisionConfig(image_size=c.image_size))  # its defaults are bigG's
    mapped = hf_to_native_state_dict(ref.state_dict(), model_config_to_dict(ours))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in mapped.items()}


def test_rope2d_state_dict_is_the_native_layout():
    """The names and shapes the public conversion script reads (reference section 6)."""
    m = create_model("ViT-Tiny-4-28", pos_embed="rope2d", width=64, heads=4, layers=2, output_dim=32)
    D, hd, M, p = 64, 16, 256, 4
    want = {"conv1.weight": (D, 3, p, p), "class_embedding": (D,), "class_pos_emb": (1, hd // 2),
            "ln_pre.weight": (D,), "ln_pre.bias": (D,), "ln_post.weight": (D,), "ln_post.bias": (D,),
            "proj": (D, 32)}
    for i in range(2):
        b = f"transformer.resblocks.{i}."
        want.update({b + "ln_1.weight": (D,), b + "ln_1.bias": (D,), b + "ln_2.weight": (D,), b + "ln_2.bias": (D,),
                     b + "attn.in_proj.weight": (3 * D, D), b + "attn.in_proj.bias": (3 * D,),
                     b + "attn.out_proj.weight": (D, D), b + "attn.out_proj.bias": (D,),
                     b + "mlp.c_fc.weight": (M, D), b + "mlp.c_fc.bias": (M,),
                     b + "mlp.c_proj.weight": (D, M), b + "mlp.c_proj.bias": (D,)})
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want


def test_overrides_config_dict_round_trip_and_bad_values():
    m = create_model("ViT-Tiny-4-28", width=64, layers=3, heads=4, patch_size=7, mlp_ratio=2.0,
                     pos_embed="rope2d", output_dim=0, act="quick_gelu")
    c = m.config
    assert (c.width, c.layers, c.heads, c.patch_size, c.mlp_dim, c.output_dim, c.act) == \
        (64, 3, 4, 7, 128, None, "quick_gelu")
    assert m.proj is None and m(torch.randn(1, 3, 28, 28)).shape == (1, 64)
    d = model_config_to_dict(m)
    m2 = create_model_from_config(d)
    m2.load_state_dict(m.state_dict())  # same layout
    assert model_config_to_dict(m2) == d and isinstance(m2.config, ViTConfig)
    with pytest.raises(MLCDError, match="unknown preset"):
        create_model("ViT-Nope")
    with pytest.raises(MLCDError, match="unknown override"):
        create_model("ViT-Tiny-4-28", depth=3)
    with pytest.raises(MLCDError, match="does not divide"):
        create_model("ViT-Tiny-4-28", heads=5)
    with pytest.raises(MLCDError, match="not divisible"):
        create_model("ViT-Tiny-4-28", image_size=30)
    with pytest.raises(MLCDError, match="pos_embed"):
        create_model("ViT-Tiny-4-28", pos_embed="sincos")
    with pytest.raises(MLCDError, match="act"):
        create_model("ViT-Tiny-4-28", act="relu")
    with pytest.raises(MLCDError, match="unknown key"):
        create_model_from_config({**d, "depth": 3})


def _reference_forward(m: VisionTransformer, x: torch.Tensor) -> list:
    """Plain re-implementation (explicit softmax attention, per-element rotation) to check against."""
    c = m.config
    D, H = c.width, c.heads
    hd = D // H
    t = m.conv1(x).flatten(2).transpose(1, 2)
    gh, gw = x.shape[2] // c.patch_size, x.shape[3] // c.patch_size
    t = torch.cat([m.class_embedding.expand(x.shape[0], 1, D), t], 1)
    if c.pos_embed == "abs":
        t = t + m.positional_embedding
    else:
        inv = torch.tensor([10000 ** (-2 * i / (hd // 2)) for i in range(hd // 4)])
        ang = [m.class_pos_emb[0]]
        for r in range(gh):
            for q in range(gw):
                ang.append(torch.cat([r * inv, q * inv]))
        ang = torch.stack(ang)
        ang = torch.cat([ang, ang], 1)

        def rot(z):  # z [B, H, T, hd]
            z1, z2 = z[..., : hd // 2], z[..., hd // 2:]
            return z * ang.cos() + torch.cat([-z2, z1], -1) * ang.sin()
    t = m.ln_pre(t)
    states = [t]
    for blk in m.transformer.resblocks:
        w, b = blk.attn._qkv_params()
        y = blk.ln_1(t) @ w.t() + b
        q, k, v = (y[..., i * D:(i + 1) * D].reshape(*y.shape[:2], H, hd).transpose(1, 2) for i in range(3))
        if c.pos_embed == "rope2d":
            q, k = rot(q), rot(k)
        a = torch.softmax(q @ k.transpose(-1, -2) / hd ** 0.5, -1) @ v
        t = t + blk.attn.out_proj(a.transpose(1, 2).reshape(t.shape))
        t = t + blk.mlp(blk.ln_2(t))
        states.append(t)
    return states


@pytest.mark.parametrize("pos_embed,size", [("abs", (28, 28)), ("rope2d", (28, 28)), ("rope2d", (20, 36))])
def test_forward_matches_plain_reference_and_hidden_states(pos_embed, size):
    m = tiny(pos_embed)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        states = m.forward_hidden_states(x)
        ref = _reference_forward(m, x)
        pooled = m(x)
    assert len(states) == m.config.layers + 1
    for a, b in zip(states, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, m.ln_post(states[-1][:, 0]) @ m.proj)


def test_rope2d_distinguishes_rows_from_columns_and_abs_rejects_other_sizes():
    m = tiny("rope2d")
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        # transposing the image permutes the tokens; with row/col swapped angles the output changes
        a, b = m(x), m(x.transpose(2, 3))
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="patch grid"):
        tiny("abs")(torch.randn(1, 3, 32, 28))


def test_grad_checkpointing_recomputes_blocks_and_keeps_gradients():
    m = tiny("rope2d").train()
    x = torch.randn(2, 3, 28, 28)
    calls = []
    mlp = m.transformer.resblocks[0].mlp
    mlp_forward = mlp.forward

    def counting_forward(*args):
        calls.append(1)
        return mlp_forward(*args)

    mlp.forward = counting_forward
    m(x).square().sum().backward()
    g0 = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert len(calls) == 1
    m.zero_grad()
    calls.clear()
    m.set_grad_checkpointing(True)
    m(x).square().sum().backward()
    assert len(calls) == 2  # forward, then recomputed during backward
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g0[n], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_runs_rope_in_fp32_and_stays_close():
    m = tiny("rope2d")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1)
    assert cos.min() > 0.99
