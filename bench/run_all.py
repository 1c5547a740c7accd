"""Run every benchmark of the project and print one table of measured ratios.

    python -m bench.run_all            # full settings (minutes)
    python -m bench.run_all --quick    # reduced sizes, a quick look
    python -m bench.run_all --only reader,cluster

Discovers ``bench/bench_*.py``, calls each module's ``run(quick)`` and prints all the rows
with :func:`bench.common.format_table`.  A benchmark that raises gets one row carrying its
error, and the runner goes on with the next one.  Exit status: 0 when every benchmark ran
and no row missed its target, 1 otherwise.  ``--json FILE`` also saves the rows.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from bench.common import format_table

BENCH_DIR = Path(__file__).resolve().parent


def discover(only: list[str] | None = None) -> list[str]:
    """Benchmark names (``bench_<name>.py`` -> ``name``), sorted; ``only`` filters by name (an
    unknown name is a ValueError naming it)."""
    names = sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in only]
    return names


def run_one(name: str, quick: bool) -> list[dict]:
    """The rows of one benchmark; an exception becomes a single row naming the error."""
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"bench.bench_{name}")
        rows = list(module.run(quick=quick))
        if not rows:
            raise RuntimeError("run() returned no rows")
        return rows
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one failing benchmark (or an argparse
        # exit inside a stage's main) must not stop the others or lose the table
        traceback.print_exc(file=sys.stderr)
        msg = f"FAILED after {time.perf_counter() - t0:.1f}s: {type(exc).__name__}: {exc}"
        return [{"benchmark": name, "metric": "error", "ours": None, "reference": None,
                 "reference_name": "", "ratio": None, "target": "", "ok": False,
                 "note": msg.replace("\n", " ")[:200]}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="reduced sizes and repeats (each module's run(quick=True))")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (bench_<name>.py) to run")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    try:
        names = discover(only)
    except ValueError as exc:
        parser.error(f"argument --only: {exc}")
    if args.json:  # checked before minutes of benchmarks, not when the table is ready to be saved
        import os

        parent = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or (os.path.exists(parent) and not os.path.isdir(parent)):
            parser.error(f"argument --json: {args.json} is a folder, or its parent is not one; give a file path")
    if not names:
        print("bench.run_all: no bench/bench_*.py module found", file=sys.stderr)
        return 1
    rows: list[dict] = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        got = run_one(name, args.quick)
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        rows.extend(got)
    print(format_table(rows))
    if args.json:
        from mlcd_train.utils.io import atomic_save_json

        try:
            atomic_save_json(args.json, rows)  # atomic: a failed write leaves an older file whole
        except OSError as exc:
            print(f"bench.run_all: error: --json {args.json}: cannot write ({exc.strerror or exc})", file=sys.stderr)
            return 2
    return 0 if all(r.get("ok") is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
