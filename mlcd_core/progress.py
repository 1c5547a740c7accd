"""Progress bars with rate and ETA (tqdm), shown on rank 0 only and never in quiet mode."""
from __future__ import annotations

import os
import sys


def progress(iterable=None, *, total=None, desc=None, unit="img", rank: int | None = None, disable=None, **kw):
    """A tqdm bar: ``unit``/s and ETA; silent on ranks other than 0 and when MLCD_QUIET=1."""
    from tqdm.auto import tqdm

    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if disable is None:
        disable = rank != 0 or os.environ.get("MLCD_QUIET", "0") == "1"
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                mininterval=1.0, disable=disable, file=sys.stderr, **kw)
