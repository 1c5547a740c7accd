"""The shard reader: never unpickles, skips corrupt samples, splits exactly, resampled mode, exact resume."""
import hashlib
import io
import itertools
import json
import pickle

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from mlcd_train.data import reader
from mlcd_train.data.reader import ShardDataset, collate_samples, list_shards, read_sizes, shard_name
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import run_distributed


def _png(value: int, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, (value * 7) % 256, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, samples):
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as w:
        for s in samples:
            w.write(s)


def _make_shards(folder, counts):
    """Shards shard-00000i.tar with counts[i] samples; key k<i>_<j>, cls = running number."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes, n = {}, 0
    for i, c in enumerate(counts):
        name = f"shard-{i:06d}.tar"
        _write_tar(folder / name, [{"__key__": f"k{i}_{j:03d}", "png": _png(n + j), "cls": str(n + j).encode()}
                                   for j in range(c)])
        sizes[name], n = c, n + c
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return folder


def _to_tensor(im):
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def _keys(loader_or_ds):
    out = []
    for item in loader_or_ds:
        out.extend(item["key"] if isinstance(item, dict) else [item.key])
    return out


class _MakesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling calls open(path, "w"): creates the file
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_MakesFile(str(marker)))
    _write_tar(tmp_path / "evil.tar", [
        {"__key__": "a", "png": _png(1), "pyd": payload, "cls": b"1"},
        {"__key__": "b", "pickle": payload},
        {"__key__": "c", "png": _png(2), "pickle": payload},
    ])
    ds = ShardDataset(tmp_path / "evil.tar")
    got = list(ds)
    assert [s.key for s in got] == ["a", "c"] and [s.index for s in got] == [0, 2]
    assert ds.stats["corrupt"] == 1 and ds.stats["reasons"]["no image member"] == 1
    assert not marker.exists()
    # the payload is live: unpickling it does create the file, so the check above can fail
    pickle.loads(payload).close()
    assert marker.exists()


def test_corrupt_samples_are_skipped_counted_and_bounded(tmp_path):
    good = _png(9)
    samples = [{"__key__": f"s{i:02d}", "png": _png(i), "cls": b"0"} for i in range(10)]
    samples[2]["png"] = good[: len(good) // 2]  # truncated image
    samples[5]["cls"] = b"cat"  # bad class
    samples[7] = {"__key__": "s07", "txt": b"no image here"}
    _write_tar(tmp_path / "x.tar", samples)
    ds = ShardDataset(tmp_path / "x.tar")
    got = list(ds)
    assert [s.index for s in got] == [0, 1, 3, 4, 6, 8, 9]
    assert [s.key for s in got] == [f"s{i:02d}" for i in (0, 1, 3, 4, 6, 8, 9)]
    assert ds.stats["corrupt"] == 3 and ds.stats["records"] == 10 and ds.stats["samples"] == 7
    with pytest.raises(MLCDError, match=r"x.tar: 2 of 6 samples"):
        list(ShardDataset(tmp_path / "x.tar", max_corrupt_fraction=0.2, min_records_for_check=5))
    assert len(list(ShardDataset(tmp_path / "x.tar", max_corrupt_fraction=0.5, min_records_for_check=5))) == 7

    # a truncated tar: the samples before the cut are read, the shard is counted
    data = (tmp_path / "x.tar").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "y.tar").write_bytes(data[: len(data) // 2 + 100])
    ds = ShardDataset(tmp_path / "cut" / "y.tar")
    got = list(ds)
    assert 0 < len(got) < 7 and ds.stats["corrupt_shards"] == 1


def test_list_shards_forms(tmp_path):
    folder = _make_shards(tmp_path / "d", [2, 2, 1])
    paths = [str((folder / f"shard-{i:06d}.tar").resolve()) for i in range(3)]
    assert list_shards(folder) == paths
    assert list_shards(str(folder / "shard-{000000..000002}.tar")) == paths
    assert list_shards(str(folder / "shard-*.tar")) == paths
    assert list_shards([paths[2], paths[0]]) == [paths[0], paths[2]]
    assert [shard_name(p) for p in paths] == ["shard-000000", "shard-000001", "shard-000002"]
    assert read_sizes(paths) == dict(zip(paths, [2, 2, 1]))
    (folder / "sizes.json").unlink()
    assert read_sizes(paths) == dict(zip(paths, [2, 2, 1]))  # counted from the tar headers
    with pytest.raises(MLCDError, match="nope"):
        list_shards(tmp_path / "nope")


def test_two_ranks_two_workers_read_every_sample_exactly_once(tmp_path):
    folder = _make_shards(tmp_path / "d", [5, 3, 7, 1, 4])
    keys = []
    for rank in range(2):
        ds = ShardDataset(folder, transform=_to_tensor, rank=rank, world_size=2)
        keys += _keys(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_samples))
    assert sorted(keys) == sorted(f"k{i}_{j:03d}" for i, c in enumerate([5, 3, 7, 1, 4]) for j in range(c))


def _gloo_reader(rank, world_size, folder):
    import torch.distributed as dist

    ds = ShardDataset(folder, transform=_to_tensor)  # rank and world size from torch.distributed
    # ranks are spawned processes, whose DataLoader workers would be spawned too (slow): fork them
    keys = _keys(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_samples,
                            multiprocessing_context="fork"))
    rs = ShardDataset(folder, transform=_to_tensor, resampled=True, samples_per_rank=13, seed=4)
    batches = list(DataLoader(rs, batch_size=4, num_workers=2, collate_fn=collate_samples,
                              multiprocessing_context="fork"))
    everyone = [None] * world_size
    dist.all_gather_object(everyone, keys)
    return {"all_keys": everyone, "n_batches": len(batches), "n_samples": sum(len(b["key"]) for b in batches)}


@pytest.mark.slow
def test_gloo_ranks_split_exactly_and_resampled_counts_are_equal(tmp_path):
    counts = [5, 3, 7, 1, 4]
    folder = _make_shards(tmp_path / "d", counts)
    res = run_distributed(_gloo_reader, 2, (str(folder),))
    rank0, rank1 = res[0]["all_keys"]
    assert not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(f"k{i}_{j:03d}" for i, c in enumerate(counts) for j in range(c))
    assert [r["n_samples"] for r in res] == [13, 13]
    assert res[0]["n_batches"] == res[1]["n_batches"]


def test_resampled_mode_equal_counts_seeded_and_deterministic(tmp_path):
    folder = _make_shards(tmp_path / "d", [9, 2, 5])
    streams = {}
    for rank in range(3):
        ds = ShardDataset(folder, transform=_to_tensor, rank=rank, world_size=3, resampled=True,
                          samples_per_rank=11, seed=1, shuffle_buffer=4)
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_samples)
        streams[rank] = _keys(loader)
        assert len(streams[rank]) == 11
        assert _keys(loader) == streams[rank]  # same seed -> same stream
    assert len({tuple(s) for s in streams.values()}) == 3  # ranks read different data
    ds = ShardDataset(folder, rank=0, world_size=3, resampled=True, samples_per_rank=11, seed=2, shuffle_buffer=4)
    assert _keys(ds) != _keys(ShardDataset(folder, rank=0, world_size=3, resampled=True, samples_per_rank=11,
                                           seed=1, shuffle_buffer=4))


@pytest.mark.parametrize("world,nw", [(1, 2), (2, 2), (3, 2)])
def test_resampled_pass_reads_each_sample_once_over_all_slots(tmp_path, world, nw):
    """3 shards: dealt whole to 2 slots, sample by sample to 4 and 6 slots."""
    folder = _make_shards(tmp_path / "d", [9, 2, 5])
    for seed in range(2):
        dealt = []
        for rank in range(world):
            ds = ShardDataset(folder, rank=rank, world_size=world, resampled=True, seed=seed)
            for w in range(nw):
                n = sum(ds._count(e) for e in ds._pass_plan(0, w, nw))
                recs = list(itertools.islice(ds._records(w, nw, 0), n))
                assert n > 0
                dealt += [r[2] for r in recs]
        assert sorted(dealt) == sorted(f"k{i}_{j:03d}" for i, c in enumerate([9, 2, 5]) for j in range(c))


def _hash_stream(folder):
    ds = ShardDataset(folder, transform=_to_tensor, resampled=True, samples_per_rank=40, seed=3, shuffle_buffer=8)
    h = hashlib.sha256()
    for b in DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate_samples):
        h.update(b["image"].numpy().tobytes())
        h.update(" ".join(b["key"]).encode())
    return h.hexdigest()


def test_two_runs_hash_identical(tmp_path):
    folder = _make_shards(tmp_path / "d", [9, 2, 5])
    assert _hash_stream(folder) == _hash_stream(folder)


@pytest.mark.parametrize("resampled,consumed,counts", [(True, 0, [9, 2, 5, 6]), (True, 3, [9, 2, 5, 6]),
                                                        (True, 8, [9, 2, 5, 6]), (True, 7, [9, 2, 5]),
                                                        (False, 3, [9, 2, 5, 6])])
def test_resume_equals_tail_of_uninterrupted_stream(tmp_path, resampled, consumed, counts):
    """4 shards for 2 ranks x 2 workers: dealt whole; 3 shards: dealt sample by sample."""
    folder = _make_shards(tmp_path / "d", counts)
    B, total = 3, 14

    def make():
        kw = dict(resampled=True, seed=5, shuffle_buffer=4) if resampled else dict(shuffle_buffer=4)
        return ShardDataset(folder, transform=_to_tensor, rank=0 if not resampled else 1, world_size=2, **kw)

    def batches(ds, n):
        loader = DataLoader(ds, batch_size=B, num_workers=2, collate_fn=collate_samples)
        return [b["key"] for b in itertools.islice(iter(loader), n)]

    full = batches(make(), total)
    ds = make()
    ds.set_resume(consumed, B)
    tail = batches(ds, total - consumed)
    assert tail == full[consumed:]
    assert len(tail) > 0


def test_resume_skips_without_decoding(tmp_path, monkeypatch):
    folder = _make_shards(tmp_path / "d", [9, 2, 5, 6])
    calls = []
    real = reader.decode_record
    monkeypatch.setattr(reader, "decode_record", lambda m: (calls.append(1), real(m))[1])
    ds = ShardDataset(folder, resampled=True, seed=5, shuffle_buffer=4)
    first = [s.key for s in itertools.islice(iter(ds), 50)]
    calls.clear()
    ds.set_resume(12, 4)  # 48 samples: two whole passes (44) and 4 more, all skipped unread
    assert [s.key for s in itertools.islice(iter(ds), 2)] == first[48:50]
    assert len(calls) == 2


def test_resampled_stream_of_unreadable_shards_raises_instead_of_spinning(tmp_path):
    """sizes.json lists records but no shard can be read: an endless stream would pass over
    them forever (a hung worker); a whole pass without one record is an error naming them."""
    _make_shards(tmp_path, [3, 4])
    for t in tmp_path.glob("*.tar"):
        t.write_bytes(b"\x01" * 4096)
    with pytest.raises(MLCDError, match=r"no record could be read in a whole pass .*shard-000000, shard-000001"):
        next(iter(ShardDataset(tmp_path, resampled=True, max_corrupt_fraction=0.01)))


def test_sample_of_a_shard_cut_after_its_last_member_is_counted_corrupt(tmp_path):
    import tarfile

    _make_shards(tmp_path, [5])
    tar = tmp_path / "shard-000000.tar"
    with tarfile.open(tar) as tf:
        last = tf.getmembers()[-1]
    tar.write_bytes(tar.read_bytes()[: last.offset_data + (last.size + 511) // 512 * 512])  # no end blocks
    ds = ShardDataset(tmp_path)
    keys = [s.key for s in ds]
    assert keys == [f"k0_{j:03d}" for j in range(4)]
    assert (ds.stats["records"], ds.stats["samples"], ds.stats["corrupt"]) == (5, 4, 1)


@pytest.mark.parametrize("consumed", [1, 2, 3, 4])
def test_resume_of_finite_stream_whose_workers_run_out_unevenly(tmp_path, consumed):
    """Worker 0 holds 1 batch, worker 1 holds 3: after batch 2 the DataLoader takes every batch
    from worker 1, so "batch b is worker b % nw's" no longer holds; the resume replays the
    deal instead (here a batch was duplicated before)."""
    _make_shards(tmp_path, [4, 12])

    def keys(ds):
        return [b["key"] for b in DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_samples)]

    full = keys(ShardDataset(tmp_path))
    assert len(full) == 4
    ds = ShardDataset(tmp_path)
    ds.set_resume(consumed, 4)
    assert keys(ds) == full[consumed:]
