"""mlcd shards: round trip, determinism, bad inputs, CLI errors, resume of an interrupted run."""
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from mlcd_train import cli
from mlcd_train.data import shards
from mlcd_train.data.reader import ShardDataset, list_shards
from mlcd_train.data.sample import CLASS_NAMES, sample_paths
from mlcd_train.utils.errors import MLCDError
from tests.fixtures import make_image_folder, make_sample_shards


def _hash_dir(d):
    h = hashlib.sha256()
    for name in sorted(os.listdir(d)):
        h.update(name.encode())
        with open(os.path.join(d, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return [(m.name, m.mtime) for m in tf.getmembers()]


def test_idx_round_trip_pixels_and_classes(tmp_path):
    out = make_sample_shards(tmp_path, n=150, shard_size=40)
    images = shards.read_idx(sample_paths("train")[0])[:150]
    labels = shards.read_idx(sample_paths("train")[1])[:150]
    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sizes.values()) == [40, 40, 40, 30]
    got = list(ShardDataset(out))
    assert len(got) == 150
    for s in got:
        i = int(s.key.rsplit("_", 1)[1])
        pixels = np.asarray(s.image)
        assert pixels.shape == (28, 28, 3)
        assert np.array_equal(pixels[:, :, 0], images[i]) and np.array_equal(pixels[:, :, 2], images[i])
        assert s.cls == labels[i]
    assert sorted(int(s.key.rsplit("_", 1)[1]) for s in got) == list(range(150))
    names = json.loads((out / "classes.json").read_text())
    assert names == {str(i): n for i, n in enumerate(CLASS_NAMES)}


def test_folder_keeps_file_bytes_and_folder_classes(tmp_path):
    src = make_image_folder(tmp_path / "src", n=9, size=16, num_classes=3)
    # one JPEG with a misleading .png name: stored as-is under its real format
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    (src / "class_2" / "really_jpeg.png").write_bytes(buf.getvalue())
    Image.new("RGB", (8, 8)).save(src / "top_level.png")  # no class folder -> no cls
    out = tmp_path / "out"
    assert shards.main(["--input", str(src), "--out", str(out), "--order", "sorted"]) == 0
    with tarfile.open(out / "shard-000000.tar") as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    assert members["class_0/img_00000.png"] == (src / "class_0" / "img_00000.png").read_bytes()
    assert members["class_0/img_00000.cls"] == b"0"
    assert members["class_2/img_00008.cls"] == b"2"
    assert members["class_2/really_jpeg.jpg"] == buf.getvalue()
    assert "top_level.png" in members and "top_level.cls" not in members
    assert json.loads((out / "classes.json").read_text()) == {"0": "class_0", "1": "class_1", "2": "class_2"}
    by_key = {s.key: s for s in ShardDataset(out)}
    assert by_key["top_level"].cls is None and by_key["class_1/img_00004"].cls == 1
    assert np.array_equal(np.asarray(by_key["class_1/img_00004"].image),
                          np.asarray(Image.open(src / "class_1" / "img_00004.png").convert("RGB")))


def test_list_file_with_names_and_ids(tmp_path):
    src = make_image_folder(tmp_path / "src", n=4, size=8, num_classes=2)
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\nsrc/class_0/img_00000.png\tdog\n\nsrc/class_1/img_00001.png\tcat\n"
                   f"{src}/class_0/img_00002.png\n")
    out = tmp_path / "out"
    assert shards.main(["--input", str(lst), "--out", str(out), "--order", "sorted"]) == 0
    got = {s.key: s.cls for s in ShardDataset(out)}
    assert got == {"src/class_0/img_00000": 1, "src/class_1/img_00001": 0, "src/class_0/img_00002": None}
    assert json.loads((out / "classes.json").read_text()) == {"0": "cat", "1": "dog"}

    lst.write_text("src/class_0/img_00000.png\t7\nsrc/class_1/img_00001.png\t3\n")
    out2 = tmp_path / "out2"
    assert shards.main(["--input", str(lst), "--out", str(out2)]) == 0
    assert sorted(s.cls for s in ShardDataset(out2)) == [3, 7]
    assert not (out2 / "classes.json").exists()


