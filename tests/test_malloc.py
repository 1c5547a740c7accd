"""mlcd_core/malloc.py: glibc keeps freed buffers, so a CPU training step stops faulting its
pages in again every step (measured effect: the demo trains about 1.7x faster)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a few training steps of a small ResNet after a warm-up; prints the median step's minor page faults
STEPS = r"""
import ctypes, resource, sys, torch
# transparent huge pages (THP "always", as some distributions ship) would fault the default run's
# heap in 2 MiB at a time: this test counts 4 KiB pages, so THP is off for this process
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
torch.set_num_threads(1)
if sys.argv[1] == "tuned":
    from mlcd_core.malloc import tune_malloc
    assert tune_malloc() is True
from mlcd_train.models import create_model
torch.manual_seed(0)
m = create_model("ResNet-10-w16-28")
opt = torch.optim.AdamW(m.parameters())
x = torch.randn(32, 3, 28, 28)
def step():
    opt.zero_grad()
    m(x).square().mean().backward()
    opt.step()
for _ in range(3):
    step()
faults = []
for _ in range(8):  # the median step: a rare step faults a few hundred pages for reasons of its own
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sorted(faults)[4])
"""


def _faults_per_step(mode: str) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "MLCD_MALLOC_TUNING")}
    r = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_a_tuned_process_stops_faulting_its_buffers_in_every_step():
    default, tuned = _faults_per_step("default"), _faults_per_step("tuned")
    # glibc's defaults hand the step's buffers back and fault them in again (thousands of pages)
    assert default > 500, default
    assert tuned < 0.05 * default, (tuned, default)


def test_the_users_own_malloc_settings_win(monkeypatch):
    from mlcd_core import malloc

    called = []
    monkeypatch.setattr(malloc, "_mallopt", lambda: (lambda *a: called.append(a) or 1))
    for var, value in (("MALLOC_TRIM_THRESHOLD_", "0"), ("MALLOC_MMAP_THRESHOLD_", "65536"),
                       ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"), ("MLCD_MALLOC_TUNING", "0"),
                       ("MLCD_MALLOC_TUNING", "false"), ("MLCD_MALLOC_TUNING", " Off")):
        monkeypatch.setattr(malloc, "_done", None)
        with monkeypatch.context() as m:
            m.setenv(var, value)
            assert malloc.tune_malloc() is False
    assert called == []
    # without them: the mmap threshold first (setting it stops glibc's moving threshold), then the trim one
    monkeypatch.setattr(malloc, "_done", None)
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "MLCD_MALLOC_TUNING"):
        monkeypatch.delenv(var, raising=False)
    assert malloc.tune_malloc() is True
    assert called == [(-3, malloc.MMAP_THRESHOLD), (-1, malloc.TRIM_THRESHOLD)]
    assert malloc.tune_malloc() is True and len(called) == 2  # once per process
    monkeypatch.setattr(malloc, "_done", None)
    monkeypatch.setattr(malloc, "_mallopt", lambda: None)  # not glibc
    assert malloc.tune_malloc() is False


@pytest.mark.parametrize("on", [True, False])
def test_the_trainer_tunes_malloc_on_the_cpu_unless_told_not_to(tmp_path, monkeypatch, on):
    from mlcd_core import malloc
    from mlcd_train.cli import run_stage
    from tests.test_train import TINY

    calls = []
    monkeypatch.setattr(malloc, "tune_malloc", lambda: calls.append(1) or True)
    rc = run_stage("train", [f"output_dir={tmp_path / 'out'}", "data.synthetic=true", "loss.num_classes=8", *TINY,
                             "train.steps=1", "data.num_workers=0", "train.device=cpu",
                             f"train.tune_malloc={str(on).lower()}"])
    assert rc == 0 and calls == ([1] if on else [])
