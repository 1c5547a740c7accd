"""Issue 15: Hugging Face folders that transformers 4.x and 5.x both load with identical outputs.

The suite runs under the project's transformers (5.x); the 4.x side runs in a second virtual
environment, ``.venv-tf4`` (transformers 4.57, torch from the main venv through a .pth file),
which ``make test`` builds before pytest (``make tf4-venv``).  Without it the cross-version
tests skip, saying how to build it; every test here that needs only one transformers runs
regardless.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from mlcd_train import convert as conv
from mlcd_train.cli import run_stage
from mlcd_train.export import load_model, save_native
from mlcd_train.models import create_model, model_config_to_dict
from mlcd_train.utils.errors import MLCDError

ROOT = Path(__file__).resolve().parents[1]
TF4 = Path(os.environ.get("MLCD_TF4_PYTHON", ROOT / ".venv-tf4" / "bin" / "python"))

# every tower family the converter writes: (pos_embed, output_dim) -> transformers class
FAMILIES = {
    "rope2d": ("rope2d", 0, "MLCDVisionModel"),
    "rope2d_proj": ("rope2d", 16, "MLCDVisionModel"),  # the projection in mlcd_projection.safetensors
    "abs": ("abs", 0, "CLIPVisionModel"),
    "abs_proj": ("abs", 16, "CLIPVisionModelWithProjection"),
}


def _tf4_version():
    """transformers' version in .venv-tf4 (read from its metadata: no interpreter started)."""
    if not TF4.exists():
        return None, f"{TF4} not found: build it with `make tf4-venv` (make test does)"
    found = sorted(TF4.parent.parent.glob("lib/python*/site-packages/transformers-*.dist-info"))
    if not found:
        return None, f"{TF4.parent.parent} has no transformers: rebuild it with `make tf4-venv`"
    version = found[-1].name[len("transformers-"):-len(".dist-info")]
    if not version.startswith("4."):
        return None, f"{TF4} has transformers {version}, not 4.x"
    return version, None


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLCD_RUN_KEY")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def tf4():
    version, why = _tf4_version()
    if version is None:
        pytest.skip(why)
    return version


# Runs under transformers 4.x.  load: every folder through from_pretrained (safetensors only),
# failing on any key left missing or unused, then its hidden states on the given pixels.
# write: random models of every family saved by 4.x's save_pretrained, with their outputs.
SCRIPT = r"""
import json, sys, torch, transformers
from transformers.utils import logging
logging.set_verbosity_error()
spec_path, out_path = sys.argv[1:3]
spec = json.load(open(spec_path))
result = {}
for name, job in spec["jobs"].items():
    pixels = torch.load(job["pixels"], weights_only=True)
    cls = getattr(transformers, job["cls"])
    if job["mode"] == "load":
        model, info = cls.from_pretrained(job["dir"], use_safetensors=True, output_loading_info=True,
                                          torch_dtype=torch.float32)
        bad = {k: v for k, v in info.items() if v}
        if bad:
            raise SystemExit(f"{name}: transformers {transformers.__version__} loading info {bad}")
    else:
        torch.manual_seed(job["seed"])
        cfg_cls = transformers.MLCDVisionConfig if job["cls"] == "MLCDVisionModel" else transformers.CLIPVisionConfig
        model = cls(cfg_cls(**job["config"]))
        with torch.no_grad():  # non-trivial norms and biases
            for key, p in model.named_parameters():
                if key.endswith("bias") or "norm" in key:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(job["dir"])
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    pooled = out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output
    for i, h in enumerate(out.hidden_states):
        result[f"{name}.h{i}"] = h.contiguous()
    result[f"{name}.pooled"] = pooled.contiguous()
    result[f"{name}.keys"] = torch.tensor([len(model.state_dict())])
torch.save(result, out_path)
print(transformers.__version__)
"""


