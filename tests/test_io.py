"""Crash safety of the write helpers and of checkpoint pruning."""
from __future__ import annotations

import shutil

from mlcd_train.trainer import checkpoint as ck
from mlcd_train.utils.io import remove_stale_tmp


def test_remove_stale_tmp_removes_files_and_folders(tmp_path):
    (tmp_path / ".a.npy.123.tmp").write_bytes(b"x")
    (tmp_path / ".hf.456.tmp").mkdir()  # convert writes a temporary folder
    (tmp_path / ".hf.456.tmp" / "config.json").write_text("{}")
    (tmp_path / "kept.npy").write_bytes(b"y")
    assert remove_stale_tmp(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["kept.npy"]


def test_prune_killed_mid_delete_leaves_no_folder_marked_complete(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        d = ck.step_dir(tmp_path, step)
        d.mkdir()
        (d / "model.pt").write_bytes(b"m")
        ck.write_meta(d, {"step": step})

    def killed_after_model(path, ignore_errors=False):
        (path / "model.pt").unlink()  # rmtree got as far as model.pt
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_after_model)
    try:
        ck.prune(tmp_path, keep_last=2)
    except KeyboardInterrupt:
        pass
    # step 1 lost its model: it must not count as a complete checkpoint any more
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]