def test_same_input_gives_byte_identical_shards(tmp_path):
    src = make_image_folder(tmp_path / "src", n=30, size=8, num_classes=3)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert shards.main(["--input", str(src), "--out", str(out), "--shard-size", "7"]) == 0
        runs.append(_hash_dir(out))
    assert runs[0] == runs[1]
    assert all(mtime == shards.TAR_MTIME for _, mtime in _members(tmp_path / "a" / "shard-000000.tar"))
    # the order is the seeded shuffle: another seed gives other shards with the same samples
    out = tmp_path / "c"
    assert shards.main(["--input", str(src), "--out", str(out), "--shard-size", "7", "--seed", "1"]) == 0
    assert _hash_dir(out) != runs[0]
    keys = lambda d: sorted(s.key for s in ShardDataset(d))  # noqa: E731
    assert keys(out) == keys(tmp_path / "a")


def test_every_kind_of_bad_file_is_reported_and_skipped(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", n=4, size=16, num_classes=2)
    good = (src / "class_0" / "img_00000.png").read_bytes()
    (src / "class_0" / "empty.jpg").write_bytes(b"")
    (src / "class_0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (src / "class_1" / "notes.jpg").write_text("this is not an image")
    os.symlink(tmp_path / "nowhere.png", src / "class_1" / "dangling.png")
    Image.new("L", (300, 300)).save(src / "class_1" / "huge.png")
    (src / "class_1" / "readme.txt").write_text("hello")
    out = tmp_path / "out"
    assert shards.main(["--input", str(src), "--out", str(out), "--max-image-pixels", "50000"]) == 0
    skipped = {os.path.basename(s["path"]): s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert skipped.keys() == {"empty.jpg", "truncated.png", "notes.jpg", "dangling.png", "huge.png", "readme.txt"}
    assert "empty" in skipped["empty.jpg"]
    assert "truncated" in skipped["truncated.png"]
    assert "not an image" in skipped["notes.jpg"]
    assert "unreadable" in skipped["dangling.png"]
    assert "too large" in skipped["huge.png"]
    assert "extension" in skipped["readme.txt"]
    printed = capsys.readouterr().out
    for name in skipped:
        assert name in printed
    assert sorted(s.key for s in ShardDataset(out)) == sorted(f"class_{i % 2}/img_{i:05d}" for i in range(4))


def test_missing_input_and_empty_corpus_are_clear_errors(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["shards", "--input", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope: input not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["shards", "--input", str(empty), "--out", str(out)]) == 2
    assert "no image files" in capsys.readouterr().err
    (empty / "bad.png").write_bytes(b"garbage")
    (empty / "zero.jpg").write_bytes(b"")
    assert cli.main(["shards", "--input", str(empty), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no valid image" in err and "bad.png" in err and "zero.jpg" in err
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(MLCDError, match="bad magic"):
        (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04rest")
        shards.main(["--input", str(tmp_path / "x-images-idx3-ubyte"), "--out", str(out)])


def test_shard_size_byte_limit_prefix_and_overwrite(tmp_path):
    src = make_image_folder(tmp_path / "src", n=10, size=16, num_classes=2)
    out = tmp_path / "out"
    assert shards.main(["--input", str(src), "--out", str(out), "--shard-size", "4", "--prefix", "fm"]) == 0
    assert json.loads((out / "sizes.json").read_text()) == {"fm-000000.tar": 4, "fm-000001.tar": 4, "fm-000002.tar": 2}
    with pytest.raises(MLCDError, match="--overwrite"):
        shards.main(["--input", str(src), "--out", str(out), "--prefix", "fm"])
    # a byte limit below two samples: one sample per shard; the old, longer run's shards go away
    one = len((src / "class_0" / "img_00000.png").read_bytes())
    assert shards.main(["--input", str(src), "--out", str(out), "--prefix", "fm", "--shard-size", "100",
                        "--max-bytes", str(one + 2000), "--overwrite"]) == 0
    sizes = json.loads((out / "sizes.json").read_text())
    assert set(sizes.values()) == {1} and len(sizes) == 10
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(sizes)
    assert len(list_shards(out)) == 10
    # shards of some other run without sizes.json are not overwritten silently either
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard-000000.tar").write_bytes(b"not ours")
    with pytest.raises(MLCDError, match="--overwrite"):
        shards.main(["--input", str(src), "--out", str(other)])
    assert (other / "shard-000000.tar").read_bytes() == b"not ours"


def test_idx_raw_labels_found_by_name_and_missing_labels(tmp_path):
    images = shards.read_idx(sample_paths("test")[0])[:5]
    labels = shards.read_idx(sample_paths("test")[1])[:5]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t-images-idx3-ubyte").write_bytes(shards.idx_bytes(images, compress=False))
    (tmp_path / "a" / "t-labels-idx1-ubyte").write_bytes(shards.idx_bytes(labels, compress=False))
    assert shards.main(["--input", str(tmp_path / "a" / "t-images-idx3-ubyte"), "--out", str(tmp_path / "o1"),
                        "--order", "sorted"]) == 0
    assert [s.cls for s in ShardDataset(tmp_path / "o1")] == labels.tolist()
    (tmp_path / "a" / "t-labels-idx1-ubyte").unlink()
    assert shards.main(["--input", str(tmp_path / "a" / "t-images-idx3-ubyte"), "--out", str(tmp_path / "o2")]) == 0
    assert {s.cls for s in ShardDataset(tmp_path / "o2")} == {None}
    (tmp_path / "a" / "t-labels-idx1-ubyte").write_bytes(shards.idx_bytes(labels[:3], compress=False))
    with pytest.raises(MLCDError, match="t-labels-idx1-ubyte"):
        shards.main(["--input", str(tmp_path / "a" / "t-images-idx3-ubyte"), "--out", str(tmp_path / "o3")])


def _killed_on_call(n, real, calls):
    """check_image that counts its calls in ``calls`` and is "killed" (KeyboardInterrupt) on the n-th."""
    def check(data):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(data)
    return check


def test_interrupted_run_resumes_to_identical_output(tmp_path, monkeypatch):
    src = make_image_folder(tmp_path / "src", n=20, size=8, num_classes=2)
    args = ["--input", str(src), "--shard-size", "6"]
    assert shards.main(args + ["--out", str(tmp_path / "clean")]) == 0

    real_check, calls = shards.check_image, []
    monkeypatch.setattr(shards, "check_image", _killed_on_call(15, real_check, calls))  # in the third shard
    with pytest.raises(KeyboardInterrupt):
        shards.main(args + ["--out", str(tmp_path / "run")])
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [".shards-progress.json", "shard-000000.tar", "shard-000001.tar"]
    calls.clear()
    monkeypatch.setattr(shards, "check_image", lambda data: (calls.append(1), real_check(data))[1])
    assert shards.main(args + ["--out", str(run)]) == 0
    assert len(calls) == 8  # only the inputs after the two complete shards were read again
    assert _hash_dir(run) == _hash_dir(tmp_path / "clean")


def test_interrupted_overwrite_leaves_no_stale_metadata_or_shards(tmp_path, monkeypatch):
    labelled = make_image_folder(tmp_path / "a", n=6, size=8, num_classes=2)
    unlabelled = tmp_path / "b"
    unlabelled.mkdir()
    for i in range(6):  # top-level images: no class, so no classes.json
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(unlabelled / f"b{i}.png")
    out = tmp_path / "out"
    args = ["--out", str(out), "--shard-size", "2", "--order", "sorted"]
    assert shards.main(["--input", str(labelled)] + args) == 0
    assert {"sizes.json", "skipped.json", "classes.json", "shard-000002.tar"} <= {p.name for p in out.iterdir()}

    real_check, calls = shards.check_image, []
    monkeypatch.setattr(shards, "check_image", _killed_on_call(4, real_check, calls))  # after the first new shard
    with pytest.raises(KeyboardInterrupt):
        shards.main(["--input", str(unlabelled), "--overwrite"] + args)
    # nothing of the first run is left to pass for a complete folder or to mix with the new shards
    assert sorted(p.name for p in out.iterdir()) == [".shards-progress.json", "shard-000000.tar"]
    monkeypatch.setattr(shards, "check_image", real_check)
    assert shards.main(["--input", str(unlabelled)] + args) == 0  # resumes
    assert not (out / "classes.json").exists()
    assert sorted(s.key for s in ShardDataset(out)) == [f"b{i}" for i in range(6)]


def test_a_file_that_crashes_the_decoder_is_skipped(tmp_path):
    import struct

    src = make_image_folder(tmp_path / "src", n=2, size=8, num_classes=1)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for i in range(n):  # StripOffsets typed ASCII: Pillow raises TypeError while loading
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 2)
    (src / "class_0" / "bad.tif").write_bytes(bytes(data))
    out = tmp_path / "out"
    assert shards.main(["--input", str(src), "--out", str(out)]) == 0
    [skip] = json.loads((out / "skipped.json").read_text())
    assert skip["path"].endswith("bad.tif") and "TypeError" in skip["reason"]
    assert sorted(s.key for s in ShardDataset(out)) == ["class_0/img_00000", "class_0/img_00001"]


def test_classes_file_gives_every_split_the_training_ids(tmp_path):
    for split, names in (("train", ["cat", "dog", "fish"]), ("test", ["cat", "fish"])):
        for c in names:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), "red").save(tmp_path / split / c / f"{c}.png")
    assert shards.main(["--input", str(tmp_path / "train"), "--out", str(tmp_path / "tr")]) == 0
    classes = tmp_path / "tr" / "classes.json"
    assert shards.main(["--input", str(tmp_path / "test"), "--out", str(tmp_path / "te"),
                        "--classes", str(classes)]) == 0
    assert {s.key: s.cls for s in ShardDataset(tmp_path / "te")} == {"cat/cat": 0, "fish/fish": 2}
    assert (tmp_path / "te" / "classes.json").read_text() == classes.read_text()
    lst = tmp_path / "list.txt"  # list files too
    lst.write_text("test/fish/fish.png\tfish\n")
    assert shards.main(["--input", str(lst), "--out", str(tmp_path / "li"), "--classes", str(classes)]) == 0
    assert [s.cls for s in ShardDataset(tmp_path / "li")] == [2]
    (tmp_path / "test" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "bird" / "b.png")
    with pytest.raises(MLCDError, match=r"tr/classes.json: has no class 'bird'"):
        shards.main(["--input", str(tmp_path / "test"), "--out", str(tmp_path / "te2"), "--classes", str(classes)])


def test_symlinked_class_folder_is_read_and_a_link_loop_reported(tmp_path):
    src = tmp_path / "in"
    (src / "cat").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (4, 4)).save(src / "cat" / "c.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "elsewhere" / "d.png")
    os.symlink(tmp_path / "elsewhere", src / "dog")
    os.symlink(src, src / "cat" / "loop")  # back to the top: read once only
    out = tmp_path / "out"
    assert shards.main(["--input", str(src), "--out", str(out)]) == 0
    assert {s.key: s.cls for s in ShardDataset(out)} == {"cat/c": 0, "dog/d": 1}
    assert json.loads((out / "classes.json").read_text()) == {"0": "cat", "1": "dog"}
    [skip] = json.loads((out / "skipped.json").read_text())
    assert skip["path"] == str(src / "cat" / "loop") and "already read" in skip["reason"]


def test_idx_with_one_channel_converts_and_odd_channel_counts_are_refused(tmp_path):
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4, 1)
    path = tmp_path / "c1-images-idx3-ubyte"
    path.write_bytes(shards.idx_bytes(images, compress=False))
    assert shards.main(["--input", str(path), "--out", str(tmp_path / "o"), "--order", "sorted"]) == 0
    got = list(ShardDataset(tmp_path / "o"))
    assert len(got) == 3 and np.array_equal(np.asarray(got[1].image)[:, :, 0], images[1, :, :, 0])
    path.write_bytes(shards.idx_bytes(np.zeros((2, 4, 4, 2), np.uint8), compress=False))
    with pytest.raises(MLCDError, match="c1-images-idx3-ubyte: 2 channels"):
        shards.main(["--input", str(path), "--out", str(tmp_path / "o2")])
