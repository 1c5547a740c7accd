"""Hostile inputs (issue 15): every file a stage reads may come from someone else.

One test per class of fault, each on the instance the issue names plus at least one other
place the same rule covers:

1. no code runs from a file we read (``weights_only=True``, ``allow_pickle=False``);
2. no path taken from a file leaves its folder;
3. no stage writes into (or clears) a folder it reads;
6. only regular files are read, their size checked before their bytes (gzip bombs too);
7. numeric command-line options out of range are refused naming the option;
9. meta files with values of the wrong JSON type are an error naming the file and key.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mlcd_train.utils.errors import MLCDError

TINY = ["model.name=ViT-Tiny-4-28", "model.overrides={width: 32, layers: 2, heads: 2, output_dim: 16}"]


def _synthetic(out, *extra):
    return [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", *TINY,
            "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0", *extra]


class _Payload:
    """Pickled, it calls ``Path.touch(marker)`` when unpickled without weights_only."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ----------------------------------------------------------------------- 1. code in files

def test_rng_state_round_trips_through_weights_only_save(tmp_path):
    from mlcd_train.trainer import checkpoint as ck

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    path = tmp_path / "state.pt"
    torch.save({"rng": [ck.rng_state()]}, path)
    want = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ck.set_rng_state(torch.load(path, weights_only=True)["rng"][0])
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == want


def test_resume_never_runs_code_from_a_checkpoint(tmp_path):
    """resume=PATH loads model.pt, optimizer.pt, trainer_state.pt with weights_only=True: a
    clean checkpoint resumes, one with a pickled payload is refused before the payload runs."""
    from mlcd_train import train

    out = tmp_path / "run"
    assert train.main(_synthetic(out, "train.steps=2")) == 0
    step = out / "checkpoints" / "step_00000002"
    # the trainer state (RNG states included) loads without unpickling any object
    torch.load(step / "trainer_state.pt", weights_only=True)
    assert train.main(_synthetic(tmp_path / "branch", "train.steps=3", f"resume={step}")) == 0

    for name in ("model.pt", "trainer_state.pt", "optimizer.pt"):
        marker = tmp_path / f"pwned-{name}"
        evil = tmp_path / f"evil-{name}"
        shutil.copytree(step, evil)
        obj = torch.load(step / name, weights_only=True)
        obj["x"] = _Payload(str(marker))
        torch.save(obj, evil / name)
        with pytest.raises(MLCDError, match=f"{name}: .*could run code"):
            train.main(_synthetic(tmp_path / f"b-{name}", "train.steps=3", f"resume={evil}"))
        assert not marker.exists(), f"{name}: the pickled payload ran"


