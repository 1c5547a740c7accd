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
    stderr (no traceback) and gives status 2; otherwise main's return value (None = 0)."""
    try:
        rc = main(list(argv))
    except MLCDError as exc:
        print(f"mlcd {name}: error: {exc}", file=sys.stderr)
        return 2
    if "torch.distributed" in sys.modules:  # the stage is done on every rank: its group goes now,
        from mlcd_core.dist import cleanup  # not in interpreter teardown (mlcd_core/dist.py)

        cleanup()
    return int(rc or 0)
