"""Will the Partial FC shard of every rank fit?  Checked before it is allocated.

A labels folder's ``meta.json`` gives k, the number of class centres; the Partial FC shard
of a rank holds k/world of them, each ``embedding_size`` float32 values, with a gradient of
the same size and the AdamW optimiser's two moments (plus an int64 step count a row).  A
k that is wrong (a hand-edited or damaged meta.json, ``k: 2147483647``) would otherwise
end in an out-of-memory traceback from ``torch.empty``, or in a machine that swaps.

Every rank reports (host, device, free bytes, bytes its shard needs); every rank adds up the
shards that share one memory (the ranks of a host on the CPU, the ranks of a GPU) and takes
the same verdict, so all stop together with the same one-line message.
"""
from __future__ import annotations

import os
import socket

import torch

#: refuse a shard set that needs more than this share of the free memory (the backbone,
#: activations and the data loader need the rest)
MEMORY_SHARE = 0.9

#: float32 copies of the centres a rank holds: weight, gradient, AdamW's exp_avg and exp_avg_sq
PFC_COPIES = 4

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {_UNITS[-1]}"  # pragma: no cover


def pfc_bytes(num_local: int, embedding_size: int, copies: int = PFC_COPIES) -> int:
    """Bytes of a Partial FC shard of ``num_local`` centres: ``copies`` float32 [num_local, d]
    tensors and the optimiser's int64 step per row."""
    return int(num_local) * (int(embedding_size) * 4 * int(copies) + 8)


def _read_small(path: str) -> str | None:
    """A small /proc or /sys file's text (None when it is not there or not a regular file)."""
    from mlcd_core.errors import MLCDError
    from mlcd_core.io import read_regular

    try:
        return read_regular(path, 1 << 20, "memory").decode("ascii", "replace").strip()
    except (OSError, ValueError, MLCDError):
        return None


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None when there is no such file or line)."""
    text = _read_small(path)  # a regular file (of size 0 to stat); anything else is not read
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                return int(parts[1]) * (1024 if len(parts) > 2 and parts[2].lower() == "kb" else 1)
            except (IndexError, ValueError):
                return None
    return None


def _cgroup_free(root: str = "/sys/fs/cgroup") -> int | None:
    """What this process's memory cgroup still allows (a container's limit: v2 memory.max -
    memory.current, v1 memory.limit_in_bytes - memory.usage_in_bytes); None without a limit."""
    for limit_name, usage_name in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_small(os.path.join(root, limit_name)), _read_small(os.path.join(root, usage_name))
        if limit is None or usage is None or not limit.isdigit() or not usage.isdigit():
            continue  # "max", absent, or not numbers: no limit there
        if int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
            return None
        return max(0, int(limit) - int(usage))
    return None


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: CUDA's ``mem_get_info`` (free bytes of the
    GPU), on the CPU MemAvailable of /proc/meminfo (else the free physical pages), or less
    where a container's memory cgroup allows less; None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type != "cpu":
        return None
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    cg = _cgroup_free()
    return avail if cg is None else min(avail, cg)


def _machine() -> str:
    """Which memory a CPU rank shares with others: the kernel's boot id (two containers on one
    machine share it whatever their host names; two machines never do), else the host name."""
    return _read_small("/proc/sys/kernel/random/boot_id") or socket.gethostname()


def _gpu_uuid(index: int) -> str | None:
    """A GPU's UUID: its identity beyond this process's index (a rank that sees one GPU through
    CUDA_VISIBLE_DEVICES calls it cuda:0 like every other rank of the node)."""
    try:
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    except (RuntimeError, AssertionError, ValueError):
        return None
    return str(uuid) if uuid else None


def memory_record(num_local: int, embedding_size: int, device: torch.device) -> dict:
    """What one rank reports: where its shard lives, what is free there and what it needs."""
    device = torch.device(device)
    machine = _machine()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        where, uuid = f"cuda:{index}", _gpu_uuid(index)
        memory = f"gpu:{uuid}" if uuid else f"{machine}:{where}"
    else:
        where = str(device)
        memory = f"{machine}:{where}"
    return {"host": socket.gethostname(), "memory": memory, "device": where, "free": free_bytes(device),
            "need": pfc_bytes(num_local, embedding_size), "num_local": int(num_local)}


def memory_verdict(records: list[dict], num_classes: int, embedding_size: int, source: str,
                   share: float = MEMORY_SHARE) -> str | None:
    """None when the shards fit, else the one-line refusal (the same on every rank, given
    the same ``records``: rank r's record at index r).  ``source`` names where k came from
    (the labels' meta.json and key, or a config key)."""
    groups: dict[tuple, list[int]] = {}
    for r, rec in enumerate(records):
        # one memory: a GPU by its UUID, the CPU by the machine (boot id) its ranks run on
        groups.setdefault(rec.get("memory") or f"{rec['host']}:{rec['device']}", []).append(r)
    for ranks in groups.values():
        host, dev = records[ranks[0]]["host"], records[ranks[0]]["device"]
        free = min((records[r]["free"] for r in ranks if records[r]["free"] is not None), default=None)
        if free is None:
            continue  # cannot tell (another accelerator, no /proc): the allocation will say
        need = sum(records[r]["need"] for r in ranks)
        if need <= share * free:
            continue
        per = max(records[r]["num_local"] for r in ranks)
        on = (f"ranks {', '.join(map(str, ranks))} (sharing {dev} of host {host})" if len(ranks) > 1
              else f"rank {ranks[0]} ({dev} of host {host})")
        fix = ("the labels folder is wrong (k is the number of centres `mlcd cluster` made; check its meta.json)"
               if "meta.json" in source else "k is too large for this memory")
        more = max(1, -(-pfc_bytes(num_classes, embedding_size) // max(1, int(share * free))))  # ranks of this memory
        return (f"{source}: k={num_classes} classes need {human_bytes(need)} of Partial FC centres on {on}: "
                f"{per} classes x {embedding_size} dims x 4 bytes x {PFC_COPIES} (weight, gradient, AdamW's "
                f"2 moments), more than {share:.0%} of the {human_bytes(free)} free there. Either {fix}, "
                f"or train on more ranks with their own memory (about {more} for this k)")
    return None


def check_pfc_memory(num_classes: int, embedding_size: int, info, source: str,
                     gather=None) -> None:
    """Raise the same MLCDError on every rank when some rank's Partial FC shard would not fit
    (see :func:`memory_verdict`).  ``gather(obj) -> list`` collects one object per rank (a
    collective; the identity for one process)."""
    from mlcd_core.errors import MLCDError
    from mlcd_train.partial_fc import class_range

    world = max(1, int(info.world_size))
    if num_classes < world:
        return  # the Partial FC refuses this itself, by name
    _, num_local = class_range(int(num_classes), world, int(info.rank))
    rec = memory_record(num_local, embedding_size, info.device)
    records = gather(rec) if gather is not None else [rec]
    msg = memory_verdict(records, num_classes, embedding_size, source)
    if msg:
        raise MLCDError(msg)
