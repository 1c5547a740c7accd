"""One run per output folder: the lock every long stage takes on what it writes.

    with output_lock(out, "assign"):
        ...  # every write into out

The lock is a file, ``OUT/.mlcd.lock`` for an output folder (``output_lock(out, stage)``) or
``.NAME.mlcd.lock`` beside an output that is a file or a folder replaced as a whole
(``output_lock(path, stage, beside=True)``: ``mlcd export``'s X.pt, ``mlcd convert``'s
folder).  It holds one JSON object: ``pid``, ``host``, ``started`` (UTC), ``argv``, ``stage``,
``run`` (see below) and ``pid_start`` (the process's start time in clock ticks, so that a
reused pid is not taken for the holder).

- **Taking it.**  The JSON is written to a private temporary file, which is then hard-linked
  to the lock's name: ``link`` fails if the name exists, so exactly one run creates the lock
  and nobody ever reads half of one (unlike a plain ``O_EXCL`` create followed by a write).
  The holder keeps the file open with ``fcntl.flock(LOCK_EX)`` where the filesystem supports
  it: the kernel drops that lock when the process dies, however it dies.
- **A second run** into the same output finds the file and stops: an :class:`LockHeld`
  (an :class:`MLCDError`: one line, exit status 2) naming who holds it (pid, host, command,
  since when).
- **A stale lock** (this host, its pid gone or reused, its flock free) is taken over with a
  one-line notice on stderr.  A lock held from **another host** is never taken over: the pid
  means nothing here, and a shared filesystem may not carry the flock; the message says to
  delete the file if that run is gone.
- **Released** (the file deleted) when the block ends, normally or by an exception.  A run
  killed with SIGKILL leaves the file; the next run on that host takes it over.

**Distributed runs.**  All ranks of one run call ``output_lock`` with the same target; they
share one lock.  Only rank 0 creates (and releases) it; the other ranks wait (up to
``MLCD_LOCK_WAIT`` seconds, default 120) until the lock names their own run, and stop at once
(the same one-line error as rank 0) if another live run holds it, so no rank is left waiting
at a barrier.  A run is named by ``MLCD_RUN_KEY`` when set (a process that holds a lock sets it
for its children: ``mlcd pipeline``'s stages share the pipeline's locks), else under
torchrun / srun by ``MASTER_ADDR:MASTER_PORT`` and torchrun's run id (the same on every rank
and node of a job, different between two jobs alive at once), else by host and pid.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from mlcd_core.errors import MLCDError

LOCK_NAME = ".mlcd.lock"
RUN_KEY_VAR = "MLCD_RUN_KEY"
WAIT_VAR = "MLCD_LOCK_WAIT"
MAX_LOCK_BYTES = 64 << 10


class LockHeld(MLCDError):
    """Another run holds the output's lock (or its lock file cannot be read)."""


@dataclass
class Lock:
    """What :func:`output_lock` yields: the lock file, whether this process created it (and
    will delete it), and the JSON it holds."""
    path: Path
    owner: bool
    holder: dict = field(default_factory=dict)
    _fd: Optional[int] = None
    _set_env: bool = False
    _made_dir: bool = False  # the output folder did not exist before: removed on release if left empty


# The locks this process created, by fd.  A forked child (a DataLoader worker of the trainer)
# inherits the fd, and with it a share in the flock: a rank 0 killed with SIGKILL then left its
# lock flocked by its orphaned workers for the seconds they take to notice, and torchrun's
# restart of the group found it held ("another run writes here", a CI failure).  Each forked
# child closes its copies at once; the parent's flock is not touched by that.
_HELD: dict[int, "Lock"] = {}


def _close_held_in_child() -> None:
    for fd, lock in list(_HELD.items()):
        with contextlib.suppress(OSError):
            os.close(fd)
        lock._fd, lock.owner = None, False  # a release() in the child deletes nothing
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_in_child)


def lock_path(target: str | os.PathLike, beside: bool = False) -> Path:
    """The lock file of output ``target`` (see the module docstring)."""
    t = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    return t.parent / f".{t.name}{LOCK_NAME}" if beside else t / LOCK_NAME


def _host() -> str:
    return socket.gethostname()


