"""Restarts under torchrun: the group forms again on torchrun's shared store, and never waits forever.

torchrun's agent hosts one TCP store for all attempts of a job; after a restart it still holds
the previous attempt's keys (gloo/NCCL addresses of dead workers).  ``init_distributed`` agrees
on a fresh key prefix per attempt (``mlcd_train.utils.dist._join_attempt``), and bounds forming
the group by ``MLCD_DIST_START_TIMEOUT``.

- unit level: gloo ranks in spawned processes against a store this test hosts and pre-fills
  with a dead attempt's keys, as torchrun's agent would hold them;
- as a user types it: ``torchrun --standalone --nproc_per_node 2 --max-restarts 1 -m
  mlcd_train.train --config fashion_mnist_tiny ...`` with no extra environment, one worker
  SIGKILLed mid-run: it must end on the weights of an uninterrupted run; and with a restarted
  rank that never arrives it must exit non-zero within 60 s, naming the variable, leaving the
  checkpoints as they were.
"""
from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mlcd_train.utils import dist as D
from mlcd_train.utils.errors import MLCDError
from tests.dist_utils import free_port
from tests.fixtures import make_sample_shards
from tests.test_train import make_labels  # the label folder the trainer tests use

ROOT = Path(__file__).resolve().parent.parent
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
             "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", D.START_TIMEOUT_VAR, D.TIMEOUT_VAR, "SLURM_STEP_ID")


@pytest.fixture()
def clean_env(monkeypatch):
    for v in DIST_VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def agent_store(port: int) -> dist.TCPStore:
    """A store hosted here, as torchrun's agent hosts it for its workers."""
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=30), multi_tenant=True)


RANK_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from mlcd_train.utils import dist as D
from mlcd_train.utils.errors import MLCDError
torch.set_num_threads(1)
try:
    D.init_distributed(device="cpu")
    t = torch.tensor([float(D.get_rank() + 1)])
    dist.all_reduce(t)
    res = ["ok", t.item()]
except MLCDError as exc:
    res = ["mlcd", str(exc)]
finally:
    D.cleanup()
