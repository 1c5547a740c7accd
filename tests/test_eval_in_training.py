"""k-NN evaluation during training: logged, the best checkpoint kept, the run's weights unchanged."""
from __future__ import annotations

import json

import pytest
import torch

from mlcd_train import config as C
from mlcd_train import export, train
from mlcd_train.utils.errors import MLCDError
from tests.fixtures import make_sample_shards
from tests.test_train import make_labels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_data")
    shards = make_sample_shards(tmp, n=160, shard_size=40)
    test = make_sample_shards(tmp, split="test", n=60, shard_size=60)
    return shards, make_labels(shards, tmp / "labels"), test


def _args(data, out, *extra):
    shards, labels, _ = data
    return [f"output_dir={out}", f"data.shards={shards}", f"data.labels={labels}", "model.name=ResNet-10-w16-28",
            "train.global_batch_size=8", "train.log_every=2", "train.device=cpu", "train.steps=6",
            "train.save_every=3", "loss.l=2", "loss.sample_rate=0.5", "loss.scale=16", "optim.warmup_steps=2",
            "data.num_workers=0", "data.shuffle_buffer=20", "seed=2", "data.aug.random_erasing=0.5", *extra]


def _weights(out, step=6):
    return torch.load(out / "checkpoints" / f"step_{step:08d}" / "model.pt", weights_only=True)["state_dict"]


def test_evaluation_is_logged_keeps_the_best_and_leaves_the_weights_alone(data, tmp_path):
    shards, _, test = data
    plain, evald = tmp_path / "plain", tmp_path / "eval"
    assert train.main(_args(data, plain)) == 0
    assert train.main(_args(data, evald, "eval.every=2", f"eval.train={shards}", f"eval.test={test}",
                            "eval.max_train=120")) == 0
    a, b = _weights(plain), _weights(evald)
    for k in a:
        assert torch.equal(a[k], b[k]), k                           # evaluation changed nothing

    recs = [json.loads(ln) for ln in (evald / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if "knn_top1" in r]
    assert [r["step"] for r in ev] == [2, 4, 6]
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in ev)
    assert ev[-1]["knn_best"] == max(r["knn_top1"] for r in ev)
    best = json.loads((evald / "best" / "meta.json").read_text())
    assert best["knn_top1"] == ev[-1]["knn_best"]
    assert best["step"] == [r["step"] for r in ev if r["knn_top1"] == best["knn_top1"]][0]
    # the best checkpoint is the weights of that step and exports like any other
    kept = torch.load(evald / "best" / "model.pt", weights_only=True)["state_dict"]
    if best["step"] in (3, 6):
        ref = _weights(evald, best["step"])
        assert all(torch.equal(kept[k], ref[k]) for k in ref)
    pt = tmp_path / "best.pt"
    assert export.main(["--checkpoint", str(evald / "best"), "--out", str(pt)]) == 0
    assert json.loads(pt.with_suffix(".json").read_text())["step"] == best["step"]

    # the figure is the k-NN of that backbone: recomputed here from the exported weights
    from mlcd_train.trainer.evaluation import KNNEvaluator

    cfg = C.build_config(None, _args(data, evald, f"eval.train={shards}", f"eval.test={test}", "eval.max_train=120"))
    ev_obj = KNNEvaluator(cfg.eval, 28, cfg.data.aug.mean, cfg.data.aug.std, torch.device("cpu"))
    assert ev_obj.evaluate(export.load_model(pt)) == pytest.approx(best["knn_top1"])


def test_evaluation_needs_both_folders(data, tmp_path):
    shards, _, _ = data
    with pytest.raises(MLCDError, match="eval.test"):
        train.main(_args(data, tmp_path / "x", "eval.every=2", f"eval.train={shards}"))


def _eval_bad_folder(rank, world, out, shards, labels, bad):
    return train.main([f"output_dir={out}", f"data.shards={shards}", f"data.labels={labels}",
                       "model.name=ResNet-10-w16-28", "train.global_batch_size=8", "train.device=cpu",
                       "train.steps=2", "loss.l=2", "data.num_workers=0", "eval.every=1",
                       f"eval.train={bad}", f"eval.test={bad}"])


@pytest.mark.slow
def test_an_evaluation_error_on_rank_0_reaches_every_rank(data, tmp_path):
    """Rank 0 builds the evaluator; a bad eval folder there must stop all ranks with the message,
    not leave rank 1 at a barrier until the collective timeout."""
    from tests.dist_utils import run_distributed

    shards, labels, _ = data
    with pytest.raises(RuntimeError) as exc:
        run_distributed(_eval_bad_folder, 2, args=(str(tmp_path / "r"), str(shards), str(labels),
                                                   str(tmp_path / "missing")), timeout=120)
    assert "evaluation on rank 0" in str(exc.value) and "TimeoutError" not in type(exc.value).__name__