def test_partial_fc_and_embeddings_never_unpickle(tmp_path):
    """Other loads: a PartialFC shard, a probe's cached features and an EMB classes file."""
    from mlcd_train import partial_fc as P
    from mlcd_train.utils.io import safe_np_load, safe_torch_load

    marker = tmp_path / "pwned"
    torch.save({"format": "x", "evil": _Payload(str(marker))}, tmp_path / "pfc_rank0.pt")
    pfc = P.PartialFC(num_classes=8, embedding_size=4, sample_rate=1.0)
    with pytest.raises(MLCDError, match="pfc_rank0.pt"):
        P.load_partial_fc(pfc, tmp_path)
    with pytest.raises(MLCDError, match="could run code"):
        safe_torch_load(tmp_path / "pfc_rank0.pt")
    assert not marker.exists()
    np.save(tmp_path / "obj.npy", np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(MLCDError, match="obj.npy"):
        safe_np_load(tmp_path / "obj.npy")
    assert not marker.exists()


@pytest.mark.slow  # a conversion
def test_demo_reload_reads_safetensors_only(tmp_path):
    """The demo's HF reload check goes through convert's load_hf: a folder whose weights are a
    pickled pytorch_model.bin (here carrying a payload) is refused naming it, never unpickled."""
    from mlcd_train import demo
    from mlcd_train.cli import run_stage
    from mlcd_train.export import save_native
    from mlcd_train.models import create_model, model_config_to_dict

    torch.manual_seed(0)
    m = create_model("ViT-Tiny-4-28", pos_embed="abs", width=32, layers=1, heads=2, output_dim=8)
    pt, hf = tmp_path / "x.pt", tmp_path / "hf"
    save_native(m.state_dict(), model_config_to_dict(m), pt)
    assert run_stage("convert", ["--checkpoint_path", str(pt), "--pytorch_dump_folder_path", str(hf),
                                 "--no_verify"]) == 0
    from safetensors.torch import load_file

    weights = load_file(hf / "model.safetensors")
    marker = tmp_path / "pwned"
    torch.save({**weights, "x": _Payload(str(marker))}, hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    with pytest.raises(MLCDError, match=r"hf: transformers .*\(safetensors weights only\)"):
        demo.check_hf_reload(str(pt), str(hf), str(tmp_path / "no_shards"))
    assert not marker.exists()


# ----------------------------------------------------------------------- helpers

def _stage(name, argv, capsys):
    """(exit status, stderr) of ``mlcd NAME ARGV`` as the command runs it (MLCDError -> 2)."""
    from mlcd_train.cli import run_stage

    capsys.readouterr()
    rc = run_stage(name, [str(a) for a in argv])
    return rc, capsys.readouterr().err


def _emb(root, **kw):
    from tests.test_cluster import make_mixture_emb

    make_mixture_emb(root, n_shards=2, n=60, d=8, k=4, **kw)
    return root


def _centroids(tmp_path, emb_root):
    from clustering import kmeans

    cl = tmp_path / "cl"
    assert kmeans.main(["--emb", str(emb_root), "--k", "4", "--out", str(cl), "--threads", "1", "--niter", "2"]) == 0
    return cl


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# ----------------------------------------------------------------------- 2. paths from data

def test_shard_names_from_meta_files_stay_in_their_folder(tmp_path, capsys):
    """A shard name ``../elsewhere/evil`` in EMB/meta.json made assign write outside --out and
    delete a file there; names in sizes.json, the shards progress file and list files too."""
    from clustering import store

    emb = _emb(tmp_path / "emb")
    cl = _centroids(tmp_path, emb)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for suffix in (".npy", ".keys.npy", ".cls.npy"):  # a valid shard, reachable only through ..
        shutil.copy(emb / f"part-000000{suffix}", elsewhere / f"evil{suffix}")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "evil.keys.npy").write_bytes(b"precious")
    meta = json.loads((emb / "meta.json").read_text())
    meta["counts"] = {"../elsewhere/evil": 60}
    (emb / "meta.json").write_text(json.dumps(meta))
    rc, err = _stage("assign", ["--emb", emb, "--centroids", cl / "centroids.npy", "--topk", "2",
                                "--out", tmp_path / "lbl" / "x", "--threads", "1"], capsys)
    assert rc == 2 and "emb/meta.json" in err and "'../elsewhere/evil' is not a plain file name" in err
    assert not list(tmp_path.glob("**/evil.labels.npy"))
    rc, err = _stage("assign", ["--emb", emb, "--centroids", cl / "centroids.npy", "--topk", "2",
                                "--out", victim / "sub", "--overwrite", "--threads", "1"], capsys)
    assert rc == 2 and (victim / "evil.keys.npy").read_bytes() == b"precious"
    with pytest.raises(MLCDError, match="meta.json: shard name"):
        store.open_emb(emb)

    # sizes.json of a shard folder names the tars every reader opens
    from mlcd_train.data.reader import list_shards, read_sizes

    shards = tmp_path / "shards"
    shards.mkdir()
    (tmp_path / "outside.tar").write_bytes(b"")
    (shards / "sizes.json").write_text(json.dumps({"../outside.tar": 1}))
    with pytest.raises(MLCDError, match=r"shards/sizes.json: shard name '../outside.tar'"):
        list_shards(shards)
    (shards / "a.tar").write_bytes(b"")
    (shards / "sizes.json").write_text(json.dumps({"a.tar": "many"}))
    with pytest.raises(MLCDError, match=r"sizes.json: count of 'a.tar'"):
        read_sizes([str(shards / "a.tar")])


def test_list_file_entries_stay_in_the_list_folder(tmp_path, capsys):
    from PIL import Image

    from mlcd_train.data import shards

    (tmp_path / "data").mkdir()
    Image.new("RGB", (4, 4), "red").save(tmp_path / "data" / "in.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "secret.png")
    lst = tmp_path / "data" / "list.txt"
    lst.write_text(f"in.png\n../secret.png\n{tmp_path / 'secret.png'}\n")
    out = tmp_path / "out"
    assert shards.main(["--input", str(lst), "--out", str(out)]) == 0
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["reason"].split(" (")[0] for s in skipped] == [f"outside {tmp_path / 'data'}"] * 2
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 1}
    # --list-root widens the folder on purpose
    assert shards.main(["--input", str(lst), "--out", str(tmp_path / "out2"), "--list-root", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "out2" / "sizes.json").read_text()) == {"shard-000000.tar": 3}


