"""Shared benchmark helpers.

Every ``bench/bench_<name>.py`` defines ``run(quick: bool = False) -> list[dict]`` and a
``main()`` that prints ``format_table(run())``.  A row is::

    {"benchmark": "reader", "metric": "images/s", "ours": 1234.0,
     "reference": 1300.0, "reference_name": "tarfile+PIL loop",
     "ratio": 0.95, "target": ">= 0.9", "ok": True, "note": "median of 5"}

``ratio`` is stated so that the target reads naturally (our rate / reference rate, or our
time / reference time); ``target`` says the bound (">= 0.9", "<= 1.05").
``python -m bench.run_all`` runs every module and prints one table.
Timings on a shared machine are noisy: report medians of several repeats.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(ratio: float, target: str) -> bool:
    op, value = target.split()
    value = float(value)
    return ratio >= value if op == ">=" else ratio <= value


def row(benchmark: str, metric: str, ours: float, reference: float, reference_name: str,
        ratio: float, target: str | None = None, note: str = "") -> dict:
    return {"benchmark": benchmark, "metric": metric, "ours": ours, "reference": reference,
            "reference_name": reference_name, "ratio": ratio, "target": target or "",
            "ok": None if not target else check(ratio, target), "note": note}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def format_table(rows: list[dict]) -> str:
    cols = ["benchmark", "metric", "ours", "reference", "reference_name", "ratio", "target", "ok", "note"]
    cells = [[_fmt(r.get(c, "")) if r.get(c) is not None else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def cli(run, doc: str, options: tuple = (), argv: list[str] | None = None) -> int:
    """The command line of a benchmark module whose ``run`` takes ``quick`` and ``repeats``, and
    keyword arguments for each extra ``(flag, argparse kwargs)`` in ``options``.  Numeric
    options are range-checked (mlcd_core.args); a stage's MLCDError is one line, status 2."""
    import argparse
    import os
    import sys

    from mlcd_core.args import positive_int
    from mlcd_core.errors import MLCDError

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=positive_int, default=None)
    extra = [p.add_argument(flag, **kw).dest for flag, kw in options]
    a = p.parse_args(argv)
    os.environ.setdefault("MLCD_QUIET", "1")
    try:
        rows = run(a.quick, a.repeats, **{name: getattr(a, name) for name in extra})
    except MLCDError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0
