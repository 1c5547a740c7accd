"""`mlcd demo` end to end on a reduced setting: the pipeline on the sample, plus its baselines.

The default student (a ResNet, 2 gloo ranks under torchrun) runs once per module
(``finished_demo``, which keeps an untouched copy of it); every test that reads or reruns it
gets a fresh copy (``demo_out``), so no test sees what another changed and the order of the
tests does not matter.  The copy is laid back at the path the demo ran in, not in the test's
``tmp_path``: a rerun compares the settings each stage recorded, and those hold absolute paths
(``emb/meta.json`` records the pca projection's path), so a moved folder is refused as
"another model" before the stage a test is about.  The Hugging Face conversion runs only for a
ViT student: a second, smaller demo (one rank, a few steps) covers it (``vit_demo``).
"""
import json
import shutil

import pytest
import torch

from mlcd_train import demo
from mlcd_train.utils.errors import MLCDError

STEPS = 60
# The recipe's regularisers (RandAugment, colour jitter, erasing, drop path) pay off only over the
# demo's full 600 steps (docs/reproduction.md); in a 60-step smoke run they keep the student near its
# initialisation, so this run switches them off to test that the pipeline learns at all.
NO_REGULARISERS = ["--set", "data.aug.rand_augment=0", "--set", "data.aug.color_jitter=0",
                   "--set", "data.aug.random_erasing=0", "--set", "model.drop_path=0"]
ARGS = ["--quick", "--steps", str(STEPS), "--batch-size", "64", "--k", "30", "--nproc", "2", "--quiet-train",
        "--train-images", "800", "--test-images", "300", *NO_REGULARISERS]
VIT_ARGS = ["--quick", "--model", "ViT-Tiny-4-28", "--steps", "4", "--batch-size", "32", "--k", "20", "--nproc", "1",
            "--quiet-train", "--train-images", "300", "--test-images", "100"]
pytestmark = pytest.mark.timeout(1800)  # the whole pipeline twice, on a shared 2-core machine


def _finished(tmp_path_factory, name, args):
    base = tmp_path_factory.mktemp(name)
    out = base / "out"
    assert demo.main(["--out", str(out)] + args) == 0
    shutil.copytree(out, base / "finished", symlinks=True)
    return out, base / "finished"


def _fresh(finished):
    out, copy = finished
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(copy, out, symlinks=True)
    return out


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory):
    """(folder the default-student demo ran in, an untouched copy of it)."""
    return _finished(tmp_path_factory, "demo", ARGS)


@pytest.fixture()
def demo_out(finished_demo):
    """A fresh copy of the finished demo, whatever earlier tests did to theirs."""
    return _fresh(finished_demo)


@pytest.fixture(scope="module")
def finished_vit_demo(tmp_path_factory):
    return _finished(tmp_path_factory, "vit_demo", VIT_ARGS)


@pytest.fixture()
def vit_demo(finished_vit_demo):
    return _fresh(finished_vit_demo)


