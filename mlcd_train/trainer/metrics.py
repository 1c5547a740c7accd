"""The trainer's log: ``OUT/metrics.jsonl``, tensorboard scalars (``OUT/tb``) and, when asked
for (``train.wandb=PROJECT``), Weights & Biases.

- ``metrics.jsonl``: one JSON object per logged step (appended, flushed); a resume drops the
  lines past the step it resumes from (and a line cut by a kill), a fresh run starts it over.
- tensorboard: every numeric field as ``<section>/<name>``; a resume purges the later steps.
- wandb is optional (not a dependency): ``train.wandb`` names the project; without the
  package installed that is a config error naming the key.  The run id is kept in
  ``OUT/wandb_run_id`` (written atomically on the first start), so a resumed run continues the
  same wandb run (``resume="allow"``); ``WANDB_MODE=offline`` works as wandb documents it.

Only rank 0 logs (``enabled``); the other ranks hold a disabled log.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path

from mlcd_train.utils.errors import MLCDError

RUN_ID_FILE = "wandb_run_id"
MAX_LOG_BYTES = 1 << 31  # a metrics.jsonl read back on a resume (a line a log step: far below)


def _own_log(path: Path) -> bool:
    """Whether ``path`` exists; it must be a regular file (not a link, FIFO or folder: the log
    is appended to, and a FIFO would block the trainer, a link write outside the run)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a special file")
        raise MLCDError(f"{path}: {kind}, not a regular file; the trainer writes its metrics log there "
                        "(move it away and rerun)")
    return True


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or cut one (a write cut short by a
    kill or a full disk), which a resume drops rather than failing on."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else math.inf
    except (ValueError, AttributeError):
        return math.inf


def wandb_module():
    """The wandb package, or None when it is not installed."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb


def wandb_run_id(out: Path, start_step: int) -> str:
    """The wandb run id of the run in ``out``: read back on a resume, a new one on a fresh start
    (written to ``OUT/wandb_run_id`` before wandb starts)."""
    from mlcd_train.utils.io import atomic_write_text, read_regular

    path = out / RUN_ID_FILE
    if start_step > 0 and path.is_file():
        rid = read_regular(path, 200, what="wandb run id").decode("ascii", "replace").strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", rid):
            raise MLCDError(f"{path}: not a wandb run id ({rid[:40]!r}); remove the file to start a new wandb run")
        return rid
    import secrets

    rid = secrets.token_hex(8)
    atomic_write_text(path, rid + "\n")
    return rid


class MetricsLog:
    """``OUT/metrics.jsonl`` (append, one object per logged step), tensorboard scalars and the
    optional wandb run."""

    def __init__(self, out: Path, start_step: int, enabled: bool, wandb_project: str | None = None,
                 config: dict | None = None):
        self.enabled = enabled
        self.out = Path(out)
        self.path = self.out / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        exists = _own_log(self.path)
        if start_step > 0 and exists:  # drop lines past the checkpoint we resumed from
            from mlcd_train.utils.io import atomic_write_text, read_regular

            text = read_regular(self.path, MAX_LOG_BYTES, what="metrics log").decode("utf-8", "replace")
            keep = [ln for ln in text.splitlines() if _step_of(ln) <= start_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
        elif start_step == 0 and exists:
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)
        # a link or FIFO put there since the check: O_NOFOLLOW refuses the link, O_NONBLOCK makes
        # the FIFO fail instead of waiting for a reader, fstat refuses whatever else opened
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise MLCDError(f"{self.path}: cannot open the metrics log ({exc.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            _own_log(self.path)
            raise MLCDError(f"{self.path}: not a regular file; the trainer writes its metrics log there")
        self.f = os.fdopen(fd, "a", encoding="utf-8")
        if wandb_project:
            wb = wandb_module()
            if wb is None:
                raise MLCDError("config key 'train.wandb': the wandb package is not installed "
                                "(pip install wandb, or leave train.wandb unset)")
            self.run_id = wandb_run_id(self.out, start_step)
            self.wandb = wb.init(project=wandb_project, id=self.run_id, resume="allow", dir=str(self.out),
                                 config=config, name=self.out.name)

    def log(self, rec: dict, section: str = "train") -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        step = rec["step"]
        scalars = {}
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                self.tb.add_scalar(f"{section}/{k}", v, step)
                scalars[f"{section}/{k}"] = v
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
                self.wandb = None


def open_metrics_log(out: Path, start_step: int, is_main: bool, distributed: bool,
                     wandb_project: str | None = None, config: dict | None = None) -> MetricsLog:
    """Every rank: the run's log (enabled on rank 0).  A refusal on rank 0 (``metrics.jsonl``
    not a regular file, wandb missing, an unwritable folder) is raised on every rank alike,
    not left to the others to find as a hang in their first collective."""
    log, err = None, None
    if is_main:
        try:
            log = MetricsLog(out, start_step, True, wandb_project, config)
        except MLCDError as exc:
            err = str(exc)
        except OSError as exc:
            err = f"{Path(out) / 'metrics.jsonl'}: cannot start the metrics log ({exc.strerror or exc})"
    else:
        log = MetricsLog(out, start_step, False)
    if distributed:
        import torch.distributed as dist

        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        if log is not None:
            log.close()
        raise MLCDError(err if is_main else f"rank 0: {err}")
    return log
