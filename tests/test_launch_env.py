"""Launch environment: SLURM variables in mlcd_train.utils.dist, the shell helpers of
launch/common.sh (GPU count, OpenMP threads), slurm.sbatch's save / requeue cycle, and the
reproduction tool's resume of an unfinished `mlcd assign`.

No SLURM and no GPU here: fake `nvidia-smi`, `srun`, `scancel` and `scontrol` scripts on PATH
stand in for them.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest

from mlcd_train.utils.dist import world_from_env
from mlcd_train.utils.errors import MLCDError

ROOT = Path(__file__).resolve().parent.parent
COMMON = ROOT / "launch" / "common.sh"
SYS_PATH = "/usr/bin:/bin"

_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID",
              "SLURM_STEPID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


# ----------------------------------------------------------------------------- dist.py

@pytest.fixture
def slurm_env():
    """os.environ without torchrun's or SLURM's variables; restored afterwards (world_from_env
    exports RANK / WORLD_SIZE / LOCAL_RANK)."""
    saved = dict(os.environ)
    for v in _DIST_VARS:
        os.environ.pop(v, None)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = "29517"
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


# the batch shell of `sbatch --nodes=4 --ntasks-per-node=1`: the job's task count, PROCID 0
BATCH = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("step_id", [None, "", "batch", "4294967291", "4294967294", "4294967290"])
def test_batch_or_salloc_shell_is_one_process(slurm_env, step_id):
    # no step id (batch shell, salloc shell) or a special step (batch, extern, interactive)
    slurm_env.update(BATCH)
    if step_id is not None:
        slurm_env["SLURM_STEP_ID"] = step_id
    assert world_from_env() == (0, 1, 0)
    assert "RANK" not in slurm_env and "WORLD_SIZE" not in slurm_env


def test_srun_step_uses_step_task_count(slurm_env):
    # an srun step of 8 tasks inside a job of 32: the step's count is the world
    slurm_env.update({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "32",
                      "SLURM_PROCID": "5", "SLURM_LOCALID": "1"})
    assert world_from_env() == (5, 8, 1)
    assert (slurm_env["RANK"], slurm_env["WORLD_SIZE"], slurm_env["LOCAL_RANK"]) == ("5", "8", "1")


def test_srun_step_without_step_num_tasks_falls_back_to_ntasks(slurm_env):
    slurm_env.update({"SLURM_STEP_ID": "3", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"})
    assert world_from_env() == (1, 2, 0)


def test_srun_step_needs_master_addr(slurm_env):
    del slurm_env["MASTER_ADDR"]
    slurm_env.update({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"})
    assert world_from_env() == (0, 1, 0)


def test_torchrun_variables_win_over_slurm(slurm_env):
    slurm_env.update({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0",
                      "SLURM_LOCALID": "0", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert world_from_env() == (1, 2, 1)


def test_malformed_slurm_variable_is_an_mlcd_error(slurm_env):
    slurm_env.update({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "one"})
    with pytest.raises(MLCDError, match="SLURM_PROCID"):
        world_from_env()


# ----------------------------------------------------------------------------- common.sh

def _script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)
    return p


NVSMI_8 = """case "$*" in
  *--query-gpu=index*) for i in 0 1 2 3 4 5 6 7; do echo "$i"; done ;;
  *) for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000$i)"; done ;;
esac
"""
# one A100 split into two MIG instances: -L lists three lines, the GPU query one
NVSMI_MIG = """case "$*" in
  *--query-gpu=index*) echo 0 ;;
  *) echo "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-aaaa)"
     echo "  MIG 3g.20gb     Device  0: (UUID: MIG-bbbb)"
     echo "  MIG 3g.20gb     Device  1: (UUID: MIG-cccc)" ;;