def test_shards_progress_file_names_are_checked(tmp_path):
    from mlcd_train.data import shards

    with pytest.raises(MLCDError, match=r"progress.json: shard name '../../x.tar'"):
        p = tmp_path / "progress.json"
        p.write_text(json.dumps({"signature": "s", "shards": [{"name": "../../x.tar", "count": 1, "consumed": 1}],
                                 "skipped": []}))
        shards._read_progress(p, "shard")


# ----------------------------------------------------------------------- 3. out is an input

def test_no_stage_writes_into_a_folder_it_reads(tmp_path, capsys):
    from PIL import Image

    emb = _emb(tmp_path / "emb")
    cl = _centroids(tmp_path, emb)
    before = _snapshot(emb)
    # cluster --out EMB would replace the embeddings' meta.json
    rc, err = _stage("cluster", ["--emb", emb, "--k", "4", "--out", emb, "--overwrite"], capsys)
    assert rc == 2 and "--out" in err and "folder of --emb" in err
    # assign --out EMB --overwrite would delete every keys file; --out CL would replace CL/meta.json
    for out in (emb, cl, tmp_path / "cl" / "." ):
        rc, err = _stage("assign", ["--emb", emb, "--centroids", cl / "centroids.npy", "--topk", "2",
                                    "--out", out, "--overwrite"], capsys)
        assert rc == 2 and "a stage never writes into a folder it reads" in err
    assert _snapshot(emb) == before
    # a link to EMB is the same folder
    os.symlink(emb, tmp_path / "link")
    rc, err = _stage("cluster", ["--emb", emb, "--k", "4", "--out", tmp_path / "link"], capsys)
    assert rc == 2 and _snapshot(emb) == before

    # convert --overwrite into the folder holding the input export would delete it
    exp = tmp_path / "exp"
    exp.mkdir()
    torch.save({"conv1.weight": torch.zeros(1)}, exp / "x.pt")
    for out in (exp, tmp_path):
        rc, err = _stage("convert", ["--checkpoint_path", exp / "x.pt", "--pytorch_dump_folder_path", out,
                                     "--overwrite"], capsys)
        assert rc == 2 and "--pytorch_dump_folder_path" in err and (exp / "x.pt").is_file()
    rc, err = _stage("convert", ["--from-hf", exp, "--out", exp / "y.pt"], capsys)
    assert rc == 2 and "--from-hf" in err

    # shards --out inside the image folder it reads recursively
    src = tmp_path / "img"
    (src / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(src / "a" / "x.png")
    for out in (src, src / "a" / "shards"):
        rc, err = _stage("shards", ["--input", src, "--out", out], capsys)
        assert rc == 2 and "--input" in err
    assert sorted(p.name for p in src.rglob("*")) == ["a", "x.png"]
    assert _stage("shards", ["--input", src, "--out", tmp_path / "sh"], capsys)[0] == 0

    # embed --out the shard folder; probe --out the shard folder
    rc, err = _stage("embed", ["--shards", tmp_path / "sh", "--out", tmp_path / "sh", "--model", "pca"], capsys)
    assert rc == 2 and "folder of --shards" in err
    rc, err = _stage("probe", ["--embedder", "pca", "--train", tmp_path / "sh", "--test", tmp_path / "sh",
                               "--out", tmp_path / "sh"], capsys)
    assert rc == 2 and "folder of --train" in err
    assert sorted(p.name for p in (tmp_path / "sh").iterdir()) == ["classes.json", "shard-000000.tar",
                                                                    "sizes.json", "skipped.json"]


# ----------------------------------------------------------------------- 6. special files, bombs

def _in_thread(fn, fifo_paths, seconds=20):
    """Run ``fn`` in a thread; if it is still blocked (on a FIFO) after ``seconds``, unblock it
    by opening the FIFOs for writing, and fail."""
    box = {}

    def work():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for p in fifo_paths:
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(5)
        pytest.fail(f"blocked on a FIFO: {fifo_paths}")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def test_fifo_device_link_and_huge_image_are_skipped_unread(tmp_path, monkeypatch):
    from PIL import Image

    from mlcd_train.data import shards

    src = tmp_path / "img"
    src.mkdir()
    Image.new("RGB", (4, 4)).save(src / "ok.png")
    os.mkfifo(src / "fifo.png")
    os.symlink("/dev/zero", src / "zero.png")
    (src / "big.png").write_bytes(b"\0" * 2048)
    monkeypatch.setattr(shards, "MAX_IMAGE_FILE_BYTES", 1024)
    out = tmp_path / "out"
    assert _in_thread(lambda: shards.main(["--input", str(src), "--out", str(out)]), [src / "fifo.png"]) == 0
    reasons = {Path(s["path"]).name: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert reasons["fifo.png"].startswith("not a regular image file (a FIFO)")
    assert reasons["zero.png"].startswith("not a regular image file (a device)")
    assert reasons["big.png"].startswith("image file of 2048 bytes, over the limit of 1024")
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 1}


def test_fifo_named_like_a_shard_or_meta_file_is_refused(tmp_path):
    from clustering import store
    from mlcd_train.data.reader import ShardDataset

    shard_dir = tmp_path / "sh"
    shard_dir.mkdir()
    os.mkfifo(shard_dir / "shard-000000.tar")
    with pytest.raises(MLCDError, match=r"shard-000000.tar: not a regular shard \(a FIFO\)"):
        _in_thread(lambda: ShardDataset(shard_dir), [shard_dir / "shard-000000.tar"])
    emb = _emb(tmp_path / "emb")
    os.replace(emb / "meta.json", tmp_path / "meta.json")
    os.mkfifo(emb / "meta.json")
    with pytest.raises(MLCDError, match=r"meta.json: not a regular JSON file \(a FIFO\)"):
        _in_thread(lambda: store.open_emb(emb), [emb / "meta.json"])
    os.unlink(emb / "meta.json")
    os.replace(tmp_path / "meta.json", emb / "meta.json")
    os.unlink(emb / "part-000001.keys.npy")
    os.mkfifo(emb / "part-000001.keys.npy")
    with pytest.raises(MLCDError, match=r"part-000001.keys.npy: not a regular keys file \(a FIFO\)"):
        _in_thread(lambda: store.open_emb(emb), [emb / "part-000001.keys.npy"])


def _gz_idx(shape, body: bytes) -> bytes:
    head = struct.pack(">I", 0x0800 | len(shape)) + struct.pack(f">{len(shape)}I", *shape)
    return gzip.compress(head + body, compresslevel=1)


def test_idx_gzip_bomb_is_never_expanded(tmp_path, monkeypatch):
    """A header declaring more than the limit is refused before decompressing; a body longer
    than its header declares is read one byte past it, not whole."""
    from mlcd_train.data import shards

    declared = tmp_path / "bomb-images-idx3-ubyte.gz"
    declared.write_bytes(_gz_idx((1 << 20, 1 << 10, 1 << 10), b"\0" * 1000))  # says 1 TiB
    with pytest.raises(MLCDError, match=r"bomb-images-idx3-ubyte.gz: IDX header declares .* over the limit"):
        shards.read_idx(declared)
    liar = tmp_path / "liar-images-idx3-ubyte.gz"
    liar.write_bytes(_gz_idx((2, 2, 2), b"\0" * (64 << 20)))  # says 8 bytes, expands to 64 MB
    read = []
    real_read = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: read.append(n) or real_read(self, n))
    with pytest.raises(MLCDError, match=r"liar-images-idx3-ubyte.gz: truncated or oversized IDX file \(9\+ bytes"):
        shards.read_idx(liar)
    assert read == [4, 12, 9]  # magic, dimensions, then the declared 8 bytes + 1: never read(-1)
    # the real files still read
    from mlcd_train.data.sample import sample_paths

    assert shards.read_idx(sample_paths("test")[1]).shape == (1000,)


