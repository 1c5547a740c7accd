"""Issue 15: shared helpers in export / trainer data / demo, safe export pairs, resume with
other labels, image decoding."""
import json
import os

import numpy as np
import pytest
import torch

from mlcd_train.cli import run_stage
from mlcd_train.models import create_model, model_config_to_dict
from mlcd_train.utils.errors import MLCDError


def tiny(pos_embed="abs", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(width=32, layers=2, heads=2, output_dim=16)
    cfg.update(kw)
    return create_model("ViT-Tiny-4-28", pos_embed=pos_embed, **cfg).eval()


# ------------------------------------------------------------------ task 1: shared helpers
def test_export_refuses_fifo_bad_sidecar_and_out_in_checkpoint_folder(tmp_path):
    import mlcd_train.export as E

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    with pytest.raises(MLCDError, match="FIFO"):  # used to hang in torch.load
        E.load_native(fifo)
    m = tiny()
    pt = tmp_path / "x.pt"
    E.save_native(m.state_dict(), model_config_to_dict(m), pt)
    pt.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(MLCDError, match="x.json"):
        E.load_native(pt)
    run = tmp_path / "run" / "checkpoints" / "step_00000001"
    run.mkdir(parents=True)
    torch.save({"state_dict": m.state_dict(), "model_config": model_config_to_dict(m), "step": 1}, run / "model.pt")
    (run / "meta.json").write_text('{"step": 1}')
    assert run_stage("export", ["--checkpoint", str(run / "model.pt"), "--out", str(run / "x.pt")]) == 2
    assert not (run / "x.pt").exists()


def test_labels_meta_and_fifo_shard_are_errors(tmp_path):
    from mlcd_train.trainer import data as D

    (tmp_path / "meta.json").write_text("[]")
    with pytest.raises(MLCDError, match="meta.json"):
        D.labels_meta(str(tmp_path))
    fifo = tmp_path / "s-000000.tar"
    os.mkfifo(fifo)
    with pytest.raises(MLCDError, match="FIFO"):  # check_labels used to hang on it
        D._tar_keys(str(fifo))
    np.save(tmp_path / "s-000000.labels.npy", np.zeros((2, 2), dtype=object), allow_pickle=True)
    np.save(tmp_path / "s-000000.keys.npy", np.array(["a", "b"]))
    with pytest.raises(MLCDError, match="labels.npy"):
        D.check_labels([str(fifo)], str(tmp_path), None, 1)


@pytest.mark.parametrize("flag,value", [("--k", "0"), ("--steps", "-1"), ("--batch-size", "0"), ("--rounds", "0"),
                                        ("--nproc", "x"), ("--pca-dim", "0"), ("--train-images", "0"),
                                        ("--test-images", "-3"), ("--l", "0"), ("--warmup", "-1"),
                                        ("--seed", "-1"), ("--eval-fraction", "-1")])
def test_demo_numeric_options_are_typed(tmp_path, capsys, flag, value):
    from mlcd_train import demo

    with pytest.raises(SystemExit) as exc:
        demo.build_parser().parse_args(["--out", str(tmp_path / "d"), flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    a = demo.build_parser().parse_args(["--out", str(tmp_path / "d"), "--eval-fraction", "0", "--warmup", "0"])
    assert (a.eval_fraction, a.warmup, a.k, a.steps) == (0, 0, None, None)  # None: filled from DEMO_DEFAULTS / --quick


# ------------------------------------------------------------------ task 2: export pairs
def test_reexport_failing_at_pt_write_keeps_previous_pair(tmp_path, monkeypatch):
    import mlcd_train.export as E

    a, b = tiny(seed=0, heads=2), tiny(seed=1, heads=4, act="quick_gelu")
    out = tmp_path / "x.pt"
    E.save_native(a.state_dict(), model_config_to_dict(a), out, source="a", step=1)
    before = (out.read_bytes(), out.with_suffix(".json").read_bytes())

    def disk_full(obj, f, *args, **kw):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E.torch, "save", disk_full)
    with pytest.raises(OSError):
        E.save_native(b.state_dict(), model_config_to_dict(b), out, source="b", step=2)
    monkeypatch.undo()
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.pt"]
    m = E.load_model(out)
    assert (m.config.heads, m.config.act) == (2, a.config.act)
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(m(x), a(x))


def test_abs_export_without_sidecar_needs_heads_and_act(tmp_path):
    import mlcd_train.export as E

    m = tiny(heads=4, act="quick_gelu")  # width 32: CLIP's rule would guess 1 head, gelu
    out = tmp_path / "x.pt"
    E.save_native(m.state_dict(), model_config_to_dict(m), out)
    out.with_suffix(".json").unlink()
    with pytest.raises(MLCDError, match="--num_heads and --act"):
        E.load_model(out)
    got = E.load_model(out, heads=4, act="quick_gelu")
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(got(x), m(x))


# ------------------------------------------------------------------ task 3: resume with other labels
def test_resume_auto_with_labels_of_other_centres_is_refused(tmp_path):
    from mlcd_train import train
    from tests.fixtures import make_sample_shards
    from tests.test_train import TINY, make_labels

    shards = make_sample_shards(tmp_path, n=200, shard_size=100)
    folders = {}
    for name, sha in (("lab_a", "a" * 64), ("lab_b", "b" * 64)):
        lab = make_labels(shards, tmp_path / name)
        meta = json.loads((lab / "meta.json").read_text())
        (lab / "meta.json").write_text(json.dumps({**meta, "centroids_sha": sha}))
        folders[name] = lab
    out = tmp_path / "run"
    common = [f"output_dir={out}", f"data.shards={shards}", *TINY, "train.save_every=2"]
    assert train.main([*common, f"data.labels={folders['lab_a']}", "train.steps=2"]) == 0
    with pytest.raises(MLCDError) as exc:
        train.main([*common, f"data.labels={folders['lab_b']}", "train.steps=4"])
    msg = str(exc.value)
    assert "lab_a" in msg and "lab_b" in msg and "output_dir" in msg
    assert [p.name for p in sorted((out / "checkpoints").glob("step_*"))] == ["step_00000002"]  # nothing trained on


# ------------------------------------------------------------------ task 4: image decoding
def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_png_gradient_decodes_to_the_8bit_gradient():
    from PIL import Image

    from mlcd_train.data.reader import decode_record

    g8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    g16 = g8.astype(np.uint16) * 257
    img16 = Image.fromarray(g16)  # mode I;16
    data = _png(img16)
    assert Image.open(__import__("io").BytesIO(data)).mode.startswith("I")
    rgb, _ = decode_record({"png": data})
    a = np.asarray(rgb)
    assert rgb.mode == "RGB" and a.shape == (4, 256, 3)
    np.testing.assert_array_equal(a[..., 0], g8)  # not clipped to white above 255
    np.testing.assert_array_equal(a[..., 1], g8)


def test_transparent_pixels_become_white():
    from PIL import Image

    from mlcd_train.data.reader import decode_record, to_rgb8

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255  # left half opaque red-ish, right half fully transparent
    rgb, _ = decode_record({"png": _png(Image.fromarray(rgba, "RGBA"))})
    a = np.asarray(rgb)
    assert (a[:, 4:] == 255).all()
    assert (a[:, :4] == [200, 0, 0]).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (np.asarray(to_rgb8(la)) == 255).all()
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 0, 0] + [0] * (256 * 3 - 6))
    p.info["transparency"] = 1
    rgb, _ = decode_record({"png": _png(p)})
    assert (np.asarray(rgb) == 255).all()
    assert to_rgb8(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


# ------------------------------------------------------------------ safe loads of teachers
def test_teacher_weights_never_unpickled_and_never_half_random(tmp_path):
    """hf: safetensors only, every key found (transformers would fill a missing one with random
    numbers and only warn); open_clip: its checkpoint through torch.load(weights_only=True)."""
    import open_clip
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from clustering.embedders import get_embedder
    from tests.test_embed import TINY_OPEN_CLIP

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8))
    hf.save_pretrained(tmp_path / "hf")
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    save_file({k: v for k, v in w.items() if "post_layernorm" not in k}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(MLCDError, match="post_layernorm.*random"):
        get_embedder(f"hf:{tmp_path / 'hf'}", device="cpu")
    os.unlink(tmp_path / "hf" / "model.safetensors")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")  # a pickle: not read
    with pytest.raises(MLCDError, match="safetensors"):
        get_embedder(f"hf:{tmp_path / 'hf'}", device="cpu")

    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(str(cfg))

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    model = open_clip.create_model("tiny-clip")
    torch.save({"state_dict": model.state_dict(), "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(MLCDError, match="evil.pt.*could run code"):
        get_embedder(f"open_clip:{cfg}", pretrained=str(tmp_path / "evil.pt"), device="cpu")
    assert not (tmp_path / "pwned").exists()