esac
"""
NVSMI_FAIL = """echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."; exit 9
"""


def _env(bindir: Path | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "GPUS") and not k.startswith("SLURM")}
    env["PATH"] = f"{bindir}:{SYS_PATH}" if bindir else SYS_PATH
    env["PYTHON"] = "true"   # common.sh asks `$PYTHON -m torch.distributed.run --help`
    env.update(extra)
    return env


def _bash(snippet: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f'set -euo pipefail; source "{COMMON}"; {snippet}'],
                          env=env, capture_output=True, text=True, timeout=30)


@pytest.fixture
def no_real_nvidia_smi():
    if shutil.which("nvidia-smi", path=SYS_PATH):
        pytest.skip("a real nvidia-smi is on the system PATH")


@pytest.mark.parametrize("fake,cvd,gpus,procs", [
    (NVSMI_8, None, "8", "8"),
    (NVSMI_8, "0,1", "2", "2"),                   # CUDA_VISIBLE_DEVICES wins over nvidia-smi
    (NVSMI_8, "GPU-aa, GPU-bb,GPU-cc", "3", "3"),  # UUIDs
    (NVSMI_8, "", "0", "1"),                      # set but empty: no GPU, one CPU process
    (NVSMI_8, "-1", "0", "1"),
    (NVSMI_8, "0,-1,1", "1", "1"),                # CUDA stops at the first invalid entry
    (NVSMI_MIG, None, "1", "1"),                  # MIG instances are not GPUs
    (NVSMI_FAIL, "3", "1", "1"),                  # CUDA_VISIBLE_DEVICES: nvidia-smi not asked
])
def test_gpus_here(tmp_path, no_real_nvidia_smi, fake, cvd, gpus, procs):
    _script(tmp_path / "bin", "nvidia-smi", fake)
    extra = {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    r = _bash('echo "gpus=$(gpus_here) procs=$(procs_here)"', _env(tmp_path / "bin", **extra))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"gpus={gpus} procs={procs}"


def test_gpus_here_without_nvidia_smi(tmp_path, no_real_nvidia_smi):
    r = _bash('echo "gpus=$(gpus_here) procs=$(procs_here)"', _env(None))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "gpus=0 procs=1"
    assert "no GPU visible" in r.stderr


def test_failing_nvidia_smi_stops_with_a_message(tmp_path, no_real_nvidia_smi):
    _script(tmp_path / "bin", "nvidia-smi", NVSMI_FAIL)
    r = _bash("gpus_here", _env(tmp_path / "bin"))
    assert r.returncode == 1
    assert "nvidia-smi failed" in r.stderr and "couldn't communicate with the NVIDIA driver" in r.stderr
    assert "GPUS=" in r.stderr
    # single_node.sh stops there, before torchrun
    log = tmp_path / "python.log"
    fakepy = _script(tmp_path / "py", "python", f'echo "$*" >> "{log}"\n')
    r = subprocess.run(["bash", str(ROOT / "launch" / "single_node.sh"), "--config", "x"],
                       env=_env(tmp_path / "bin", PYTHON=str(fakepy)), capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0
    assert "nvidia-smi failed" in r.stderr
    assert "--nproc_per_node" not in (log.read_text() if log.exists() else "")


def test_single_node_honours_cuda_visible_devices(tmp_path, no_real_nvidia_smi):
    _script(tmp_path / "bin", "nvidia-smi", NVSMI_8)
    log = tmp_path / "python.log"
    fakepy = _script(tmp_path / "py", "python", f'echo "$*" >> "{log}"\n')
    r = subprocess.run(["bash", str(ROOT / "launch" / "single_node.sh"), "--config", "x"],
                       env=_env(tmp_path / "bin", PYTHON=str(fakepy), CUDA_VISIBLE_DEVICES="0,1"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "--nproc_per_node 2 " in log.read_text()


@pytest.mark.parametrize("cpus,procs,threads", [("64", "8", "8"), ("4", "8", "1"), ("8", "0", "8"),
                                                 ("0", "8", "1"), ("", "", "1")])
def test_threads_per_proc(cpus, procs, threads):
    r = _bash(f'threads_per_proc "{cpus}" "{procs}"', _env(None))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == threads


# ----------------------------------------------------------------------------- slurm.sbatch

def _fake_slurm(tmp_path: Path) -> Path:
    """Fake srun (one torchrun per node: saves and exits 1 on SIGTERM, like torchrun after a
    forwarded signal; FAKE_SRUN_RC: exit at once with that status), scancel and scontrol."""
    d = tmp_path / "slurm"
    _script(d / "bin", "srun", f"""echo "$*" > "{d}/srun.args"
echo "OMP_NUM_THREADS=$OMP_NUM_THREADS" >> "{d}/srun.args"
[ -n "${{FAKE_SRUN_RC:-}}" ] && exit "$FAKE_SRUN_RC"
trap 'echo saved > "{d}/srun.saved"; exit 1' TERM
echo $$ > "{d}/srun.pid.tmp" && mv "{d}/srun.pid.tmp" "{d}/srun.pid"
while :; do sleep 0.05; done
""")
    _script(d / "bin", "scancel", f"""echo "$*" >> "{d}/scancel.log"
