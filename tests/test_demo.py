"""`mlcd demo` end to end on a reduced setting (2 gloo ranks under torchrun, a few dozen steps).

The pipeline runs once per module (``finished_demo``, which keeps an untouched copy of it);
every test that reads or reruns it gets a fresh copy (``demo_out``), so no test sees what
another changed and the order of the tests does not matter.  The copy is laid back at the
path the demo ran in, not in the test's ``tmp_path``: a rerun compares the settings each stage
recorded, and those hold absolute paths (``emb/meta.json`` records the pca projection's path),
so a moved folder is refused as "another model" before the stage a test is about.
"""
import json
import shutil

import pytest
import torch

from mlcd_train import demo
from mlcd_train.utils.errors import MLCDError

ARGS = ["--quick", "--steps", "20", "--batch-size", "32", "--k", "30", "--nproc", "2", "--quiet-train",
        "--train-images", "800", "--test-images", "300"]
pytestmark = pytest.mark.timeout(900)  # the whole pipeline, on a shared 2-core machine


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory):
    """(folder the demo ran in, an untouched copy of it)."""
    base = tmp_path_factory.mktemp("demo")
    out = base / "out"
    assert demo.main(["--out", str(out)] + ARGS) == 0
    shutil.copytree(out, base / "finished", symlinks=True)
    return out, base / "finished"


@pytest.fixture()
def demo_out(finished_demo):
    """A fresh copy of the finished demo, whatever earlier tests did to theirs."""
    out, finished = finished_demo
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(finished, out, symlinks=True)
    return out


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_its_artefacts(demo_out):
    summary = json.loads((demo_out / "summary.json").read_text())
    stages = [r["stage"] for r in summary["stages"]]
    for name in ("shards", "embed", "cluster", "assign", "train (2 ranks)", "export", "convert", "probe student",
                 "probe teacher"):
        assert any(s.startswith(name) for s in stages), (name, stages)
    # training ran 20 steps on 2 ranks and logged them
    metrics = demo.read_metrics(demo_out / "train" / "metrics.jsonl")
    assert metrics[-1]["step"] == 20
    assert (demo_out / "train" / "checkpoints" / "step_00000020" / "meta.json").exists()
    assert list((demo_out / "train" / "tb").iterdir())
    assert (demo_out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the exported student is the checkpoint's backbone, and the HF directory holds the same weights
    exported = torch.load(demo_out / "export" / "student.pt", weights_only=True)
    ckpt = torch.load(demo_out / "train" / "checkpoints" / "step_00000020" / "model.pt", weights_only=True)
    assert all(torch.equal(exported[k], ckpt["state_dict"][k]) for k in exported)
    assert (demo_out / "hf" / "config.json").exists()
    # probes: teacher (pixels PCA) separates Fashion-MNIST far above chance; every figure is a rate
    probes = summary["probe"]
    assert set(probes) == {"student", "teacher"}
    assert probes["teacher"]["linear"]["top1"] > 0.6 and probes["teacher"]["knn"]["top1"] > 0.6
    for res in probes.values():
        assert res["n_train"] == 800 and res["n_test"] == 300
        assert 0.0 <= res["linear"]["top1"] <= 1.0 and 0.0 <= res["knn"]["top1"] <= 1.0
    assert probes["student"]["embedder"].startswith("hf:")  # the student is probed through transformers


def _corrupt_hf(hf_dir):
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sorted(sd) if "layers.1." in k and k.endswith("fc1.weight"))
    sd[key] = sd[key] + 0.5 * torch.randn_like(sd[key])
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.mark.slow
def test_hf_reload_with_different_outputs_stops_the_demo(demo_out, monkeypatch):
    from mlcd_train import convert

    real_main = convert.main

    def convert_then_corrupt(argv=None):  # a conversion that passes its own check, then the files change
        rc = real_main(argv)
        _corrupt_hf(demo_out / "hf")
        return rc

    monkeypatch.setattr(convert, "main", convert_then_corrupt)
    # finished stages are skipped (training is not relaunched); the reload check must stop the run
    with pytest.raises(MLCDError, match="stage convert.*outputs diverge at layer 1"):
        demo.main(["--out", str(demo_out)] + ARGS)


@pytest.mark.slow
def test_a_failing_conversion_check_stops_the_demo(demo_out, monkeypatch):
    from mlcd_train import convert

    real = convert.native_to_hf_state_dict

    def wrong_mapping(sd, cfg, prefix=""):  # a conversion bug: one tensor lands wrong
        out = real(sd, cfg, prefix)
        key = next(k for k in sorted(out) if k.endswith("post_layernorm.weight"))
        out[key] = out[key] * 2
        return out

    monkeypatch.setattr(convert, "native_to_hf_state_dict", wrong_mapping)
    with pytest.raises(MLCDError, match="stage convert"):
        demo.main(["--out", str(demo_out)] + ARGS)


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused(demo_out):
    before = (demo_out / "summary.json").read_bytes()
    with pytest.raises(MLCDError, match="other settings.*'k'"):
        demo.main(["--out", str(demo_out)] + ARGS + ["--k", "31"])
    assert (demo_out / "summary.json").read_bytes() == before


def test_bad_settings_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(MLCDError, match=r"--l and --k must be positive \(got 40, 2, 0, 50\)"):
        demo.main(["--out", str(out), "--quick", "--l", "0"])
    assert not out.exists()


def test_training_done_check_follows_a_set_train_steps():
    args = demo.build_parser().parse_args(["--out", "x", "--steps", "5", "--set", "train.steps=7"])
    assert demo.Demo(args).steps() == 7
    args = demo.build_parser().parse_args(["--out", "x", "--steps", "5"])
    assert demo.Demo(args).steps() == 5