def _pid_start(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (Linux), None elsewhere/unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("utf-8", "replace")
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _rank_world() -> tuple[int, int]:
    """(rank, world size) as :func:`mlcd_core.dist.world_from_env` reads them (torchrun's
    variables, or SLURM's inside an srun step), without importing torch."""
    def num(*names):
        for n in names:
            v = os.environ.get(n, "").strip()
            if v.lstrip("-").isdigit():
                return int(v)
        return None

    rank, world = num("RANK"), num("WORLD_SIZE")
    step = os.environ.get("SLURM_STEP_ID", "").strip()
    if rank is None and step.isdigit() and int(step) < 0xFFFFFFF0 and os.environ.get("MASTER_ADDR"):
        rank, world = num("SLURM_PROCID"), num("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    return rank or 0, world or 1


def run_key() -> str:
    """The name of this run, shared by all its ranks (see the module docstring)."""
    key = os.environ.get(RUN_KEY_VAR)
    if key:
        return key
    _, world = _rank_world()
    if world > 1:
        return (f"dist:{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:"
                f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}")
    return f"proc:{_host()}:{os.getpid()}:{_pid_start(os.getpid())}"


def _since(holder: dict) -> str:
    t = holder.get("started_unix")
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "an unknown time"
    try:
        when = datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "an unknown time"
    age = max(0, int(time.time() - t))
    return f"{when} ({age // 3600}h{age % 3600 // 60:02d}m ago)"


def describe_holder(holder: dict) -> str:
    """``pid P on host H (`mlcd train ...`, since ...)`` from a lock's JSON (any types)."""
    argv = holder.get("argv")
    cmd = " ".join(str(a) for a in argv) if isinstance(argv, list) else str(holder.get("stage", "?"))
    if len(cmd) > 160:
        cmd = cmd[:157] + "..."
    cmd = cmd.encode("ascii", "backslashreplace").decode("ascii")  # a strict stdout takes it
    host = str(holder.get("host", "?"))[:100].encode("ascii", "backslashreplace").decode("ascii")
    stage = str(holder.get("stage", "?"))[:40].encode("ascii", "backslashreplace").decode("ascii")
    return f"pid {str(holder.get('pid', '?'))[:20]} on host {host} (mlcd {stage}: `{cmd}`, since {_since(holder)})"


def _read_holder(path: Path) -> Optional[dict]:
    """The lock's JSON; None if the file is gone.  An unreadable lock is a LockHeld naming it
    (a lock is never taken over on a guess)."""
    from mlcd_core.io import UnsafeFile, read_regular

    try:
        data = read_regular(path, MAX_LOCK_BYTES, "lock file")
    except FileNotFoundError:
        return None
    except (UnsafeFile, OSError) as exc:
        raise LockHeld(f"{path}: cannot read this lock file ({getattr(exc, 'reason', None) or exc}); if no run "
                       f"is writing to {path.parent}, delete it and run again") from None
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        holder = None
    if not isinstance(holder, dict):
        raise LockHeld(f"{path}: not a lock file written by mlcd (not a JSON object); if no run is writing to "
                       f"{path.parent}, delete it and run again")
    return holder


def _flock_free(fd: int, exclusive: bool) -> Optional[bool]:
    """Try a non-blocking flock on ``fd``: True if taken, False if someone holds it, None if
    the filesystem has no flock."""
    import fcntl

    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL: no flock here


def _pid_alive(pid: int, start) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    except (OverflowError, ValueError):
        return False
    now = _pid_start(pid)
    return not (isinstance(start, int) and now is not None and now != start)  # a reused pid is not the holder


def _is_stale(holder: dict, flock_free: Optional[bool]) -> bool:
    """True only when the holder is certainly gone: this host, pid dead (or reused), flock free."""
    if flock_free is False:
        return False
    pid = holder.get("pid")
    if holder.get("host") != _host() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    return not _pid_alive(pid, holder.get("pid_start"))


def _refusal(target: Path, path: Path, holder: dict) -> LockHeld:
    who = describe_holder(holder)
    if holder.get("host") != _host():
        return LockHeld(f"{target}: another run writes here: {who}, on another host than this one "
                        f"({_host()}); wait for it to finish or pick another output; if that run is gone, "
                        f"delete {path} and run again")
    return LockHeld(f"{target}: another run writes here: {who}; wait for it to finish or pick another output "
                    f"(lock file {path})")


def _create(path: Path, holder: dict) -> Optional[int]:
    """Create the lock atomically (temporary file + link); its fd (flocked where possible), or
    None if the lock exists."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        os.write(fd, (json.dumps(holder, indent=1) + "\n").encode("utf-8"))
        os.fsync(fd)
        _flock_free(fd, exclusive=True)  # held for the run's life (no-op where unsupported)
        try:
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)
            fd = None
        return fd
    except BaseException:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _command(argv: Optional[list]) -> list:
    if argv is not None:
        return [str(a) for a in argv]
    args = [str(a) for a in sys.argv]
    if args:
        args[0] = os.path.basename(args[0]) or args[0]  # .../bin/mlcd -> mlcd
    return args


def _say(stage: str, msg: str) -> None:
    print(f"mlcd {stage}: {msg}".encode("ascii", "backslashreplace").decode("ascii"), file=sys.stderr, flush=True)


def acquire(target: str | os.PathLike, stage: str, *, beside: bool = False,
            argv: Optional[list] = None) -> Lock:
    """Take (or, on a rank other than 0, join) the lock of output ``target``; see
    :func:`output_lock`, which also releases it."""
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(target))))
    path = lock_path(target, beside)
    folder = path.parent
    made = False
    try:
        if not beside:
            if target.exists() and not target.is_dir():
                raise MLCDError(f"{target}: exists and is not a folder; the output must be a folder")
            made = not target.exists()
            target.mkdir(parents=True, exist_ok=True)
        elif not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MLCDError(f"{target}: cannot create the output folder ({exc.strerror or exc})") from None
    key = run_key()
    rank, _ = _rank_world()
    if rank != 0:
        return _join(target, path, key)
    me = {"pid": os.getpid(), "host": _host(), "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"), "started_unix": time.time(), "stage": stage,
          "argv": _command(argv), "run": key,
          "pid_start": _pid_start(os.getpid()), "cwd": os.getcwd()}
    for _ in range(20):
        fd = _create_or_fail(target, path, me)
        if fd is not None:
            return _owned(path, me, fd, key, made)
        holder = _read_holder(path)
        if holder is None:
            continue  # released meanwhile: try again
        if holder.get("run") == key and not _is_stale(holder, None):
            return Lock(path, False, holder)  # this run's own lock (a pipeline's stage, a rank)
        try:
            probe = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            continue
        try:
            if not _is_stale(holder, _flock_free(probe, exclusive=True)):
                raise _refusal(target, path, holder)
            if not _same_file(probe, path):
                continue  # another run took it over meanwhile
            if holder.get("run") != key:  # (a torchrun restart of this run takes its own lock back quietly)
                _say(stage, f"{path}: taking over a stale lock of {describe_holder(holder)}: that process is no "
                            "longer running")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            # the old file stays flocked by us until the new one exists: a second run taking
            # over at the same time cannot delete ours (its inode check above fails)
            fd = _create_or_fail(target, path, me)
            if fd is not None:
                return _owned(path, me, fd, key, made)
        finally:
            os.close(probe)
    raise LockHeld(f"{target}: could not take the lock {path} (it kept changing hands); try again")


def _create_or_fail(target: Path, path: Path, me: dict) -> Optional[int]:
    try:
        return _create(path, me)
    except OSError as exc:
        raise MLCDError(f"{target}: cannot write the lock file {path} ({exc.strerror or exc}); is the output "
                        "writable?") from None


def _owned(path: Path, me: dict, fd: int, key: str, made: bool = False) -> Lock:
    lock = Lock(path, True, me, fd)
    lock._made_dir = made
    _HELD[fd] = lock
    if not os.environ.get(RUN_KEY_VAR):
        os.environ[RUN_KEY_VAR] = key  # children of this run (a pipeline's stages) share its locks
        lock._set_env = True
    return lock


def _join(target: Path, path: Path, key: str) -> Lock:
    """A rank other than 0: wait until rank 0's lock (our run key) is there; stop at once if
    another run that is not certainly dead holds it (rank 0 refuses it too)."""
    try:
        wait_s = float(os.environ.get(WAIT_VAR, "120"))
    except ValueError:
        wait_s = float("nan")
    if not 0 <= wait_s < float("inf"):  # nan or inf: a rank would wait for ever
        raise MLCDError(f"environment variable {WAIT_VAR}={os.environ.get(WAIT_VAR)!r}: expected a finite "
                        "number of seconds >= 0")
    deadline = time.monotonic() + wait_s
    while True:
        holder = _read_holder(path)
        if holder is not None:
            if holder.get("run") == key:
                return Lock(path, False, holder)
            if not _is_stale(holder, None):  # no flock probe here: it would look like a holder to rank 0
                raise _refusal(target, path, holder)
        if time.monotonic() > deadline:
            raise LockHeld(f"{target}: rank 0 did not take the lock {path} within {wait_s:g} s "
                           f"({WAIT_VAR}); is rank 0 running this stage with the same output?")
        time.sleep(0.1)


def release(lock: Lock) -> None:
    """Delete the lock file if this process created it (and it is still ours), and the output
    folder too if taking the lock created it and the run left it empty (a run refused by its
    own checks leaves no trace)."""
    if not lock.owner or lock._fd is None:
        return
    try:
        if _same_file(lock._fd, lock.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock.path)
            if lock._made_dir:
                with contextlib.suppress(OSError):  # not empty: the run's output stays
                    os.rmdir(lock.path.parent)
    finally:
        _HELD.pop(lock._fd, None)
        with contextlib.suppress(OSError):
            os.close(lock._fd)
        lock._fd = None
        if lock._set_env and os.environ.get(RUN_KEY_VAR) == lock.holder.get("run"):
            del os.environ[RUN_KEY_VAR]


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, stage: str, *, beside: bool = False,
                argv: Optional[list] = None) -> Iterator[Lock]:
    """Hold the lock of output ``target`` for the block (module docstring): a second run into
    the same output gets a :class:`LockHeld` naming the holder; the lock is released when the
    block ends, normally or not.  ``beside``: the output is a file, or a folder replaced as a
    whole, and the lock sits next to it."""
    lock = acquire(target, stage, beside=beside, argv=argv)
    try:
        yield lock
    finally:
        release(lock)


__all__ = ["output_lock", "acquire", "release", "lock_path", "run_key", "describe_holder", "LockHeld", "Lock",
           "LOCK_NAME"]
