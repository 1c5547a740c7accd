"""data.sources: several (shards, labels, weight) sources mixed by weight, deterministically by
stream position; label folders of other centres refused; the loader's position saved and
restored (TrainStream.state_dict / load_state_dict) and an exact resume with two sources."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mlcd_train import config as C
from mlcd_train import train
from mlcd_train.trainer.data import TrainStream, pick_source
from mlcd_train.utils.errors import MLCDError
from tests.fixtures import make_sample_shards
from tests.test_train import TINY, make_labels

SHA = "ab" * 32


def _with_sha(labels: Path, sha: str = SHA) -> Path:
    meta = json.loads((labels / "meta.json").read_text())
    meta["centroids_sha"] = sha
    (labels / "meta.json").write_text(json.dumps(meta))
    return labels


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two sources: 200 and 100 samples of the shipped sample, labelled against the same centres."""
    tmp = tmp_path_factory.mktemp("sources")
    a = make_sample_shards(tmp / "a", n=200, shard_size=100)
    b = make_sample_shards(tmp / "b", split="test", n=100, shard_size=50)
    return (a, _with_sha(make_labels(a, tmp / "la"))), (b, _with_sha(make_labels(b, tmp / "lb")))


def _sources(two, wa=3, wb=1) -> str:
    (a, la), (b, lb) = two
    return (f"data.sources=[{{shards: {a}, labels: {la}, weight: {wa}}}, "
            f"{{shards: {b}, labels: {lb}, weight: {wb}}}]")


def _args(out, two, *extra, wa=3, wb=1):
    return [f"output_dir={out}", _sources(two, wa, wb), *TINY, *extra]


def _within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """|count - n p| within ``sigmas`` binomial standard deviations (a false failure has a
    probability below 1e-5)."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_picks_follow_the_weights_and_are_a_function_of_the_position():
    cum = [0.6, 0.9, 1.0]  # weights 6 : 3 : 1
    n = 20000
    picks = [pick_source(cum, 7, 0, pos) for pos in range(n)]
    for i, p in enumerate((0.6, 0.3, 0.1)):
        assert _within(picks.count(i), n, p), (i, picks.count(i))
    assert picks == [pick_source(cum, 7, 0, pos) for pos in range(n)]            # deterministic
    assert picks != [pick_source(cum, 7, 1, pos) for pos in range(n)]            # another rank, other draws
    assert {pick_source([1.0], 7, 0, pos) for pos in range(100)} == {0}


@pytest.mark.slow
def test_loader_draws_each_source_by_its_weight(two, tmp_path):
    """The samples of the stream come from each source in proportion to its weight (3 : 1),
    within 4.5 binomial standard deviations of 400 draws; labels come from the source's folder."""
    cfg = C.build_config(None, _args(tmp_path / "o", two, "data.num_workers=2"))
    s = TrainStream(cfg, 0, 1, 8, 28)
    for _ in range(50):
        b = next(s)
        assert b.images.shape == (8, 3, 28, 28) and b.labels.shape == (8, 2)
    s.close()
    n = sum(s.source_counts)
    assert n == 400 and _within(s.source_counts[0], n, 0.75), s.source_counts
    cfg2 = C.build_config(None, _args(tmp_path / "o", two, "data.num_workers=2", wa=1, wb=3))
    s2 = TrainStream(cfg2, 0, 1, 8, 28)
    for _ in range(50):
        next(s2)
    s2.close()
    assert _within(s2.source_counts[1], 400, 0.75), s2.source_counts


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_state_dict_resumes_exactly_with_two_sources(two, tmp_path, workers):
    cfg = C.build_config(None, _args(tmp_path / "o", two, f"data.num_workers={workers}"))
    full = TrainStream(cfg, 0, 2, 4, 28)
    ref = [next(full) for _ in range(9)]
    full.close()
    part = TrainStream(cfg, 0, 2, 4, 28)
    for _ in range(5):
        next(part)
    state = part.state_dict()
    part.close()
    assert state["batches"] == 5 and state["sources"] == 2
    again = TrainStream(cfg, 0, 2, 4, 28)
    again.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint keeps survives plain types
    for want in ref[5:]:
        got = next(again)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    with pytest.raises(RuntimeError, match="has started"):
        again.load_state_dict(state)
    again.close()


@pytest.mark.slow
def test_mismatched_centres_are_refused_naming_both_folders(two, tmp_path):
    (a, la), (b, lb) = two
    other = tmp_path / "lb_other"
    shutil.copytree(lb, other)
    _with_sha(other, "cd" * 32)
    args = [f"output_dir={tmp_path / 'x'}",
            f"data.sources=[{{shards: {a}, labels: {la}, weight: 1}}, {{shards: {b}, labels: {other}, weight: 1}}]",
            *TINY]
    with pytest.raises(MLCDError, match=rf"'data.sources': {other} .*and {la} .*different centres"):
        train.main(args)
    unrecorded = tmp_path / "lb_none"
    shutil.copytree(lb, unrecorded)
    meta = json.loads((unrecorded / "meta.json").read_text())
    del meta["centroids_sha"]
    (unrecorded / "meta.json").write_text(json.dumps(meta))
    args[1] = f"data.sources=[{{shards: {a}, labels: {la}, weight: 1}}, {{shards: {b}, labels: {unrecorded}}}]"
    with pytest.raises(MLCDError, match=rf"{unrecorded}/meta.json records no centroids_sha"):
        train.main(args)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_sources_keys_are_checked():
    base = ["output_dir=/tmp/x", "train.steps=5", "train.global_batch_size=8", "loss.num_classes=10"]
    with pytest.raises(MLCDError, match=r"'data.sources': data.sources\[0\]: weight must be a positive number"):
        C.validate(C.build_config(None, base + ["data.sources=[{shards: a, labels: b, weight: 0}]"]))
    with pytest.raises(MLCDError, match=r"'data.sources': data.sources\[0\]: unknown key 'lables'"):
        C.validate(C.build_config(None, base + ["data.sources=[{shards: a, labels: b, lables: c}]"]))
    with pytest.raises(MLCDError, match=r"'data.sources': give either data.sources or data.shards"):
        C.validate(C.build_config(None, base + ["data.sources=[{shards: a, labels: b}]", "data.shards=a"]))
    C.validate(C.build_config(None, base + ["data.sources=[{shards: a, labels: b, weight: 2.5}]"]))


@pytest.mark.slow
def test_trainer_resume_with_two_sources_is_exact(two, tmp_path):
    """6 steps straight against 3, then a resume to 6: the same weights (one process, a loader
    worker per source stream, two sources 3 : 1)."""
    common = ["train.global_batch_size=8", "train.log_every=1", "train.keep_last=5", "data.num_workers=2",
              "data.shuffle_buffer=20", "loss.l=2", "loss.sample_rate=0.5", "loss.scale=16", "optim.warmup_steps=2",
              "seed=4", "train.save_every=3"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert train.main(_args(ref, two, *common, "train.steps=6")) == 0
    assert train.main(_args(cut, two, *common, "train.steps=3")) == 0
    assert train.main(_args(cut, two, *common, "train.steps=6")) == 0
    a = torch.load(ref / "checkpoints" / "step_00000006" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "checkpoints" / "step_00000006" / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    st = torch.load(cut / "checkpoints" / "step_00000003" / "trainer_state.pt", weights_only=True)
    assert st["loader"][0]["batches"] == 3 and st["loader"][0]["sources"] == 2
    assert st["labels"]["centroids_sha"] == SHA