print(json.dumps(res))
"""


def start_ranks(script, ranks, world, port, env, args=(), timeout=60):
    """Run ``ranks`` of a ``world``-rank group as processes executing ``script`` (``args`` after it);
    {rank: (returncode, stdout, stderr)}."""
    procs = {}
    for r in ranks:
        e = dict(os.environ, **env, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
        procs[r] = subprocess.Popen([sys.executable, "-c", script, *args], env=e, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    res = {}
    try:
        for r, p in procs.items():
            out, err = p.communicate(timeout=timeout)
            res[r] = (p.returncode, out, err)
    finally:
        for p in procs.values():
            p.kill()
    return res


def run_ranks(ranks, world, port, env, timeout=60):
    """Start ``ranks`` of a ``world``-rank group as processes running init_distributed and an
    all_reduce; {rank: (status, value)}."""
    res = {}
    for r, (rc, out, err) in start_ranks(RANK_SCRIPT, ranks, world, port, env, timeout=timeout).items():
        assert rc == 0, f"rank {r} exited {rc}:\n{err[-3000:]}"
        res[r] = tuple(json.loads(out.strip().splitlines()[-1]))
    return res


# ----------------------------------------------------------------------------- unit level

@pytest.mark.slow
def test_a_restart_on_the_agent_store_forms_a_group_where_plain_init_fails(tmp_path, clean_env):
    port = free_port()
    store = agent_store(port)
    script = textwrap.dedent(f"""
        import os, sys, datetime, torch, torch.distributed as dist
        os.environ.update(RANK=sys.argv[1], WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}",
                          TORCHELASTIC_USE_AGENT_STORE="True")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(sys.argv[2])))
        t = torch.ones(1); dist.all_reduce(t); print("sum", t.item()); dist.destroy_process_group()
    """)

    def plain_attempt(limit):
        """Both ranks initialise the way torch's env:// does; their exit codes and output."""
        ps = [subprocess.Popen([sys.executable, "-c", script, str(r), str(limit)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
        try:
            return [p.communicate(timeout=60)[0] for p in ps], [p.returncode for p in ps]
        finally:
            for p in ps:
                p.kill()

    outs, rcs = plain_attempt(30)
    assert rcs == [0, 0], outs
    keys = store.num_keys()
    # (a second plain attempt on this store reads the first one's gloo addresses; whether it then
    # fails or hangs depends on timing -- it succeeded on a quiet machine -- so it is not asserted)
    # init_distributed forms the group on the same store, and again after its own attempt
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert run_ranks([0, 1], 2, port, env) == {0: ("ok", 3.0), 1: ("ok", 3.0)}
    assert run_ranks([0, 1], 2, port, env) == {0: ("ok", 3.0), 1: ("ok", 3.0)}
    assert store.num_keys() > keys


def test_rank_zero_alone_fails_within_the_start_timeout(tmp_path, clean_env):
    port = free_port()
    store = agent_store(port)  # noqa: F841 - kept open for the whole test
    clean_env.setenv(D.START_TIMEOUT_VAR, "1.5")
    clean_env.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    clean_env.setenv("MASTER_ADDR", "127.0.0.1")
    clean_env.setenv("MASTER_PORT", str(port))
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "3")
    t0 = time.monotonic()
    with pytest.raises(MLCDError, match=r"ranks \[1, 2\] did not join within 1.5 s \(MLCD_DIST_START_TIMEOUT"):
        D.init_distributed(device="cpu")
    assert time.monotonic() - t0 < 10
    assert not dist.is_initialized()


def test_other_rank_alone_fails_within_the_start_timeout(clean_env):
    port = free_port()
    store = agent_store(port)
    store.set("mlcd/attempt", "deadbeef")           # a dead rank 0's attempt id
    store.set("mlcd/deadbeef/welcome/x", "1")
    for k, v in {D.START_TIMEOUT_VAR: "1", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "RANK": "1", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(MLCDError, match=r"rank 0 did not answer within 1 s \(MLCD_DIST_START_TIMEOUT"):
        D.init_distributed(device="cpu")
    assert time.monotonic() - t0 < 10


def test_without_agent_store_a_missing_rank_zero_fails_within_the_start_timeout(clean_env):
    for k, v in {D.START_TIMEOUT_VAR: "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                 "RANK": "1", "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(MLCDError, match=r"rank 1 of 2 could not form the group .*MLCD_DIST_START_TIMEOUT=2 s"):
        D.init_distributed(device="cpu")
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("var", [D.START_TIMEOUT_VAR, D.TIMEOUT_VAR])
@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_bad_timeout_value_names_the_variable(clean_env, var, value):
    clean_env.setenv(var, value)
    with pytest.raises(MLCDError, match=f"environment variable {var}={value!r}: expected a positive number"):
        D.dist_timeouts()


def test_timeouts_default_and_read_from_the_environment(clean_env):
    assert D.dist_timeouts() == (D.DEFAULT_START_TIMEOUT_S, D.DEFAULT_TIMEOUT_S)
    clean_env.setenv(D.START_TIMEOUT_VAR, "45")
    clean_env.setenv(D.TIMEOUT_VAR, "7200")
    assert D.dist_timeouts() == (45.0, 7200.0)


def test_bad_timeout_is_one_line_and_exit_2_from_the_command(clean_env, capsys, tmp_path):
    from mlcd_train.cli import run_stage

    for k, v in {D.TIMEOUT_VAR: "ten", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "RANK": "0",
                 "WORLD_SIZE": "2"}.items():
        clean_env.setenv(k, v)
    # output_dir in the test's own folder (the preset's runs/fashion_mnist_tiny is relative to the cwd)
    assert run_stage("train", ["--config", "fashion_mnist_tiny", "train.device=cpu",
                               f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mlcd train: error: environment variable MLCD_DIST_TIMEOUT='ten': expected a positive "
                   "number of seconds"]


# ----------------------------------------------------------------------------- torchrun, as a user types it

STEPS = 24
# the README's command plus short-run settings (the only additions: steps, checkpoint interval, log interval)
SHORT = [f"train.steps={STEPS}", "train.save_every=4", "train.log_every=1"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restart_data")
    shards = make_sample_shards(tmp, n=400, shard_size=100, name="shards")
    return tmp, shards, make_labels(shards, tmp / "labels", k=64, topk=8)


def user_env(**extra) -> dict:
    """The environment of a user's shell: none of the settings the launch scripts add."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "PYTHONPATH", D.START_TIMEOUT_VAR, D.TIMEOUT_VAR)
           and not k.startswith(("TORCHELASTIC_", "MASTER_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # `torchrun` of this venv
    env.update(extra)
    return env


def user_torchrun(sample, out: Path, *flags, env=None) -> subprocess.Popen:
    tmp, shards, labels = sample
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", *flags, "-m", "mlcd_train.train",
           "--config", "fashion_mnist_tiny", f"data.shards={shards}", f"data.labels={labels}",
           f"output_dir={out}", *SHORT]
    log = open(f"{out}.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or user_env(), cwd=tmp)


def log_of(out: Path) -> str:
    return Path(f"{out}.log").read_text(errors="replace")


def last_step(out: Path) -> int:
    p = out / "metrics.jsonl"
    lines = p.read_text().splitlines() if p.is_file() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (ValueError, KeyError):
        return 0   # a line being written


def wait_for(p: subprocess.Popen, out: Path, timeout: float) -> int:
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"torchrun still running after {timeout:g}s:\n{log_of(out)[-3000:]}")


def kill_one_worker_at(p: subprocess.Popen, out: Path, step: int, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while last_step(out) < step:
        if p.poll() is not None:
            pytest.fail(f"torchrun ended (rc {p.returncode}) before step {step}:\n{log_of(out)[-3000:]}")
        if time.monotonic() - t0 > timeout:
            p.kill()
            pytest.fail(f"step {step} not reached in {timeout}s:\n{log_of(out)[-3000:]}")
        time.sleep(0.02)
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    assert len(children) == 2, children
    os.kill(int(children[1]), signal.SIGKILL)      # kill -9 one worker


def final_weights(out: Path) -> dict:
    from mlcd_train.trainer.checkpoint import latest_complete

    ck = latest_complete(out / "checkpoints")
    assert ck is not None and ck.name == f"step_{STEPS:08d}", ck
    w = {f"model.{k}": v for k, v in torch.load(ck / "model.pt", weights_only=False)["state_dict"].items()}
    for r in range(2):
        w[f"pfc{r}"] = torch.load(ck / f"pfc_rank{r}.pt", weights_only=False)["weight"]
    return w


def assert_same(a: dict, b: dict, tol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), k


def checkpoint_files(out: Path) -> dict:
    from mlcd_train.trainer.checkpoint import list_checkpoints

    return {f"{c.name}/{f.name}": f.read_bytes() for _, c in list_checkpoints(out / "checkpoints")
            for f in sorted(c.iterdir())}


@pytest.fixture(scope="module")
def runs(sample):
    """The uninterrupted run and the kill -9 run of the same command, started together."""
    ref, kill = sample[0] / "ref", sample[0] / "kill"
    p_ref = user_torchrun(sample, ref, "--max-restarts", "1")
    p_kill = user_torchrun(sample, kill, "--max-restarts", "1")
    kill_one_worker_at(p_kill, kill, 10)
    t_kill = time.monotonic()
    rc_kill = wait_for(p_kill, kill, 400)
    took = time.monotonic() - t_kill
    assert wait_for(p_ref, ref, 400) == 0, log_of(ref)[-3000:]
    return {"reference": final_weights(ref), "kill": (kill, rc_kill, took)}


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_under_standalone_max_restarts_resumes_to_the_same_weights(runs):
    out, rc, took = runs["kill"]
    log = log_of(out)
    assert rc == 0, log[-3000:]
    assert "mlcd train: resumed from" in log, log[-3000:]
    print(f"kill -9 at step >= 10: torchrun restarted the group and finished {took:.0f} s later")
    assert_same(final_weights(out), runs["reference"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_restarted_group_that_cannot_form_fails_within_60s_and_keeps_the_checkpoints(sample, reference, tmp_path):
    out = sample[0] / "noform"
    hook = tmp_path / "hook"
    hook.mkdir()
    # the restarted rank 1 never reaches the trainer (a hung node, a stuck file system)
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, time
        if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "1" and os.environ.get("RANK") == "1":
            time.sleep(3600)
    """))
    env = user_env(**{D.START_TIMEOUT_VAR: "5", "PYTHONPATH": str(hook)})
    p = user_torchrun(sample, out, "--max-restarts", "1", env=env)
    kill_one_worker_at(p, out, 10)
    t_kill = time.monotonic()
    # 60 s on an idle machine; on a shared one, worker start-up (imports) and torchrun's
    # teardown stretch with the load, the wait that is ours (5 s) does not
    limit = 60 * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    rc = wait_for(p, out, limit)
    took = time.monotonic() - t_kill
    log = log_of(out)
    assert rc != 0
    print(f"kill -9, restarted rank 1 never arrives: torchrun exited {rc} {took:.0f} s after the kill "
          f"(limit {limit:.0f} s)")
    msg = [ln for ln in log.splitlines() if ln.startswith("mlcd train: error: distributed start-up:")]
    assert msg and "ranks [1] did not join within 5 s (MLCD_DIST_START_TIMEOUT" in msg[0], log[-3000:]
    kept = checkpoint_files(out)
    assert kept, "no complete checkpoint left"
    newest = max(k.split("/")[0] for k in kept)
    # the same command again, the rank back: it resumes from the newest checkpoint, untouched
    # by the failed restart, and ends on the uninterrupted run's weights
    p = user_torchrun(sample, out, "--max-restarts", "1")
    assert wait_for(p, out, 400) == 0, log_of(out)[-3000:]
    assert f"resumed from {out / 'checkpoints' / newest} " in log_of(out)
    assert_same(final_weights(out), reference)
    after = checkpoint_files(out)
    assert {k: v for k, v in after.items() if k in kept} == {k: v for k, v in kept.items() if k in after}


EXIT_SCRIPT = """
import atexit, os, sys, torch, torch.distributed as dist

def threads():
    return len(os.listdir("/proc/self/task"))

# registered first, so it runs last: after every exit handler init_distributed added
atexit.register(lambda: print("at exit: group", dist.is_initialized(), "threads", threads(), flush=True))
from mlcd_core.dist import init_distributed
from mlcd_core.stage import run_main
torch.set_num_threads(1)

def stage(argv):
    init_distributed(device="cpu")
    group = dist.group.WORLD  # a reference that a failure's traceback keeps
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    print("sum", t.item(), "threads", threads(), flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("the stage fails")

mode = sys.argv[1]
if mode == "caller":
    init_distributed(device="cpu")
if mode in ("run_main", "caller"):
    run_main("test", stage, [])
    print("after run_main: group", dist.is_initialized(), "threads", threads(), flush=True)
else:
    stage([])
"""


def _two_ranks(mode: str) -> list[dict]:
    """EXIT_SCRIPT in ``mode`` on two gloo ranks; each rank's {"sum" | "after" | "at": (group, threads)}."""
    runs = start_ranks(EXIT_SCRIPT, (0, 1), 2, free_port(), {"MLCD_DIST_START_TIMEOUT": "30"}, args=(mode,))
    res = []
    for r, (rc, out, err) in runs.items():
        assert rc == (1 if mode == "raise" else 0), f"rank {r} exited {rc}:\n{out}\n{err[-2000:]}"
        got = {}
        for line in out.splitlines():
            w = line.split()
            if w[0] == "sum":
                got["sum"] = (float(w[1]), int(w[3]))
            elif w[0] in ("after", "at"):
                got[w[0]] = (w[-3] == "True", int(w[-1]))
        assert got["sum"][0] == 2.0, out
        res.append(got)
    return res


@pytest.mark.slow
def test_a_stage_leaves_no_gloo_group_to_interpreter_teardown(clean_env):
    """A stage's own code (embed / cluster / assign) does not destroy its group; left to interpreter
    finalisation, gloo's threads killed a rank with SIGABRT now and then (the distributed k-means in
    CI).  The group and its threads must be gone before finalisation: run_main destroys the group a
    stage made when it returns; for a stage called from Python, or one that failed while its
    traceback holds the group, init_distributed's exit hook does.  A caller's own group stays."""
    for got in _two_ranks("run_main"):
        busy = got["sum"][1]
        assert got["after"] == (False, got["after"][1]) and got["after"][1] < busy, got
    for mode in ("plain", "raise"):
        for got in _two_ranks(mode):
            assert got["at"][0] is False and got["at"][1] < got["sum"][1], (mode, got)
    for got in _two_ranks("caller"):
        assert got["after"][0] is True, got
