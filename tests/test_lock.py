"""Issue 15, class 4: one run per output folder (mlcd_train/utils/lock.py)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mlcd_train.utils.errors import MLCDError
from mlcd_train.utils.lock import LOCK_NAME, LockHeld, lock_path, output_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = textwrap.dedent("""
    import sys, time
    from mlcd_train.utils.lock import output_lock
    with output_lock(sys.argv[1], "hold") as lock:
        print("owner" if lock.owner else "joined", flush=True)
        sys.stdin.readline()  # hold until the test says so
""")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLCD_RUN_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def hold(folder, **env):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=clean_env(**env))
    return p, p.stdout.readline().strip()


def finish(p):
    out, err = p.communicate("\n", timeout=30)
    return p.returncode, err


@pytest.fixture(autouse=True)
def _no_inherited_key(monkeypatch):
    for k in ("MLCD_RUN_KEY", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"pid": 1, "host": socket.gethostname(), "argv": ["mlcd", "train", "output_dir=x"], "run": "proc:old",
            "started_unix": time.time() - 3600}
    base.update(holder)
    (folder / LOCK_NAME).write_text(json.dumps(base))


def test_second_run_is_refused_by_name_and_lock_released(tmp_path):
    out = tmp_path / "out"
    p, state = hold(out)
    assert state == "owner"
    holder = json.loads((out / LOCK_NAME).read_text())
    assert holder["pid"] == p.pid and holder["host"] == socket.gethostname() and "started" in holder
    with pytest.raises(LockHeld) as e:
        with output_lock(out, "test"):
            pass
    msg = str(e.value)
    assert f"pid {p.pid} on host {socket.gethostname()}" in msg and "mlcd hold: `-c " in msg and "since" in msg
    assert "\n" not in msg
    assert (out / LOCK_NAME).exists()  # the refused run leaves the holder's lock alone
    rc, err = finish(p)
    assert rc == 0, err
    assert not (out / LOCK_NAME).exists()  # released on normal exit
    with output_lock(out, "test") as lock:  # free again
        assert lock.owner


def test_concurrent_starts_give_exactly_one_owner(tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=clean_env()) for _ in range(4)]
    states = [p.stdout.readline().strip() for p in procs]  # the refused ones exit without a line
    results = [finish(p) for p in procs]
    assert states.count("owner") == 1, (states, results)
    refused = [err for rc, err in results if rc != 0]
    assert len(refused) == 3 and all("LockHeld" in err and "another run writes here" in err for err in refused)


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    pid = dead_pid()
    write_lock(out, pid=pid)
    with output_lock(out, "test") as lock:
        assert lock.owner
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"stale lock of pid {pid}" in err and "no longer running" in err
    assert not (out / LOCK_NAME).exists()


def test_reused_pid_is_not_the_holder(tmp_path):
    out = tmp_path / "out"
    write_lock(out, pid=os.getpid(), pid_start=1)  # our pid is alive, but it started at another time
    with output_lock(out, "test") as lock:
        assert lock.owner


def test_live_pid_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, pid=sleeper.pid)  # no flock (written by hand): the live pid alone keeps it
        with pytest.raises(LockHeld, match=f"pid {sleeper.pid}"):
            with output_lock(out, "test"):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with output_lock(out, "test") as lock:  # now dead: taken over
        assert lock.owner


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "out"
    write_lock(out, pid=dead_pid(), host="some-other-node")
    before = (out / LOCK_NAME).read_text()
    with pytest.raises(LockHeld) as e:
        with output_lock(out, "test"):
            pass
    msg = str(e.value)
    assert "some-other-node" in msg and "another host" in msg and f"delete {out / LOCK_NAME}" in msg
    assert (out / LOCK_NAME).read_text() == before


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"\xff\xfe", b"{not json"])
def test_unreadable_lock_file_is_refused_by_name(tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(content)
    with pytest.raises(LockHeld, match=f"{LOCK_NAME}.*delete it"):
        with output_lock(out, "test"):
            pass


def test_lock_released_when_the_block_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MLCDError, match="stage failed"):
        with output_lock(out, "test"):
            assert (out / LOCK_NAME).exists()
            raise MLCDError("stage failed")
    assert not (out / LOCK_NAME).exists()
    with output_lock(out, "test") as lock:
        assert lock.owner


def test_output_that_is_a_file_and_unwritable_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MLCDError, match="not a folder"):
        with output_lock(f, "test"):
            pass
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(MLCDError, match="cannot write the lock file"):
            with output_lock(ro, "test"):
                pass
    finally:
        os.chmod(ro, 0o755)


def test_beside_lock_for_files_and_replaced_folders(tmp_path):
    target = tmp_path / "x.pt"
    assert lock_path(target, beside=True) == tmp_path / f".x.pt{LOCK_NAME}"
    with output_lock(target, "export", beside=True):
        assert (tmp_path / f".x.pt{LOCK_NAME}").exists() and not target.exists()
        r = subprocess.run([sys.executable, "-c", "from mlcd_train.utils.lock import output_lock\n"
                            f"with output_lock({str(target)!r}, 'export', beside=True): pass"],
                           env=clean_env(), capture_output=True, text=True)
        assert r.returncode != 0 and "LockHeld" in r.stderr and f"pid {os.getpid()}" in r.stderr
    assert not (tmp_path / f".x.pt{LOCK_NAME}").exists()


def test_same_run_shares_the_lock_children_join(tmp_path):
    """A process holding a lock (a pipeline) runs a stage into the same folder: it joins."""
    out = tmp_path / "out"
    with output_lock(out, "pipeline") as lock:
        assert lock.owner and os.environ["MLCD_RUN_KEY"]
        with output_lock(out, "train") as inner:
            assert not inner.owner
        assert (out / LOCK_NAME).exists()  # the inner block does not release the outer lock
        child = subprocess.run([sys.executable, "-c", HOLD, str(out)], input="\n", capture_output=True, text=True,
                               env={**clean_env(), "MLCD_RUN_KEY": os.environ["MLCD_RUN_KEY"]})
        assert child.stdout.strip() == "joined", child.stderr
    assert "MLCD_RUN_KEY" not in os.environ and not (out / LOCK_NAME).exists()


RANKS = textwrap.dedent("""
    import sys
    from mlcd_train.utils.lock import output_lock
    from mlcd_train.utils.errors import MLCDError
    try:
        with output_lock(sys.argv[1], "train") as lock:
            print("owner" if lock.owner else "joined", flush=True)
            sys.stdin.readline()
    except MLCDError as exc:
        print("refused", exc, flush=True)