def test_sizes_json_counts_are_bounded_before_use(tmp_path, capsys):
    """A count in sizes.json sizes arrays and skips whole passes before a byte of the shard is
    read: one above 2**40, or above what the tar's size can hold (a sample takes at least one
    512-byte header), is refused naming sizes.json; every reader lists shards through it."""
    from mlcd_core.io import MAX_COUNT
    from mlcd_train.cli import run_stage
    from mlcd_train.data.reader import list_shards, read_sizes
    from tests.fixtures import make_random_shards

    sh = make_random_shards(tmp_path, n=8, size=8, num_classes=2, shard_size=4)
    sizes = json.loads((sh / "sizes.json").read_text())
    name = sorted(sizes)[0]
    room = (sh / name).stat().st_size // 512
    assert list_shards(sh) and read_sizes(list_shards(sh))[str(sh / name)] == 4  # the true counts pass
    for bad, match in ((room + 1, rf"count of '{name}' is {room + 1}, but .* room for at most {room} samples"),
                       (MAX_COUNT + 1, rf"count of '{name}' .* should be an integer in 0..{MAX_COUNT}")):
        (sh / "sizes.json").write_text(json.dumps({**sizes, name: bad}))
        for read in (lambda: list_shards(sh), lambda: read_sizes([str(sh / name)])):
            with pytest.raises(MLCDError, match=r"sizes.json: " + match):
                read()
        capsys.readouterr()
        assert run_stage("embed", ["--shards", str(sh), "--out", str(tmp_path / "e"), "--model", "pca"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sizes.json: count of" in err[0], err
    (sh / "sizes.json").write_text(json.dumps({**sizes, name: room}))  # at the bound: accepted
    assert read_sizes([str(sh / name)])[str(sh / name)] == room


def test_read_sizes_of_a_subset_checks_only_the_shards_asked_for(tmp_path):
    """A glob or list naming some shards of a folder reads when another shard that sizes.json
    lists is gone (the whole-folder form still refuses, naming the missing one)."""
    from mlcd_train.data.reader import list_shards, read_sizes
    from tests.fixtures import make_random_shards

    sh = make_random_shards(tmp_path, n=8, size=8, num_classes=2, shard_size=4)
    first, second = sorted(json.loads((sh / "sizes.json").read_text()))
    (sh / second).unlink()
    assert read_sizes([str(sh / first)]) == {str(sh / first): 4}
    with pytest.raises(MLCDError, match=rf"{second}: listed in .*sizes.json but missing"):
        list_shards(sh)
    with pytest.raises(MLCDError, match=rf"{second}: listed in .*sizes.json but missing"):
        read_sizes([str(sh / second)])


# ----------------------------------------------------------------------- 7. option ranges

BAD_OPTIONS = [
    ("assign", ["--emb", "E", "--centroids", "C", "--out", "O"], "--threshold", ["nan", "inf", "2"]),
    ("assign", ["--emb", "E", "--centroids", "C", "--out", "O"], "--topk", ["0"]),
    ("assign", ["--emb", "E", "--centroids", "C", "--out", "O"], "--threads", ["-1"]),
    ("assign", ["--emb", "E", "--centroids", "C", "--out", "O"], "--target-recall", ["0", "1.5"]),
    ("assign", ["--emb", "E", "--centroids", "C", "--out", "O"], "--nprobe", ["0"]),
    ("cluster", ["--emb", "E", "--k", "4", "--out", "O"], "--max-points-per-centroid", ["-1"]),
    ("cluster", ["--emb", "E", "--k", "4", "--out", "O"], "--threads", ["-2"]),
    ("cluster", ["--emb", "E", "--out", "O"], "--k", ["0", "x"]),
    ("cluster", ["--emb", "E", "--k", "4", "--out", "O"], "--niter", ["-1"]),
    ("embed", ["--shards", "S", "--out", "O", "--model", "pca"], "--batch-size", ["0"]),
    ("embed", ["--shards", "S", "--out", "O", "--model", "pca"], "--workers", ["-1"]),
    ("embed", ["--shards", "S", "--out", "O", "--model", "pca"], "--dim", ["0"]),
    ("shards", ["--input", "I", "--out", "O"], "--shard-size", ["0"]),
    ("shards", ["--input", "I", "--out", "O"], "--max-image-pixels", ["-5"]),
    ("probe", ["--embedder", "pca", "--train", "A", "--test", "B", "--out", "O"], "--knn-k", ["0"]),
    ("probe", ["--embedder", "pca", "--train", "A", "--test", "B", "--out", "O"], "--temperature", ["0", "nan"]),
    ("probe", ["--embedder", "pca", "--train", "A", "--test", "B", "--out", "O"], "--val-fraction", ["1", "0"]),
    ("probe", ["--embedder", "pca", "--train", "A", "--test", "B", "--out", "O"], "--max-iter", ["0"]),
    ("convert", ["--checkpoint_path", "X", "--pytorch_dump_folder_path", "O"], "--image_size", ["-1"]),
    ("convert", ["--checkpoint_path", "X", "--pytorch_dump_folder_path", "O"], "--num_heads", ["0"]),
    ("plan", ["--config", "C", "--gpus", "1"], "--gpu-memory", ["nan", "inf", "0"]),
    ("plan", ["--config", "C", "--gpus", "1"], "--headroom", ["nan", "-0.1"]),
    ("plan", ["--config", "C"], "--gpus", ["0", "x"]),
    ("plan", ["--config", "C", "--gpus", "1"], "--batch", ["0"]),
]


@pytest.mark.parametrize("stage,base,option,values", BAD_OPTIONS, ids=[f"{s}{o}" for s, _, o, _ in BAD_OPTIONS])
def test_numeric_options_out_of_range_are_refused_naming_the_option(stage, base, option, values, capsys):
    """Refused by the parser (exit 2, one error line naming the option) before anything is read."""
    import importlib

    from mlcd_train.cli import STAGES

    module = importlib.import_module(STAGES[stage][0])
    for value in values:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            module.main(base + [option, value])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"mlcd {stage}: error: argument {option}") and repr(value) in err[-1], err


def test_l2_grid_with_nan_is_refused(tmp_path):
    from mlcd_train import probe

    with pytest.raises(MLCDError, match="--l2-grid"):
        probe.main(["--embedder", "pca", "--train", "A", "--test", "B", "--out", str(tmp_path), "--l2-grid", "1,nan"])


def test_option_types():
    from mlcd_train.utils import args as A

    assert A.positive_int("3") == 3 and A.nonneg_int("0") == 0 and A.fraction_open("0.5") == 0.5
    assert A.fraction_left_open("1") == 1.0 and A.float_between(-1, 1)("-1") == -1.0
    for parse, bad in ((A.positive_int, "0"), (A.nonneg_int, "-1"), (A.finite_float, "nan"),
                       (A.positive_float, "-0.0"), (A.fraction_open, "1"), (A.fraction_left_open, "0"),
                       (A.float_between(-1, 1), "1.01"), (A.positive_int, "1.5")):
        with pytest.raises(Exception, match="must be"):
            parse(bad)


# ----------------------------------------------------------------------- 9. meta files, wrong types

_WRONG = {dict: [], list: {}, str: 7, int: "7", float: "x", bool: "yes", type(None): []}


def _mutations(obj: dict, nested=("counts",)):
    """(what, mutated copy): the top level as a list and a string, then each key (and each
    entry of the ``nested`` dicts) given a value of another JSON type."""
    yield "top level list", [obj]
    yield "top level string", "x"
    for key, value in obj.items():
        yield key, {**obj, key: _WRONG[type(value)]}
        if key in nested and isinstance(value, dict) and value:
            k0 = next(iter(value))
            yield f"{key}.{k0}", {**obj, key: {**value, k0: _WRONG[type(value[k0])]}}


def _fuzz(path: Path, run, capsys, keys=None):
    """Every mutation of the JSON file ``path``: ``run()`` returns 0, or 2 with an error line
    naming the file; never a traceback.  The file is restored afterwards."""
    original = path.read_text()
    obj = json.loads(original)
    tried = 0
    try:
        for what, bad in _mutations(obj):
            if keys is not None and what.split(".")[0] not in keys and not what.startswith("top"):
                continue
            path.write_text(json.dumps(bad))
            capsys.readouterr()
            rc = run()
            err = capsys.readouterr().err
            assert rc == 0 or (rc == 2 and f"{path.parent.name}/{path.name}" in err), (what, rc, err)
            tried += 1
    finally:
        path.write_text(original)
    return tried


def test_meta_files_with_wrong_types_name_the_file(tmp_path, capsys):
    from mlcd_train.cli import run_stage
    from mlcd_train.data import shards as shards_mod
    from tests.fixtures import make_random_shards

    emb = _emb(tmp_path / "emb")
    cl = _centroids(tmp_path, emb)
    n = iter(range(10 ** 6))

    def cluster():
        return run_stage("cluster", ["--emb", str(emb), "--k", "4", "--out", str(tmp_path / f"c{next(n)}"),
                                     "--threads", "1", "--niter", "1"])

    def assign_to(out):
        return lambda: run_stage("assign", ["--emb", str(emb), "--centroids", str(cl / "centroids.npy"),
                                            "--topk", "2", "--out", str(out), "--threads", "1", "--no-stats"])

    def fresh_assign():
        return assign_to(tmp_path / f"l{next(n)}")()

    # EMB/meta.json: read by cluster and assign (and the probe, through the same open_emb)
    assert _fuzz(emb / "meta.json", cluster, capsys) >= 10
    _fuzz(emb / "meta.json", fresh_assign, capsys)
    # CL/meta.json: read by assign beside the centres, and by a cluster rerun
    _fuzz(cl / "meta.json", fresh_assign, capsys)
    _fuzz(cl / "meta.json", lambda: run_stage("cluster", ["--emb", str(emb), "--k", "4", "--out", str(cl),
                                                          "--threads", "1", "--niter", "2"]), capsys)
    # LBL/meta.json: read by an assign rerun
    assert assign_to(tmp_path / "lbl")() == 0
    _fuzz(tmp_path / "lbl" / "meta.json", assign_to(tmp_path / "lbl"), capsys)

    # sizes.json of a shard folder (embed, probe, train: one reader) and classes.json (--classes)
    sh = make_random_shards(tmp_path, n=8, size=8, num_classes=2, shard_size=4)
    _fuzz(sh / "sizes.json", lambda: run_stage("embed", ["--shards", str(sh), "--out", str(tmp_path / "e"),
                                                         "--model", "pca:/nonexistent.npz"]), capsys)
    _fuzz(sh / "classes.json", lambda: run_stage("shards", ["--input", str(tmp_path / "random_shards_src"), "--out",
                                                            str(tmp_path / f"s{next(n)}"), "--classes",
                                                            str(sh / "classes.json")]), capsys)
    # EMB/meta.json on an embed rerun
    assert run_stage("embed", ["--shards", str(sh), "--out", str(tmp_path / "e2"), "--model", "pca", "--dim", "2",
                               "--image-size", "4", "--workers", "0"]) == 0
    _fuzz(tmp_path / "e2" / "meta.json",
          lambda: run_stage("embed", ["--shards", str(sh), "--out", str(tmp_path / "e2"), "--model", "pca",
                                      "--dim", "2", "--image-size", "4", "--workers", "0"]), capsys,
          keys=("embedder", "dim", "embedder_info", "counts", "complete"))

    # the shards progress file
    prog = tmp_path / "prog" / "progress.json"
    prog.parent.mkdir()
    prog.write_text(json.dumps({"signature": "s", "shards": [{"name": "shard-000000.tar", "count": 1,
                                                              "consumed": 1}], "skipped": []}))

    def read_progress():
        try:
            shards_mod._read_progress(prog, "shard")
        except MLCDError as exc:
            print(f"mlcd shards: error: {exc}", file=__import__("sys").stderr)
            return 2
        return 0

    _fuzz(prog, read_progress, capsys)
    # a checkpoint's meta.json: tests/test_fuzz_meta.py::test_checkpoint_meta_fuzz


def test_cls_member_out_of_int32_is_a_corrupt_sample():
    """A shard's KEY.cls is stored as int32 (EMB cls files) and batched as int64: a class id
    outside 0..2**31-1 makes the sample corrupt (skipped and counted), not an overflow later."""
    import io as _io

    from PIL import Image

    from mlcd_core.reader import MAX_CLS, CorruptSample, decode_record

    buf = _io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    png = buf.getvalue()
    assert decode_record({"png": png, "cls": str(MAX_CLS).encode()})[1] == MAX_CLS
    for bad in (b"99999999999999999999", str(MAX_CLS + 1).encode(), b"-3"):
        with pytest.raises(CorruptSample, match="bad cls"):
            decode_record({"png": png, "cls": bad})


def test_config_file_not_utf8_or_nested_too_deeply_is_one_line(tmp_path, capsys):
    from mlcd_train.cli import run_stage

    for name, body, why in (("bytes.yaml", b"train:\n  steps: \xff\n", "not UTF-8"),
                            ("deep.yaml", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply")):
        (tmp_path / name).write_bytes(body)
        capsys.readouterr()
        rc = run_stage("train", ["--config", str(tmp_path / name), f"output_dir={tmp_path / 'o'}", "--print-config"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"{name}: not valid YAML ({why}" in err[0], err


def test_trainer_state_saved_alone_loads_without_unpickling(tmp_path):
    from mlcd_train.trainer import checkpoint as ck

    ck.save_trainer_state(tmp_path, {"step": 3, "world_size": 1, "rng": [ck.rng_state()], "positions": [{0: 5}]})
    st = ck.load(tmp_path, "trainer_state.pt")
    assert st["step"] == 3 and st["positions"] == [{0: 5}]
    ck.set_rng_state(st["rng"][0])
    ck.save_trainer_state(tmp_path, {"step": 3, "world_size": 2, "rng": [ck.rng_state()]})
    with pytest.raises(MLCDError, match="trainer_state.pt: key 'rng' should hold one dict per rank"):
        ck.load(tmp_path, "trainer_state.pt")


@pytest.mark.parametrize("body", ['{"linear": {"top1": 0.8}}', '{"linear": {"top1": "0.8"}, "knn": {"top1": 0.7}}',
                                  '{"linear": {"top1": 1e9}, "knn": {"top1": 0.7}}', '[1, 2]',
                                  '{"linear": {"top1": true}, "knn": {"top1": 0.7}}'])
def test_a_finished_probe_result_with_wrong_fields_is_one_line(tmp_path, body):
    """The pipeline and the demo read back their finished probe-*.json to skip the stage: a
    hand-edited or foreign file was a KeyError/TypeError traceback."""
    from mlcd_train.pipeline import _probe_figure, read_probe_result

    js = tmp_path / "probe-student.json"
    js.write_text(body)
    for fn in (read_probe_result, _probe_figure):
        with pytest.raises(MLCDError, match=r"probe-student\.json: '(linear|knn)\.top1' is not an accuracy"):
            fn(js)
    js.write_text('{"linear": {"top1": 0.81}, "knn": {"top1": 0.7}}')
    assert _probe_figure(js) == "linear 81.0%, 20-NN 70.0%"


def test_reading_a_run_metrics_log_that_is_a_fifo_is_refused(tmp_path):
    """read_metrics (loss curve, pipeline summary) opened OUT/metrics.jsonl plainly: a FIFO hung."""
    import os

    from mlcd_train.pipeline import read_metrics

    p = tmp_path / "metrics.jsonl"
    os.mkfifo(p)
    with pytest.raises(MLCDError, match=r"metrics\.jsonl.*(FIFO|regular)"):
        read_metrics(p)