def run_tf4(tmp_path, jobs):
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    out = tmp_path / "tf4_out.pt"
    r = subprocess.run([str(TF4), "-c", SCRIPT, str(spec), str(out)], capture_output=True, text=True,
                       timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().startswith("4."), r.stdout
    return torch.load(out, weights_only=True)


def tiny(pos_embed, output_dim, seed=0):
    torch.manual_seed(seed)
    m = create_model("ViT-Tiny-4-28", pos_embed=pos_embed, width=32, layers=2, heads=2, output_dim=output_dim)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def states_of(res, name):
    n = sum(1 for k in res if k.startswith(f"{name}.h"))
    return [res[f"{name}.h{i}"] for i in range(n)], res[f"{name}.pooled"]


# ------------------------------------------------------------------ one transformers (always run)
def test_written_folder_uses_the_prefixed_layout_and_loads_strictly(tmp_path):
    """The weights are written under vision_model. (what 4.x needs, and 5.x loads); load_hf
    refuses a folder transformers would complete with random weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for name, (pos, dim, cls) in FAMILIES.items():
        m = tiny(pos, dim)
        pt = tmp_path / f"{name}.pt"
        save_native(m.state_dict(), model_config_to_dict(m), pt)
        report = conv.convert_to_hf(pt, tmp_path / name)
        assert report["hf_class"] == cls
        with safe_open(str(tmp_path / name / "model.safetensors"), framework="pt") as f:
            keys = set(f.keys())
        tower = {k for k in keys if k != "visual_projection.weight"}
        assert tower and all(k.startswith("vision_model.") for k in tower), sorted(keys)[:5]
        assert ("vision_model.class_pos_emb" in keys) == (pos == "rope2d")
        assert ("visual_projection.weight" in keys) == (name == "abs_proj")
    # a tensor removed: transformers would fill it with random numbers and only warn
    w = load_file(str(tmp_path / "abs" / "model.safetensors"))
    del w["vision_model.post_layernorm.weight"]
    save_file(w, str(tmp_path / "abs" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MLCDError, match="post_layernorm.weight.*random"):
        conv.load_hf(tmp_path / "abs")


def test_import_reads_every_layout_of_class_pos_emb_and_the_prefix(tmp_path):
    """One MLCD folder in the three layouts seen in the wild: transformers 5 (no prefix), 4.x and
    DeepGlint (prefix everywhere), and 4.x with a bare class_pos_emb (what this tool wrote
    before): every one imports to the same model."""
    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=24,
        patch_size=6)).eval()
    hf.save_pretrained(tmp_path / "saved")
    # transformers 5 writes no prefix, 4.x writes vision_model.: each layout is written here from
    # the unprefixed names, whichever version saved them
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    base = {k.removeprefix("vision_model."): v for k, v in saved.items()}
    assert "class_pos_emb" in base and len(base) == len(saved)
    layouts = {"v5": base,
               "prefixed": {"vision_model." + k: v for k, v in base.items()},
               "mixed": {(k if k == "class_pos_emb" else "vision_model." + k): v for k, v in base.items()}}
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
    for name, sd in layouts.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        ours = conv.import_from_hf(d)
        with torch.no_grad():
            torch.testing.assert_close(ours.forward_tokens(x), ref, atol=1e-5, rtol=1e-5)
    # a layout missing class_pos_emb altogether is refused by name, not built at random
    d = tmp_path / "no_rope"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    save_file({k: v for k, v in layouts["prefixed"].items() if "class_pos_emb" not in k}, str(d / "model.safetensors"))
    with pytest.raises(MLCDError, match="class_pos_emb"):
        conv.import_from_hf(d)


def test_import_refuses_pickled_weights_and_sharded_names_outside(tmp_path):
    import transformers

    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8))
    hf.save_pretrained(tmp_path / "hf")
    os.unlink(tmp_path / "hf" / "model.safetensors")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Payload()}, tmp_path / "hf" / "pytorch_model.bin")
    assert run_stage("convert", ["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x.pt")]) == 2
    assert not (tmp_path / "pwned").exists()
    os.unlink(tmp_path / "hf" / "pytorch_model.bin")
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"vision_model.embeddings.class_embedding": "../elsewhere.safetensors"}}))
    with pytest.raises(MLCDError, match="index.json.*not a plain file name"):
        conv.import_from_hf(tmp_path / "hf")


# ------------------------------------------------------------------ 5.x -> 4.x and 4.x -> 5.x
COMMON4 = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=24,
               patch_size=6)
WRITE4 = {"mlcd": {"cls": "MLCDVisionModel", "config": COMMON4},
          "clip": {"cls": "CLIPVisionModel", "config": {**COMMON4, "hidden_act": "quick_gelu"}},
          "clip_proj": {"cls": "CLIPVisionModelWithProjection", "config": {**COMMON4, "projection_dim": 20}}}


@pytest.fixture(scope="module")
def cross(tmp_path_factory, tf4):
    """One transformers 4.x process for both directions: it loads the folders `mlcd convert`
    wrote under 5.x (every family) and writes folders of its own (with their outputs)."""
    tmp = tmp_path_factory.mktemp("tf4")
    p28, p24 = tmp / "p28.pt", tmp / "p24.pt"
    torch.save(torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1)), p28)
    torch.save(torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2)), p24)
    jobs, models = {}, {}
    for i, (name, (pos, dim, cls)) in enumerate(FAMILIES.items()):
        m = models[name] = tiny(pos, dim, seed=i)
        pt = tmp / f"{name}.pt"
        save_native(m.state_dict(), model_config_to_dict(m), pt)
        assert run_stage("convert", ["--checkpoint_path", str(pt), "--pytorch_dump_folder_path",
                                     str(tmp / f"hf_{name}")]) == 0
        jobs[name] = {"mode": "load", "dir": str(tmp / f"hf_{name}"), "cls": cls, "pixels": str(p28)}
    for i, (name, job) in enumerate(WRITE4.items()):
        jobs[f"w_{name}"] = {**job, "mode": "write", "dir": str(tmp / f"hf4_{name}"), "seed": i, "pixels": str(p24)}
    res = run_tf4(tmp, jobs)
    return res, models, jobs, torch.load(p28, weights_only=True), torch.load(p24, weights_only=True)


@pytest.mark.slow
def test_folders_written_under_5x_load_identically_under_4x(cross, tf4):
    import transformers

    assert transformers.__version__.split(".")[0] != "4"  # the suite's side is the other major
    res, models, _, pixels, _ = cross
    for name, m in models.items():
        hf_states, hf_pooled = states_of(res, name)
        with torch.no_grad():
            ours = m.forward_hidden_states(pixels)
            ours_pooled = m._pool(ours[-1])
        if m.proj is not None and m.config.pos_embed == "rope2d":
            hf_pooled = hf_pooled @ m.proj.detach()  # MLCDVisionModel has no projection
        checks = conv.compare_outputs(ours, ours_pooled, hf_states, hf_pooled, f"{name} under {tf4}")
        assert checks["last_hidden_max_rel_diff"] < 1e-5, (name, checks)


@pytest.mark.slow
def test_folders_written_under_4x_import_identically_under_5x(cross, tmp_path):
    from safetensors import safe_open

    res, _, jobs, _, pixels = cross
    for name in WRITE4:
        job = jobs[f"w_{name}"]
        with safe_open(str(Path(job["dir"]) / "model.safetensors"), framework="pt") as f:
            assert any(k.startswith("vision_model.") for k in f.keys())  # 4.x's layout
        out = tmp_path / f"{name}.pt"
        assert run_stage("convert", ["--from-hf", job["dir"], "--out", str(out)]) == 0
        ours = load_model(out)
        hf_states, hf_pooled = states_of(res, f"w_{name}")
        with torch.no_grad():
            mine = ours.forward_hidden_states(pixels)
            assert len(mine) == len(hf_states) == 3
            for a, b in zip(mine, hf_states):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours(pixels), hf_pooled, atol=1e-5, rtol=1e-5)