@pytest.mark.slow
def test_demo_runs_every_stage_and_the_student_beats_random_init(demo_out):
    summary = json.loads((demo_out / "summary.json").read_text())
    stages = [r["stage"] for r in summary["stages"]]
    for name in ("shards train", "shards test", "round 1/1 embed", "round 1/1 cluster", "round 1/1 assign",
                 "round 1/1 train (2 ranks)", "round 1/1 export", "round 1/1 probe student", "probe teacher",
                 "probe random init"):
        assert name in stages or any(s.startswith(name) for s in stages), (name, stages)
    assert not any(s.startswith("convert") for s in stages)  # a ResNet student has no Hugging Face form here
    run = demo_out / "round_1" / "train"
    # training ran on 2 ranks and logged its steps and its k-NN evaluation every steps/5 steps
    metrics = demo.read_metrics(run / "metrics.jsonl")
    assert metrics[-1]["step"] == STEPS
    evals = demo.read_eval(run / "metrics.jsonl")
    assert [r["step"] for r in evals] == list(range(STEPS // 5, STEPS + 1, STEPS // 5))
    assert (run / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").exists()
    assert list((run / "tb").iterdir())
    for png in ("loss_curve.png", "knn_curve.png", "probe_bars.png"):
        assert (demo_out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # the exported student is the last checkpoint's backbone
    exported = torch.load(demo_out / "round_1" / "export" / "student.pt", weights_only=True)
    ckpt = torch.load(run / "checkpoints" / f"step_{STEPS:08d}" / "model.pt", weights_only=True)
    assert all(torch.equal(exported[k], ckpt["state_dict"][k]) for k in exported)
    assert json.loads((demo_out / "round_1" / "export" / "student.json").read_text())["model_config"]["family"] \
        == "resnet"
    # probes: the teacher (pixels PCA) separates Fashion-MNIST far above chance, and the student
    # learnt something from it: at least 3 points of linear probe over its own random initialisation
    probes = summary["probe"]
    assert set(probes) == {"student", "teacher", "random_init"}
    for res in probes.values():
        assert res["n_train"] == 800 and res["n_test"] == 300
    assert probes["teacher"]["linear"]["top1"] > 0.6 and probes["teacher"]["knn"]["top1"] > 0.6
    gain = probes["student"]["linear"]["top1"] - probes["random_init"]["linear"]["top1"]
    assert gain >= 0.03, (probes["student"]["linear"]["top1"], probes["random_init"]["linear"]["top1"])
    assert probes["student"]["embedder"] == f"mlcd:{demo_out / 'round_1' / 'export' / 'student.pt'}"


@pytest.mark.slow
def test_a_rerun_skips_every_finished_stage(demo_out, monkeypatch):
    from mlcd_train import train

    def no_training(argv=None):
        raise AssertionError("training relaunched")

    monkeypatch.setattr(train, "main", no_training)
    ckpt = demo_out / "round_1" / "train" / "checkpoints" / f"step_{STEPS:08d}" / "model.pt"
    before = ckpt.stat().st_mtime_ns
    assert demo.main(["--out", str(demo_out)] + ARGS) == 0
    summary = json.loads((demo_out / "summary.json").read_text())
    assert all(r["skipped"] for r in summary["stages"]), summary["stages"]
    assert ckpt.stat().st_mtime_ns == before


def _corrupt_hf(hf_dir):
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sorted(sd) if "layers.1." in k and k.endswith("fc1.weight"))
    sd[key] = sd[key] + 0.5 * torch.randn_like(sd[key])
    save_file(sd, str(path), metadata={"format": "pt"})


@pytest.mark.slow
def test_hf_reload_with_different_outputs_stops_the_demo(vit_demo, monkeypatch):
    from mlcd_train import convert

    real = convert.convert_to_hf  # the demo calls the stage's function

    def convert_then_corrupt(*args, **kwargs):  # a conversion that passes its own check, then the files change
        rc = real(*args, **kwargs)
        _corrupt_hf(vit_demo / "hf")
        return rc

    monkeypatch.setattr(convert, "convert_to_hf", convert_then_corrupt)
    # finished stages are skipped (training is not relaunched); the reload check must stop the run
    with pytest.raises(MLCDError, match="stage convert.*outputs diverge at layer 1"):
        demo.main(["--out", str(vit_demo)] + VIT_ARGS)


@pytest.mark.slow
def test_a_failing_conversion_check_stops_the_demo(vit_demo, monkeypatch):
    from mlcd_train import convert

    real = convert.native_to_hf_state_dict

    def wrong_mapping(sd, cfg, prefix=""):  # a conversion bug: one tensor lands wrong
        out = real(sd, cfg, prefix)
        key = next(k for k in sorted(out) if k.endswith("post_layernorm.weight"))
        out[key] = out[key] * 2
        return out

    monkeypatch.setattr(convert, "native_to_hf_state_dict", wrong_mapping)
    with pytest.raises(MLCDError, match="stage convert"):
        demo.main(["--out", str(vit_demo)] + VIT_ARGS)


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused(demo_out):
    before = (demo_out / "summary.json").read_bytes()
    with pytest.raises(MLCDError, match="other settings.*'k'"):
        demo.main(["--out", str(demo_out)] + ARGS + ["--k", "31"])
    assert (demo_out / "summary.json").read_bytes() == before


def test_bad_settings_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:                  # argparse: one line naming the option, status 2
        demo.main(["--out", str(out), "--quick", "--l", "0"])
    assert exc.value.code == 2 and "--l" in capsys.readouterr().err
    with pytest.raises(MLCDError, match=r"--l 60 exceeds --k 50"):
        demo.main(["--out", str(out), "--quick", "--l", "60"])
    assert not out.exists()


def test_training_steps_follow_a_set_train_steps(tmp_path):
    from mlcd_train.pipeline import trainer_config

    def steps(*argv):
        args = demo.build_parser().parse_args(["--out", "x", "--batch-size", "32", "--k", "20", *argv])
        args.warmup = 1
        return trainer_config(demo.pipeline_config(args, tmp_path), tmp_path, 1).train.steps

    assert steps("--steps", "5", "--set", "train.steps=7") == 7
    assert steps("--steps", "5") == 5


def test_demo_defaults_come_from_one_place(tmp_path):
    args = demo.build_parser().parse_args(["--out", str(tmp_path / "o")])
    assert args.model == demo.DEMO_DEFAULTS["model"] and args.nproc == demo.DEMO_DEFAULTS["nproc"]
    assert not hasattr(demo, "missing_parts") and not hasattr(demo, "REQUIRED_MODULES")


def test_an_unknown_student_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(MLCDError, match="model 'ResNet-7': unknown preset"):
        demo.main(["--out", str(out), "--quick", "--model", "ResNet-7"])
    assert not out.exists()