""")


@pytest.mark.slow
def test_ranks_of_one_run_share_one_lock_and_another_run_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "out"

    def rank(r, port, wait="20"):
        env = clean_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        MLCD_LOCK_WAIT=wait)
        return subprocess.Popen([sys.executable, "-c", RANKS, str(out)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    r1 = rank(1, 29411)  # rank 1 first: it waits for rank 0's lock
    time.sleep(0.5)
    r0 = rank(0, 29411)
    assert r0.stdout.readline().strip() == "owner"
    assert r1.stdout.readline().strip() == "joined"
    # a second job into the same folder: both its ranks stop at once, naming the holder
    t0 = time.monotonic()
    b = [rank(r, 29522) for r in (1, 0)]
    lines = [p.communicate("\n", timeout=30)[0].strip() for p in b]
    assert time.monotonic() - t0 < 15
    assert all(line.startswith("refused") and f"pid {r0.pid}" in line for line in lines), lines
    for p in (r0, r1):
        p.communicate("\n", timeout=30)
    assert not (out / LOCK_NAME).exists()  # rank 0 released it; rank 1 never owned it


def test_rank_gives_up_when_rank_0_never_locks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MLCD_LOCK_WAIT", "0.3")
    with pytest.raises(LockHeld, match="rank 0 did not take the lock"):
        with output_lock(tmp_path / "out", "train"):
            pass


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_lock_wait_must_be_finite_seconds(tmp_path, monkeypatch, value):
    """MLCD_LOCK_WAIT=nan or inf made a rank other than 0 wait for ever (nan never expires)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MLCD_LOCK_WAIT", value)
    with pytest.raises(MLCDError, match=f"MLCD_LOCK_WAIT={value!r}: expected a finite number of seconds"):
        with output_lock(tmp_path / "out", "train"):
            pass


# ------------------------------------------------------------------ the stages take it
def _mlcd(*argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "mlcd_train.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=clean_env(OMP_NUM_THREADS="1", MLCD_QUIET="1"),
                            cwd=ROOT, **popen)


