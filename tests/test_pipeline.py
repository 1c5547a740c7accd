"""`mlcd pipeline`: two rounds on a small corpus, resumed after a failure in round 2; config errors name the key."""
from __future__ import annotations

import json

import pytest
import yaml

from mlcd_train import pipeline
from mlcd_train.cli import run_stage
from mlcd_train.utils.errors import MLCDError

# module of each stage -> the name the call log uses
# the function of each stage that the pipeline calls (the trainer by its argv)
STAGE_FUNCTIONS = {("mlcd_train.data.shards", "make_shards"): "shards", ("clustering.embed", "embed"): "embed",
                   ("clustering.kmeans", "cluster_folder"): "cluster", ("clustering.assign", "assign"): "assign",
                   ("mlcd_train.train", "main"): "train", ("mlcd_train.export", "export"): "export",
                   ("mlcd_train.probe", "probe"): "probe"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The sample's first 300 training and 100 test images as IDX files."""
    from mlcd_train.demo import sample_subset

    d = tmp_path_factory.mktemp("corpus")
    return sample_subset("train", 300, d), sample_subset("test", 100, d)


def small_config(corpus, out, **extra) -> dict:
    train, test = corpus
    cfg = {"out": str(out), "input": {"train": train, "test": test, "shard_size": 150},
           "teacher": {"model": "pca", "dim": 16, "image_size": 28}, "k": 20, "l": 4, "rounds": 2,
           "train": {"config": "fashion_mnist_sample",
                     "overrides": ["model.name=ResNet-10-w16-28", "train.steps=3", "train.global_batch_size=32",
                                   "optim.warmup_steps=1", "train.log_every=1", "data.num_workers=0",
                                   "data.shuffle_buffer=50"]},
           "probe": {"l2_grid": "1e-2", "max_iter": 30}, "workers": 0, "threads": 1}
    cfg.update(extra)
    return cfg


def write_yaml(path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def spy_stages(monkeypatch, calls: list, fail_on=None):
    """Wrap every stage's function: record the pipeline's calls as (stage, round folder) (not those a stage
    makes itself: the probe embeds through embed's function) and raise where ``fail_on(stage, where)`` says."""
    import importlib

    depth = [0]
    for (module, name), stage in STAGE_FUNCTIONS.items():
        mod = importlib.import_module(module)
        real = getattr(mod, name)

        def wrapped(*args, real=real, stage=stage, **kwargs):
            text = " ".join(str(v) for v in list(args) + list(kwargs.values()))
            where = next((f"round_{r}" for r in (1, 2, 3) if f"/round_{r}/" in text + "/"), "shards")
            if depth[0] == 0:
                calls.append((stage, where))
            if fail_on and fail_on(stage, where):
                raise MLCDError("simulated kill")
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(mod, name, wrapped)


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_rounds_resume_after_a_failure_in_round_2(corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg_path = write_yaml(tmp_path / "pipeline.yaml", small_config(corpus, out))

    # first run: round 2's clustering dies after round 2's embeddings were written
    calls: list = []
    with monkeypatch.context() as m:
        spy_stages(m, calls, fail_on=lambda stage, where: (stage, where) == ("cluster", "round_2"))
        with pytest.raises(MLCDError, match=r"stage round 2/2 cluster: simulated kill"):
            pipeline.main(["--config", cfg_path, "--quiet-train"])
    assert calls[-1] == ("cluster", "round_2")
    assert (out / "round_2" / "emb" / "meta.json").is_file()
    assert not (out / "round_2" / "clusters" / "centroids.npy").exists()
    before = snapshot(out)

    # rerun: only round 2's unfinished stages run; nothing finished is rewritten
    calls.clear()
    with monkeypatch.context() as m:
        spy_stages(m, calls)
        assert pipeline.main(["--config", cfg_path, "--quiet-train"]) == 0
    assert calls == [("cluster", "round_2"), ("assign", "round_2"), ("train", "round_2"), ("export", "round_2"),
                     ("probe", "round_2")]
    after = snapshot(out)
    unchanged = [f for f in before if not f.startswith(("summary.json", "logs/"))]
    assert any(f.startswith("round_1/train/checkpoints/") for f in unchanged)
    assert {f: after.get(f) for f in unchanged} == {f: before[f] for f in unchanged}

    # round 2 learnt from round 1's student: its embeddings and labels name that export
    student_1 = out / "round_1" / "export" / "student.pt"
    emb_meta = json.loads((out / "round_2" / "emb" / "meta.json").read_text())
    assert emb_meta["embedder"] == f"mlcd:{student_1}"
    assert emb_meta["embedder_info"]["checkpoint"] == str(student_1)
    assert json.loads((out / "round_2" / "labels" / "meta.json").read_text())["embedder"] == f"mlcd:{student_1}"
    assert json.loads((out / "round_1" / "emb" / "meta.json").read_text())["embedder"] == "pca"

    # the summary holds every round's probe, the plot exists; a third run does nothing
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["probe"]) == {"round 1 student", "round 2 student"}
    assert all(r["n_test"] == 100 for r in summary["probe"].values())
    assert (out / "probe_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["skipped"] for r in summary["stages"]].count(False) == 5
    calls.clear()
    with monkeypatch.context() as m:
        spy_stages(m, calls)
        assert pipeline.main(["--config", cfg_path]) == 0
    assert calls == []


@pytest.mark.parametrize("change, message", [
    ({"kk": 3}, r"key 'kk': unknown key \(did you mean 'k'\?\)"),
    ({"teacher": {"model": "pca", "dimm": 3}}, r"key 'teacher.dimm': unknown key \(did you mean 'teacher.dim'\?\)"),
    ({"teacher": "clip"}, r"key 'teacher.model': expected pca"),
    ({"k": None}, r"key 'k': required"),
    ({"l": 30}, r"key 'l': must be in \[1, k=20\]"),
    ({"rounds": 0}, r"key 'rounds': must be at least 1"),
    ({"nproc": "two"}, r"key 'nproc': expected an integer"),
    ({"probe": True, "input": {"train": "sample"}}, r"key 'input.test': required with probe on"),
    ({"train": {"overrides": ["optim.lrr=1"]}}, r"key 'train': config key 'optim.lrr': unknown key"),
    ({"train": {"overrides": ["data.shards=/x"]}}, r"key 'train.overrides': 'data.shards' is set by the pipeline"),
    ({"train": {"config": "no_such_preset"}}, r"key 'train': --config 'no_such_preset'"),
])
def test_bad_config_is_refused_naming_the_key(corpus, tmp_path, change, message):
    cfg = small_config(corpus, tmp_path / "out", **change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = write_yaml(tmp_path / "p.yaml", cfg)
    with pytest.raises(MLCDError, match=message):
        pipeline.main(["--config", path])
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_line_naming_the_file_and_key(corpus, tmp_path, capsys):
    path = write_yaml(tmp_path / "p.yaml", small_config(corpus, tmp_path / "out", kk=1))
    assert run_stage("pipeline", ["--config", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlcd pipeline: error: {path}: key 'kk': unknown key (did you mean 'k'?)"]
    (tmp_path / "bad.yaml").write_text("k: [1,\n")
    assert run_stage("pipeline", ["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: not valid YAML" in capsys.readouterr().err


def test_a_rerun_with_other_settings_is_refused_but_more_rounds_are_not(corpus, tmp_path):
    cfg = pipeline.validate(small_config(corpus, tmp_path / "out"))
    pipeline.Pipeline(cfg).check_identity()
    pipeline.Pipeline({**cfg, "rounds": 3}).check_identity()       # more rounds: the same run, continued
    with pytest.raises(MLCDError, match=r"pipeline.json: .* other settings \{'k': \(20, 21\)\}"):
        pipeline.Pipeline({**cfg, "k": 21}).check_identity()


def test_shipped_example_config_is_valid():
    from pathlib import Path

    cfg = pipeline.load(Path(__file__).resolve().parent.parent / "examples" / "pipeline_sample.yaml")
    assert cfg["input"]["train"] == "sample" and cfg["probe"]["enabled"]
