"""A stage's ``main(argv)`` run as a command: user errors become one line and status 2.

Every stage module ends with::

    if __name__ == "__main__":
        sys.exit(run_main("embed", main, sys.argv[1:]))

so ``python -m clustering.embed`` reports errors exactly as ``mlcd embed`` does.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from mlcd_core.errors import MLCDError


def run_main(name: str, main: Callable[[Optional[list]], Optional[int]], argv: Sequence[str]) -> int:
    """Call ``main(list(argv))``; an :class:`MLCDError` is printed as ``mlcd NAME: error: MSG`` on
    stderr (no traceback) and gives status 2; otherwise main's return value (None = 0).  A
    torch.distributed process group that the stage created is destroyed when it returns (one
    that existed before the call is the caller's and stays)."""
    had_group = _group_exists()
    try:
        rc = main(list(argv))
    except MLCDError as exc:
        print(f"mlcd {name}: error: {exc}", file=sys.stderr)
        return 2
    if not had_group and _group_exists():  # the group the stage made goes now that this rank is
        from mlcd_core.dist import cleanup   # done, not in interpreter teardown (mlcd_core/dist.py)

        try:
            cleanup()
        except Exception as exc:  # noqa: BLE001 - the stage's outputs are written; say so, do not fail
            print(f"mlcd {name}: warning: destroying the process group failed ({exc})", file=sys.stderr)
    return int(rc or 0)


def _group_exists() -> bool:
    if "torch.distributed" not in sys.modules:  # no torch import for a stage that never needed it
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
