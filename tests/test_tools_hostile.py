"""Issue 15, tools/ and bench/: bad options and bad files read back are one line (exit 2)
naming the option or file, checked before anything runs or is written."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mlcd_core.errors import MLCDError

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    tools = str(ROOT / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    return __import__(name)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv,where", [
    (["--seeds", "0,x"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--l-list", "0,8"], "--l-list"),
    (["--k-list", "1,100"], "--k-list"),
    (["--model-overrides", "[1, 2]"], "--model-overrides"),
    (["--model-overrides", "{a: [1"], "--model-overrides"),
])
def test_reproduce_refuses_bad_lists_and_yaml_before_any_work(tmp_path, capsys, argv, where):
    R = _tool("reproduce_fashion_mnist")
    work = tmp_path / "work"
    assert R.main(["--work", str(work), *argv]) == 2
    assert where in _one_error_line(capsys)
    assert not work.exists()


@pytest.mark.parametrize("flag,value", [("--jobs", "0"), ("--threads", "-2"), ("--steps", "0"),
                                        ("--k-main", "1"), ("--workers", "-1"), ("--device", "tpu")])
def test_reproduce_numeric_options_have_ranges(tmp_path, capsys, flag, value):
    R = _tool("reproduce_fashion_mnist")
    with pytest.raises(SystemExit) as e:
        R.main(["--work", str(tmp_path / "w"), flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_reproduce_never_writes_among_the_idx_files_it_reads(tmp_path, capsys):
    R = _tool("reproduce_fashion_mnist")
    idx = tmp_path / "idx"
    idx.mkdir()
    assert R.main(["--work", str(idx / "work"), "--idx-dir", str(idx)]) == 2
    assert "--work" in _one_error_line(capsys)
    assert sorted(idx.iterdir()) == []
    assert R.main(["--work", str(tmp_path / "w"), "--idx-dir", str(tmp_path / "nothing")]) == 2
    assert "--idx-dir" in _one_error_line(capsys)


def test_a_result_read_back_on_resume_is_checked(tmp_path):
    R = _tool("reproduce_fashion_mnist")
    row, budget = {"name": "mlcd_k10", "l": 8}, {"steps": 5}
    good = {**row, "seed": 0, "budget": budget, "linear_top1": 0.8, "knn_top1": 0.7}
    p = tmp_path / "result.json"
    p.write_text(json.dumps(good))
    assert R.load_result(str(p), row, 0, budget)["linear_top1"] == 0.8
    for bad, word in (({"linear_top1": 80.0}, "linear_top1"), ({"knn_top1": "0.7"}, "knn_top1"),
                      ({"linear_top1": True}, "linear_top1"), ({"l": 4}, "'l'"), ({"l": 8.0}, "'l'"),
                      ({"seed": 1}, "'seed'"), ({"budget": {"steps": 6}}, "made with")):
        p.write_text(json.dumps({**good, **bad}))
        with pytest.raises(MLCDError, match=word):
            R.load_result(str(p), row, 0, budget)
    p.write_text("[1, 2]")
    with pytest.raises(MLCDError, match="result.json"):
        R.load_result(str(p), row, 0, budget)


def test_complete_flag_must_be_a_boolean(tmp_path):
    R = _tool("reproduce_fashion_mnist")
    assert R._complete(str(tmp_path)) is False
    (tmp_path / "meta.json").write_text(json.dumps({"complete": "yes"}))
    with pytest.raises(MLCDError, match="key 'complete'"):
        R._complete(str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"complete": True}))
    assert R._complete(str(tmp_path)) is True


def test_make_sample_refuses_to_write_over_the_set_it_reads(tmp_path, capsys, monkeypatch):
    M = _tool("make_sample")
    full = tmp_path / "full"
    full.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (full / name).write_bytes(b"original")
    real = M.S.fashion_mnist_full_paths
    monkeypatch.setattr(M.S, "fashion_mnist_full_paths", lambda split: real(split, root=full))
    assert M.main(["--out", str(full)]) == 2
    assert "--out" in _one_error_line(capsys)
    assert all(p.read_bytes() == b"original" for p in full.iterdir())
    with pytest.raises(SystemExit) as e:
        M.main(["--out", str(tmp_path / "o"), "--train-per-class", "0"])
    assert e.value.code == 2


def test_bench_options_are_range_checked(tmp_path, capsys):
    from bench import run_all
    from bench.bench_assign import main as bench_assign

    with pytest.raises(SystemExit) as e:
        bench_assign(["--repeats", "0"])
    assert e.value.code == 2 and "--repeats" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_all.main(["--only", "nosuch"])
    assert e.value.code == 2 and "nosuch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run_all.main(["--only", "assign", "--json", str(tmp_path)])
    assert e.value.code == 2 and "--json" in capsys.readouterr().err


@pytest.mark.parametrize("argv,where", [
    (["--seeds", "0,0"], "--seeds"),
    (["--seeds", str(2 ** 31)], "--seeds"),
    (["--l-list", "4,4"], "--l-list"),
    (["--probe-train-shards", "3"], "--probe-train-shards"),
])
def test_reproduce_refuses_duplicates_huge_seeds_and_odd_probe_shards(tmp_path, capsys, argv, where):
    R = _tool("reproduce_fashion_mnist")
    assert R.main(["--work", str(tmp_path / "w"), *argv]) == 2
    assert where in _one_error_line(capsys)
    assert not (tmp_path / "w").exists()


def test_reproduce_paths_and_rows_are_checked_before_any_work(tmp_path, capsys):
    R = _tool("reproduce_fashion_mnist")
    f = tmp_path / "file"
    f.write_text("x")
    assert R.main(["--work", str(f)]) == 2
    assert "--work" in _one_error_line(capsys) and f.read_text() == "x"
    assert R.main(["--work", str(f / "sub")]) == 2  # a file in the way: one line, no traceback
    _one_error_line(capsys)
    work = tmp_path / "w"
    (work / "idx").mkdir(parents=True)
    assert R.main(["--work", str(work), "--idx-dir", str(work / "idx")]) == 2
    assert "--idx-dir" in _one_error_line(capsys)
    assert R.main(["--work", str(tmp_path / "w2"), "--rows", "nosuch"]) == 2
    assert "nosuch" in _one_error_line(capsys)
    assert not (tmp_path / "w2" / "shards").exists()  # refused before the shards were made
    with pytest.raises(SystemExit) as e:
        R.main(["--work", str(tmp_path / "w3"), "--seed", "3000000000"])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_make_sample_with_a_file_in_the_way_is_one_line(tmp_path, capsys, monkeypatch):
    M = _tool("make_sample")
    full = tmp_path / "full"
    full.mkdir()
    monkeypatch.setattr(M.S, "fashion_mnist_full_paths", lambda split: (full / "i", full / "l"))
    monkeypatch.setattr(M, "read_idx", lambda p: __import__("numpy").zeros((20, 2, 2) if p.name == "i" else (20,),
                                                                           "uint8"))
    monkeypatch.setattr(M, "balanced_subset", lambda labels, per, seed, src: [0, 1])
    f = tmp_path / "file"
    f.write_text("x")
    assert M.main(["--out", str(f / "sub")]) == 2
    assert str(f) in _one_error_line(capsys)


@pytest.mark.parametrize("argv", [["--world", "0"], ["--repeats", "0"], ["--device", "tpu"], ["--classes", "-5"]])
def test_bench_partial_fc_options_are_range_checked(capsys, argv):
    from bench.bench_partial_fc import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and argv[0] in capsys.readouterr().err


def test_bench_trainer_steps_and_cluster_seed_are_range_checked(capsys):
    from bench.bench_trainer import main
    from clustering.kmeans import main as cluster_main

    with pytest.raises(SystemExit) as e:
        main(["--parallel", "fsdp", "--steps", "5"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cluster_main(["--emb", "x", "--k", "2", "--out", "y", "--seed", str(2 ** 31)])
    assert e.value.code == 2 and "--seed" in capsys.readouterr().err


def test_reproduce_prepares_only_the_clusterings_its_rows_use_and_round2_needs_its_teacher(tmp_path, capsys):
    R = _tool("reproduce_fashion_mnist")
    a = R.settings(R.build_parser().parse_args(["--work", str(tmp_path / "w"), "--rows", "best_round2"]))
    with pytest.raises(MLCDError, match="best_round2 needs best in the same --rows"):
        R.Repro(a).rows()
    a = R.settings(R.build_parser().parse_args(["--work", str(tmp_path / "w"), "--rows", "unicom_k100,best"]))
    rep = R.Repro(a)
    assert rep.needed_ks(rep.rows()) == [100, 1000]
    a = R.settings(R.build_parser().parse_args(["--work", str(tmp_path / "w"), "--rows", "teacher"]))
    rep = R.Repro(a)
    assert rep.needed_ks(rep.rows()) == []


def test_reproduce_sample_rate_rows_train_what_their_names_say(tmp_path):
    # r = 1.0 for both losses at the main k and at --k-rate; each row's trainer command carries
    # its own loss, l, rate and labels (the pair differs only in the loss and l)
    R = _tool("reproduce_fashion_mnist")
    a = R.settings(R.build_parser().parse_args(["--work", str(tmp_path / "w"), "--k-rate", "5000", "--rows",
                                                "mlcd_k1000_l8_r1.0,unicom_k1000_r1.0,unicom_k5000_r1.0"]))
    rep = R.Repro(a)
    cmds = {r["row"]: rep.train_cmd(r, 0) for r in rep.rows()}
    labels = str(tmp_path / "w" / "labels_k1000")
    assert {"loss.name=mlcd", "loss.l=8", "loss.sample_rate=1.0", f"data.labels={labels}"} <= set(
        cmds["mlcd_k1000_l8_r1.0"])
    assert {"loss.name=unicom", "loss.l=1", "loss.sample_rate=1.0", f"data.labels={labels}"} <= set(
        cmds["unicom_k1000_r1.0"])
    assert f"data.labels={tmp_path / 'w' / 'labels_k5000'}" in cmds["unicom_k5000_r1.0"]
    assert rep.needed_ks(rep.rows()) == [1000, 5000]
    pair = [set(cmds[r]) - {"loss.name=mlcd", "loss.name=unicom", "loss.l=8", "loss.l=1"}
            for r in ("mlcd_k1000_l8_r1.0", "unicom_k1000_r1.0")]
    assert pair[0] == {c.replace("unicom_k1000_r1.0", "mlcd_k1000_l8_r1.0") for c in pair[1]}  # output_dir aside


def test_reproduce_cpu_bf16_reaches_every_training_and_set_can_override_it(tmp_path, monkeypatch):
    R = _tool("reproduce_fashion_mnist")
    import mlcd_train.train as T

    def cmd(*argv):
        a = R.settings(R.build_parser().parse_args(["--work", str(tmp_path / "w"), *argv]))
        rep = R.Repro(a)
        return {r["row"]: rep.train_cmd(r, 0) for r in rep.rows() if r["kind"] == "train"}

    on = cmd("--cpu-bf16", "on")
    assert on and all({"train.precision=bf16", "train.cpu_autocast=true", "train.channels_last=true"} <= set(c)
                      for c in on.values())
    assert not any("train.cpu_autocast=true" in c for c in cmd("--cpu-bf16", "off").values())
    for native, expect in ((True, True), (False, False)):  # auto follows the CPU
        monkeypatch.setattr(T, "cpu_has_fast_bf16", lambda native=native: native)
        assert all(("train.cpu_autocast=true" in c) == expect for c in cmd().values())
    assert not any("train.cpu_autocast=true" in c for c in cmd("--device", "cuda").values())
    for own in (["--set", "train.precision=fp32"], ["--best-set", "train.cpu_autocast=false"]):
        runs = cmd("--cpu-bf16", "on", *own)  # the user's precision is not contradicted in any row
        assert not any("train.cpu_autocast=true" in c or "train.precision=bf16" in c for c in runs.values())
        assert all("train.channels_last=true" in c for c in runs.values())


def test_reproduce_probe_command_carries_every_probe_setting(tmp_path):
    # the probe runs as `python -m mlcd_train.probe` (side by side under --jobs 2): its flags must
    # parse back into exactly the settings the run records
    R = _tool("reproduce_fashion_mnist")
    from mlcd_train import probe as P

    for device in ("cpu", "auto"):
        a = R.settings(R.build_parser().parse_args(["--work", str(tmp_path / "w"), "--device", device]))
        rep = R.Repro(a)
        pkw = rep.probe_kwargs(str(tmp_path / "w" / "out"))
        cmd = rep.probe_cmd("mlcd:/x/student.pt", pkw)
        assert cmd[1:3] == ["-m", "mlcd_train.probe"]
        got = vars(P.build_parser().parse_args(cmd[3:]))
        assert got["embedder"] == "mlcd:/x/student.pt"
        assert {k: got[k] for k in pkw} == pkw


@pytest.mark.parametrize("written", ['{"linear": 1}', '[1, 2]', '{"linear": {"top1": 0.5}}'])
def test_reproduce_refuses_a_probe_result_that_is_not_one(tmp_path, monkeypatch, capsys, written):
    R = _tool("reproduce_fashion_mnist")
    a = R.settings(R.build_parser().parse_args(["--work", str(tmp_path / "w"), "--rows", "teacher"]))
    rep = R.Repro(a)

    def fake_probe(argv, log_path, threads):  # the probe subprocess, leaving a hostile probe.json
        out = Path(argv[argv.index("--json") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(written)

    monkeypatch.setattr(rep, "_sub", fake_probe)
    with pytest.raises(MLCDError, match=r"probe\.json"):
        rep.run_one(rep.rows()[0], 0, 1)
    assert not (tmp_path / "w" / "runs" / "teacher" / "seed0" / "result.json").exists()