kill -TERM "$(cat "{d}/srun.pid")"
""")
    _script(d / "bin", "scontrol", f"""echo "$*" >> "{d}/scontrol.log"
[ "$1 $2" = "show hostnames" ] && {{ echo node01; echo node02; }}
exit 0
""")
    return d


def _sbatch_env(d: Path, **extra) -> dict:
    return _env(d / "bin", SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242", SLURM_NNODES="2",
                SLURM_JOB_NODELIST="node[01-02]", SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK="4",
                **extra)


def _read(p: Path) -> str:
    return p.read_text() if p.exists() else ""


def test_sbatch_syntax():
    r = subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm.sbatch")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text


def test_sbatch_usr1_saves_then_requeues(tmp_path):
    d = _fake_slurm(tmp_path)
    p = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "x"], cwd=ROOT,
                         env=_sbatch_env(d), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1000):   # until the fake step runs (the traps are set before it starts)
            if (d / "srun.pid").exists() or p.poll() is not None:
                break
            time.sleep(0.01)
        assert (d / "srun.pid").exists(), p.communicate(timeout=10)
        p.send_signal(signal.SIGUSR1)    # what --signal=B:USR1@180 does
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
        if (d / "srun.pid").exists():
            try:
                os.kill(int((d / "srun.pid").read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    assert p.returncode == 0, err
    assert _read(d / "scancel.log").split() == ["--signal=TERM", "4242"]
    assert (d / "srun.saved").exists()                       # the step got its SIGTERM and saved
    assert "requeue 4242" in _read(d / "scontrol.log")       # after the step had ended
    assert "requeueing job 4242" in err
    args = _read(d / "srun.args")
    assert "--nproc_per_node 8 " in args and "-m mlcd_train.train --config x" in args


@pytest.mark.parametrize("rc", [0, 3])
def test_sbatch_without_signal_does_not_requeue(tmp_path, rc):
    d = _fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "x"], cwd=ROOT,
                       env=_sbatch_env(d, FAKE_SRUN_RC=str(rc)), capture_output=True, text=True, timeout=30)
    assert r.returncode == rc, r.stderr
    assert "requeue" not in _read(d / "scontrol.log")
    assert not (d / "scancel.log").exists()


def test_sbatch_omp_threads_at_least_one(tmp_path):
    # --cpus-per-task=4 with 8 GPUs per node: 4 // 8 = 0 threads before the fix
    d = _fake_slurm(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "x"], cwd=ROOT,
                       env=_sbatch_env(d, FAKE_SRUN_RC="0"), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "OMP_NUM_THREADS=1\n" in _read(d / "srun.args")
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "x"], cwd=ROOT,
                       env=_sbatch_env(d, FAKE_SRUN_RC="0", OMP_NUM_THREADS="3"), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "OMP_NUM_THREADS=3\n" in _read(d / "srun.args")     # the user's value stays


# ----------------------------------------------------------------------------- reproduce_fashion_mnist.py

def _repro_module():
    tools = str(ROOT / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import reproduce_fashion_mnist as R

    return R


@pytest.mark.parametrize("assign_complete,expect_assign", [(False, True), (True, False)])
def test_repro_prepare_resumes_unfinished_assign(tmp_path, monkeypatch, assign_complete, expect_assign):
    # `mlcd assign` writes labels_k*/meta.json first, with complete=false: a run killed during
    # assign must run it again (it resumes by itself), a finished one must not
    R = _repro_module()
    work = tmp_path / "work"
    for split in ("train", "test"):
        (work / "shards" / split).mkdir(parents=True)
        (work / "shards" / split / "sizes.json").write_text("{}")
    (work / "emb").mkdir()
    (work / "emb" / "meta.json").write_text(json.dumps({"complete": True}))
    (work / "labels_k10").mkdir()
    (work / "labels_k10" / "meta.json").write_text(json.dumps({"k": 10, "complete": assign_complete}))
    called = []
    monkeypatch.setattr(R, "call", lambda fn, *args, **kwargs: called.append(fn.__module__))  # the stage function
    a = Namespace(work=str(work), idx_dir=None, k_list=[10], l_list=[8], k_main=10, k_rate=10, seed=0)
    R.Repro(a).prepare([{"kind": "train", "k": 10, "labels": "labels_k10"}])
    assert "clustering.embed" not in called and "mlcd_train.data.shards" not in called
    assert ("clustering.assign" in called) == expect_assign
