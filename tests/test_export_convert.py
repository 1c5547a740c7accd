"""mlcd export (trainer checkpoint -> native) and mlcd convert (native <-> Hugging Face)."""
import json
import os
from pathlib import Path

import pytest
import torch

from mlcd_train import convert as conv
from mlcd_train.cli import run_stage
from mlcd_train.export import export_checkpoint, load_model, load_native
from mlcd_train.models import create_model, model_config_to_dict
from mlcd_train.utils.errors import MLCDError


def tiny(pos_embed, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(width=32, layers=2, heads=2, output_dim=16)
    cfg.update(kw)
    m = create_model("ViT-Tiny-4-28", pos_embed=pos_embed, **cfg).eval()
    with torch.no_grad():  # non-trivial norms so that a mix-up of weight and bias shows
        for name, p in m.named_parameters():
            if name.endswith((".bias",)) or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def write_step(run: Path, step: int, model, prefix="", complete=True):
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "model_config": model_config_to_dict(model), "step": step}, d / "model.pt")
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": step}))
    return d


def export_native(model, path: Path) -> Path:
    from mlcd_train.export import save_native

    save_native(model.state_dict(), model_config_to_dict(model), path)
    return path


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_export_picks_newest_complete_checkpoint_and_strips_prefixes(tmp_path):
    run = tmp_path / "run"
    old, new, unfinished = tiny("rope2d", 1), tiny("rope2d", 2), tiny("rope2d", 3)
    write_step(run, 10, old)
    write_step(run, 20, new, prefix="module._orig_mod.")
    write_step(run, 30, unfinished, complete=False)
    out = tmp_path / "exp" / "vit.pt"
    assert run_stage("export", ["--checkpoint", str(run), "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(new.state_dict())
    for k, v in new.state_dict().items():
        assert torch.equal(sd[k], v)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["step"] == 20 and meta["image_size"] == 28
    assert meta["model_config"] == model_config_to_dict(new)
    assert meta["source"].endswith("step_00000020/model.pt")
    # an explicit step folder and file work too; the incomplete one is refused
    export_checkpoint(run / "checkpoints" / "step_00000010", tmp_path / "old.pt")
    assert torch.equal(torch.load(tmp_path / "old.pt", weights_only=True)["class_pos_emb"], old.class_pos_emb)
    with pytest.raises(MLCDError, match="incomplete"):
        export_checkpoint(run / "checkpoints" / "step_00000030", tmp_path / "x.pt")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(x), new(x), atol=0, rtol=0)


def test_export_bad_inputs_are_clear_and_write_nothing(tmp_path):
    run = tmp_path / "run"
    d = write_step(run, 5, tiny("abs"))
    out = tmp_path / "o.pt"
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(MLCDError, match="model.pt"):
        export_checkpoint(run, out)
    torch.save({"weights": torch.zeros(3)}, d / "model.pt")  # a torch file, not ours
    with pytest.raises(MLCDError, match="not an mlcd training checkpoint"):
        export_checkpoint(run, out)
    with pytest.raises(MLCDError, match="no complete checkpoint"):
        export_checkpoint(tmp_path, out)  # a folder without step_*/meta.json
    m = tiny("abs")
    bad = {k: v for k, v in m.state_dict().items() if k != "ln_post.bias"}
    (d / "model.pt").unlink()
    torch.save({"state_dict": bad, "model_config": model_config_to_dict(m), "step": 5}, d / "model.pt")
    with pytest.raises(MLCDError, match="ln_post.bias"):
        export_checkpoint(run, out)
    assert run_stage("export", ["--checkpoint", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists() and not out.with_suffix(".json").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_style_export_loads_into_open_clip_visual_tower(tmp_path, act):
    from open_clip.transformer import QuickGELU, VisionTransformer

    m = tiny("abs", act=act)
    run = tmp_path / "run"
    write_step(run, 1, m, prefix="module.")
    export_checkpoint(run, tmp_path / "vit.pt")
    c = m.config
    oc = VisionTransformer(image_size=c.image_size, patch_size=c.patch_size, width=c.width, layers=c.layers,
                           heads=c.heads, mlp_ratio=c.mlp_ratio, output_dim=c.output_dim,
                           act_layer=QuickGELU if act == "quick_gelu" else torch.nn.GELU).eval()
    oc.load_state_dict(torch.load(tmp_path / "vit.pt", weights_only=True), strict=True)
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(oc(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_embed,output_dim", [("rope2d", 16), ("rope2d", 0), ("abs", 16), ("abs", 0)])
def test_round_trip_ours_native_hf_ours_and_transformers_loads_it(tmp_path, pos_embed, output_dim):
    import transformers

    m = tiny(pos_embed, output_dim=output_dim)
    native = export_native(m, tmp_path / "vit.pt")
    hf_dir = tmp_path / "hf"
    assert run_stage("convert", ["--checkpoint_path", str(native), "--pytorch_dump_folder_path", str(hf_dir)]) == 0
    names = set(os.listdir(hf_dir))
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= names
    assert leftovers(tmp_path) == []
    if pos_embed == "rope2d":
        hf = transformers.MLCDVisionModel.from_pretrained(hf_dir).eval()
    elif output_dim:
        hf = transformers.CLIPVisionModelWithProjection.from_pretrained(hf_dir).eval()
    else:
        hf = transformers.CLIPVisionModel.from_pretrained(hf_dir).eval()
    proc = transformers.AutoImageProcessor.from_pretrained(hf_dir)
    assert proc.crop_size == {"height": 28, "width": 28} and proc.do_center_crop
    assert int(proc.resample) == 3 and list(proc.image_mean) == list(conv.CLIP_MEAN)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        ours = m.forward_hidden_states(x)
        torch.testing.assert_close(out.last_hidden_state, ours[-1], atol=1e-5, rtol=1e-5)
        for a, b in zip(out.hidden_states, ours):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if pos_embed == "abs" and output_dim:
            torch.testing.assert_close(out.image_embeds, m(x), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(out.pooler_output, m.ln_post(ours[-1][:, 0]), atol=1e-5, rtol=1e-5)
    # back: HF -> ours (CLI import), equal outputs and identical tensors
    back = tmp_path / "back.pt"
    assert run_stage("convert", ["--from-hf", str(hf_dir), "--out", str(back)]) == 0
    sd, meta = load_native(back)
    assert set(sd) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v), k
    assert meta["model_config"]["output_dim"] == (output_dim or None)
    with torch.no_grad():
        torch.testing.assert_close(load_model(back)(x), m(x), atol=0, rtol=0)


def test_rope2d_non_square_input_matches_transformers_mlcd(tmp_path):
    import transformers

    m = tiny("rope2d", output_dim=0, width=64, heads=4, layers=3)
    conv.convert_to_hf(export_native(m, tmp_path / "vit.pt"), tmp_path / "hf")
    hf = transformers.MLCDVisionModel.from_pretrained(tmp_path / "hf").eval()
    for h, w in [(16, 40), (44, 20)]:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            out = hf(pixel_values=x)
            torch.testing.assert_close(out.last_hidden_state, m.forward_tokens(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.pooler_output, m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mlcd", "clip", "clip_full"])
def test_import_of_random_transformers_model_equals_its_outputs(tmp_path, kind):
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                  image_size=24, patch_size=6)
    if kind == "mlcd":
        hf = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(**common)).eval()
    elif kind == "clip":
        hf = transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(projection_dim=20, hidden_act="quick_gelu", **common)).eval()
    else:  # a whole CLIP model folder (text tower too): its vision half and projection are imported
        hf = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            vision_config=dict(hidden_act="quick_gelu", **common), projection_dim=20)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = conv.import_from_hf(tmp_path / "hf")
    c = ours.config
    assert (c.width, c.layers, c.heads, c.patch_size, c.image_size, c.mlp_dim) == (48, 2, 3, 6, 24, 96)
    assert c.pos_embed == ("rope2d" if kind == "mlcd" else "abs")
    assert c.act == ("gelu" if kind == "mlcd" else "quick_gelu")
    assert c.output_dim == (None if kind == "mlcd" else 20)
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        if kind == "clip_full":
            states = hf.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
            ref = hf.get_image_features(pixel_values=x)
            ref = getattr(ref, "pooler_output", ref)
        else:
            out = hf(pixel_values=x, output_hidden_states=True)
            states = out.hidden_states
            ref = out.pooler_output if kind == "mlcd" else out.image_embeds
        mine = ours.forward_hidden_states(x)
        assert len(mine) == len(states) == 3
        for a, b in zip(states, mine):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)


def test_convert_infers_architecture_from_tensors_without_sidecar(tmp_path, capsys):
    m_rope = tiny("rope2d", width=64, heads=4)  # head width 16: heads from class_pos_emb
    m_abs = tiny("abs", width=128, heads=2)  # head width 64: CLIP's rule
    for name, m in (("rope", m_rope), ("abs", m_abs)):
        path = export_native(m, tmp_path / f"{name}.pt")
        path.with_suffix(".json").unlink()
        args = ["--checkpoint_path", str(path), "--pytorch_dump_folder_path", str(tmp_path / f"hf_{name}")]
        if name == "rope":
            with pytest.raises(MLCDError, match="--image_size"):
                conv.main(args + ["--act", "gelu"])
            # the activation is in no tensor, and the check cannot catch a wrong guess: not guessed
            with pytest.raises(MLCDError, match="activation is not in its tensors; pass --act gelu"):
                conv.main(args + ["--image_size", "28"])
            assert not (tmp_path / f"hf_{name}").exists()
            args += ["--image_size", "28", "--act", "gelu"]
        else:  # heads and activation of a learned-position tower are not in its tensors: not guessed
            with pytest.raises(MLCDError, match="--num_heads and --act"):
                conv.main(args)
            with pytest.raises(MLCDError, match="--act"):
                conv.main(args + ["--num_heads", "2"])
            args += ["--num_heads", "2", "--act", "gelu"]
        assert conv.main(args) == 0
        cfg = json.loads((tmp_path / f"hf_{name}" / "config.json").read_text())
        assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["patch_size"],
                cfg["image_size"], cfg["hidden_act"]) == (m.config.width, m.config.heads, 2, 4, 28, "gelu")


def test_convert_bad_inputs_leave_no_output_dir(tmp_path):
    m = tiny("abs", width=128, heads=2)
    path = export_native(m, tmp_path / "vit.pt")
    path.with_suffix(".json").unlink()
    out = tmp_path / "hf"

    def run(*extra, src=path):
        return run_stage("convert", ["--checkpoint_path", str(src), "--pytorch_dump_folder_path", str(out),
                                     *extra])

    assert run("--num_heads", "3", "--act", "gelu") == 2  # does not divide 128
    assert run("--image_size", "32") == 2  # the position table is 28 px
    with pytest.raises(MLCDError, match="does not divide"):
        conv.convert_to_hf(path, out, num_heads=3, act="gelu")
    with pytest.raises(MLCDError, match="disagrees"):
        conv.convert_to_hf(path, out, image_size=32)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(MLCDError, match="trunc.pt"):
        conv.convert_to_hf(trunc, out)
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(MLCDError, match="conv1.weight"):
        conv.convert_to_hf(other, out)
    rope = export_native(tiny("rope2d", width=64, heads=4), tmp_path / "rope.pt")
    with pytest.raises(MLCDError, match="does not divide"):
        conv.convert_to_hf(rope, out, num_heads=5)
    assert not out.exists() and leftovers(tmp_path) == []
    # import direction: not a Hugging Face folder, or not a vision tower we know
    (tmp_path / "nohf").mkdir()
    with pytest.raises(MLCDError, match="no config.json"):
        conv.import_from_hf(tmp_path / "nohf")
    (tmp_path / "nohf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert run_stage("convert", ["--from-hf", str(tmp_path / "nohf"), "--out", str(tmp_path / "imp.pt")]) == 2
    assert not (tmp_path / "imp.pt").exists()


def test_convert_reports_where_outputs_diverge_and_keeps_existing_dir(tmp_path, monkeypatch):
    m = tiny("rope2d", layers=3)
    path = export_native(m, tmp_path / "vit.pt")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert run_stage("convert", ["--checkpoint_path", str(path), "--pytorch_dump_folder_path", str(out)]) == 2
    real = conv.native_to_hf_state_dict

    def broken(sd, cfg, prefix=""):
        hf = real(sd, cfg, prefix)
        hf[f"{prefix}encoder.layers.1.mlp.fc2.weight"] = hf[f"{prefix}encoder.layers.1.mlp.fc2.weight"] * 3
        return hf

    monkeypatch.setattr(conv, "native_to_hf_state_dict", broken)
    with pytest.raises(MLCDError, match=r"diverge at layer 1 "):
        conv.convert_to_hf(path, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old" and sorted(os.listdir(out)) == ["keep.txt"]
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(conv, "native_to_hf_state_dict", real)
    conv.convert_to_hf(path, out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()


def test_bf16_export_converts_and_matches_its_rounded_weights(tmp_path):
    import transformers
    from safetensors import safe_open

    m = tiny("rope2d")
    write_step(tmp_path / "run", 3, m)
    out = tmp_path / "vit16.pt"
    assert run_stage("export", ["--checkpoint", str(tmp_path / "run"), "--out", str(out), "--dtype", "bfloat16"]) == 0
    sd = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    conv.convert_to_hf(out, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        # DeepGlint's layout, which transformers 4.x and 5.x both load
        assert f.get_tensor("vision_model.class_pos_emb").dtype == torch.bfloat16
    # bf16 -> fp32 is exact; from_pretrained(dtype=) needs transformers 4.56 and we allow 4.52
    hf = transformers.MLCDVisionModel.from_pretrained(tmp_path / "hf").float().eval()
    ours = load_model(out)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, ours.forward_tokens(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(x), m(x), atol=1e-6)  # it really is the rounded model


@pytest.mark.slow
def test_tools_convert_to_hf_takes_the_seed_flags(tmp_path):
    """The seed README's command line, on a native RoPE2D file without sidecar."""
    import subprocess
    import sys

    m = tiny("rope2d", output_dim=0)
    path = export_native(m, tmp_path / "vit.pt")
    path.with_suffix(".json").unlink()
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MLCD_QUIET="1")
    cmd = [sys.executable, str(root / "tools" / "convert_to_hf.py"), "--pytorch_dump_folder_path",
           str(tmp_path / "hf"), "--checkpoint_path", str(path), "--image_size", "28"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    # without sidecar the activation is not guessed: one line naming the flag, status 2
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--act gelu" in proc.stderr, proc.stderr
    proc = subprocess.run(cmd + ["--act", "gelu"], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "mlcd_vision_model" and cfg["image_size"] == 28


def test_reexport_killed_between_writes_never_pairs_new_weights_with_old_sidecar(tmp_path, monkeypatch):
    """Heads and activation are only in the sidecar: a kill after the new .pt's rename but
    before its .json's leaves the old .json beside it; that pair is refused, not loaded wrong."""
    import mlcd_train.export as E

    a, b = tiny("abs", seed=0, heads=2), tiny("abs", seed=1, heads=4, act="quick_gelu")
    out = tmp_path / "x.pt"
    E.save_native(a.state_dict(), model_config_to_dict(a), out, source="a", step=1)
    real_replace = os.replace

    def killed_before_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(E.os, "replace", killed_before_sidecar)
    with pytest.raises(KeyboardInterrupt):
        E.save_native(b.state_dict(), model_config_to_dict(b), out, source="b", step=2)
    monkeypatch.undo()
    assert json.loads(out.with_suffix(".json").read_text())["source"] == "a"  # the old sidecar, beside b's weights
    with pytest.raises(MLCDError, match="sidecar belongs to another x.pt"):
        load_model(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.pt"]  # no temporaries left
    monkeypatch.undo()
    E.save_native(b.state_dict(), model_config_to_dict(b), out, source="b", step=2)
    m = load_model(out)
    assert (m.config.heads, m.config.act) == (4, "quick_gelu")
