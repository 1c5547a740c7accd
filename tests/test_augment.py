"""The authors' regularisers (RandAugment, colour jitter, random erasing, drop path): each is
seeded by the sample's stream position, and exact resume still holds with all of them on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlcd_train import config as C
from mlcd_train import train
from mlcd_train.trainer.data import Augment, build_shard_loader
from mlcd_train.utils.errors import MLCDError
from tests.fixtures import make_sample_shards
from tests.test_train import make_labels

ALL_ON = ["data.aug.rand_augment=2", "data.aug.color_jitter=0.4", "data.aug.random_erasing=0.5"]


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))


@pytest.mark.parametrize("key,value", [("rand_augment", 2), ("color_jitter", 0.4), ("random_erasing", 1.0)])
def test_each_augmentation_is_a_function_of_the_seed(key, value):
    base = Augment(28, C.AugConfig(random_resized_crop=False, flip=False))
    aug = Augment(28, C.AugConfig(random_resized_crop=False, flip=False, **{key: value}))
    img = _image()
    before = torch.get_rng_state()
    a, b = aug(img, 11), aug(img, 11)
    assert torch.equal(a, b)                                        # same seed, same pixels
    assert torch.equal(torch.get_rng_state(), before)               # the caller's generator untouched
    outs = [aug(img, s) for s in range(12)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])       # other seeds, other pixels
    assert any(not torch.equal(base(img, s), o) for s, o in enumerate(outs))   # and it does something


def test_defaults_leave_the_paper_presets_unchanged():
    cfg = C.build_config("vit_l14_paper")
    a = cfg.data.aug
    assert (a.rand_augment, a.color_jitter, a.random_erasing, cfg.model.drop_path) == (0, 0.0, 0.0, None)


@pytest.mark.parametrize("override", ["data.aug.rand_augment=-1", "data.aug.color_jitter=2",
                                      "data.aug.random_erasing=1.5", "model.drop_path=1.0",
                                      "data.aug.std=[0,0,0]", "data.aug.rand_augment_magnitude=31"])
def test_out_of_range_values_are_refused_by_key(override):
    cfg = C.build_config("fashion_mnist_tiny", [override, "output_dir=/tmp/x"])
    with pytest.raises(MLCDError, match=override.split("=")[0].replace(".", r"\.")):
        C.validate(cfg, 1, {"k": 10, "topk": 8})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aug_data")
    shards = make_sample_shards(tmp, n=200, shard_size=50)
    return shards, make_labels(shards, tmp / "labels")


def _args(data, out, *extra):
    shards, labels = data
    return [f"output_dir={out}", f"data.shards={shards}", f"data.labels={labels}", "model.name=ResNet-10-w16-28",
            "model.drop_path=0.2", "train.global_batch_size=8", "train.log_every=1", "train.device=cpu",
            "loss.l=2", "loss.sample_rate=0.5", "loss.scale=16", "optim.warmup_steps=2", "data.num_workers=1",
            "data.shuffle_buffer=20", "seed=5", *ALL_ON, *extra]


def test_stream_with_every_augmentation_resumes_in_the_same_order(data):
    cfg = C.build_config(None, _args(data, "/tmp/unused", "data.num_workers=2"))

    def batches(start, n):
        loader, _ = build_shard_loader(cfg, 0, 1, 4, start, 28)
        it = iter(loader)
        return [next(it)[:2] for _ in range(n)]

    full = batches(0, 6)
    again = batches(3, 3)
    for (x, y), (x2, y2) in zip(full[3:], again):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_trainer_resume_is_exact_with_augmentations_and_drop_path(data, tmp_path):
    import torch as T

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert train.main(_args(data, ref, "train.steps=6", "train.save_every=6")) == 0
    assert train.main(_args(data, cut, "train.steps=3", "train.save_every=3")) == 0
    assert train.main(_args(data, cut, "train.steps=6", "train.save_every=3")) == 0
    a = T.load(ref / "checkpoints" / "step_00000006" / "model.pt", weights_only=True)["state_dict"]
    b = T.load(cut / "checkpoints" / "step_00000006" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert T.allclose(a[k].double(), b[k].double(), atol=1e-5), k
    # the regularisers were on: a run without them ends elsewhere
    off = tmp_path / "off"
    assert train.main(_args(data, off, "train.steps=6", "train.save_every=6", "model.drop_path=0.0",
                            "data.aug.rand_augment=0", "data.aug.color_jitter=0", "data.aug.random_erasing=0")) == 0
    c = T.load(off / "checkpoints" / "step_00000006" / "model.pt", weights_only=True)["state_dict"]
    assert any(not T.allclose(a[k].double(), c[k].double(), atol=1e-5) for k in a if a[k].is_floating_point())