@pytest.mark.slow
def test_two_train_runs_into_one_output_dir(tmp_path):
    """The issue's instance: two `mlcd train` with the same output_dir both exited 0 and one's
    checkpoints were lost.  Now the second stops at once, naming the first."""
    import signal

    from tests.test_train import TINY

    out = tmp_path / "run"
    cfg = [f"output_dir={out}", "data.synthetic=true", "loss.num_classes=32", "loss.l=2", *TINY[:2],
           "train.global_batch_size=4", "train.log_every=1", "optim.warmup_steps=0", "train.save_every=1000"]
    first = _mlcd("train", *cfg, "train.steps=100000")
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["stage"] == "train"
        second = _mlcd("train", *cfg, "train.steps=5")
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlcd train: error:"), err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and "output_dir=" in err and "since" in err
        assert first.poll() is None  # the first run goes on
        first.send_signal(signal.SIGUSR1)  # save at the next step and exit 0
        _, err1 = first.communicate(timeout=240)
        assert first.returncode == 0, err1[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (out / LOCK_NAME).exists()  # released on the normal exit
    assert list((out / "checkpoints").glob("step_*/meta.json"))  # the first run's checkpoint is whole


@pytest.mark.slow
def test_lock_released_after_a_stage_fails_and_stale_lock_of_a_killed_stage(tmp_path):
    emb = tmp_path / "emb"
    from tests.test_hostile import _emb

    _emb(emb)
    out = tmp_path / "cl"
    # a stage that fails after taking the lock (k larger than the rows): status 2, lock gone
    p = _mlcd("cluster", "--emb", str(emb), "--k", "100000", "--out", str(out), "--threads", "1")
    _, err = p.communicate(timeout=240)
    assert p.returncode == 2 and "error:" in err, err
    assert not (out / LOCK_NAME).exists() and not out.exists()  # the folder it created, left empty, went too
    # a stage killed with SIGKILL leaves its lock; the next run takes it over with a notice
    write_lock(out, pid=dead_pid(), argv=["mlcd", "cluster", "--out", str(out)], run="proc:killed")
    p = _mlcd("cluster", "--emb", str(emb), "--k", "4", "--out", str(out), "--threads", "1", "--niter", "1")
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert "taking over a stale lock" in err and (out / "centroids.npy").exists()
    assert not (out / LOCK_NAME).exists()


def test_a_folder_created_by_the_lock_is_removed_if_left_empty(tmp_path):
    with pytest.raises(MLCDError):
        with output_lock(tmp_path / "new", "test"):
            assert (tmp_path / "new").is_dir()
            raise MLCDError("refused by the stage's own checks")
    assert not (tmp_path / "new").exists()
    with output_lock(tmp_path / "kept", "test"):
        (tmp_path / "kept" / "x").write_text("output")
    assert (tmp_path / "kept" / "x").exists()
    (tmp_path / "old").mkdir()
    with output_lock(tmp_path / "old", "test"):
        pass
    assert (tmp_path / "old").is_dir()  # it existed before: left alone


PROBE_HOLDS = textwrap.dedent("""
    import sys
    from mlcd_train import probe

    def run_probe(args, grid=None):  # the first probe, stopped while it holds OUT's lock
        print("running", flush=True)
        sys.stdin.readline()
        return {"features": "stub", "embedder": "pca", "n_train": 0, "n_test": 0}

    probe.run_probe = run_probe
    sys.exit(probe.main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_a_second_probe_into_the_same_out_is_refused_naming_the_first(tmp_path):
    from tests.test_probe_cache import _argv, _split

    train = _split(tmp_path / "a", ["cat", "dog"], 2, seed=0)
    test = _split(tmp_path / "b", ["cat", "dog"], 2, seed=1)
    out = tmp_path / "probe"
    first = subprocess.Popen([sys.executable, "-c", PROBE_HOLDS, *_argv(train, test, out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
    try:
        assert first.stdout.readline().strip() == "running", first.stderr.read()[-2000:]
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["stage"] == "probe"
        second = _mlcd("probe", *_argv(train, test, out))
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlcd probe: error:"), err
        assert f"pid {first.pid} on host {socket.gethostname()}" in err and "mlcd probe" in err and "since" in err
        assert not list(out.glob("probe-*.json")) and (out / LOCK_NAME).exists()  # the holder's lock left alone
        _, err1 = first.communicate("\n", timeout=60)
        assert first.returncode == 0, err1[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not (out / LOCK_NAME).exists()  # released when the first probe ended
    assert (out / "probe-stub.json").exists()  # written under the lock


def test_probe_checks_its_folders_before_it_locks(tmp_path):
    """--out the training shards' own folder: refused by name, and no lock file put there."""
    from mlcd_train import probe
    from tests.test_probe_cache import _argv, _split

    train = _split(tmp_path / "a", ["cat"], 1, seed=0)
    with pytest.raises(MLCDError, match="a stage never writes into a folder it reads"):
        probe.main(_argv(train, train, train))
    assert not (train / LOCK_NAME).exists()


# a process that takes a lock, forks a child that lives on (a DataLoader worker), then dies by SIGKILL
_FORK_AND_DIE = r"""
import os, signal, sys, time
from mlcd_core.lock import acquire
acquire(sys.argv[1], "train")
child = os.fork()
if child == 0:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the test reads our parent's output to its end
        os.dup2(null, fd)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_holders_forked_child_does_not_keep_the_lock(tmp_path):
    """A rank 0 killed by SIGKILL while its loader workers live on: the next run (torchrun's
    restart of the group) takes the stale lock over at once instead of finding it flocked by
    the orphaned child."""
    import signal

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("MLCD_RUN_KEY", "RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-c", _FORK_AND_DIE, str(out)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    child = int(r.stdout.split()[0])
    try:
        os.kill(child, 0)  # the orphan is still alive
        with output_lock(out, "train") as lock:
            assert lock.owner and json.loads((out / ".mlcd.lock").read_text())["pid"] == os.getpid()
    finally:
        os.kill(child, signal.SIGKILL)
