"""Command line of the tuner: `python -m benchmarks.tuning run | prefilter | grid` (see the package's doc)."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch

from sage_fast.ops import launch

from ..records import write_json
from .candidates import GRID_FILE, filtered_grid, grid, load_grid_file
from .prefilter import prefilter
from .problems import DEFAULT_SMS, gpu_problems, smoke_problems
from .table import NOTE
from .tuner import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tuning",
                                     description="Tune the Triton kernels' launch configurations on this GPU.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="tune on this machine's GPU (CPU: the interpreter's smoke problems)")
    r.add_argument("--results", type=Path, required=True, help="folder for tune.json (and the table by default)")
    r.add_argument("--budget-s", type=float, default=150.0)
    r.add_argument("--table-out", type=Path, default=None, help="default: RESULTS/tuned_launch.json")
    r.add_argument("--base-table", type=Path, default=None, help="table to start from (default: the committed one)")
    r.add_argument("--grid", type=Path, default=GRID_FILE)
    r.add_argument("--workers", type=int, default=-1, help="compile workers (default: CPUs - 2, at most 14; 0: none)")
    r.add_argument("--smoke", action="store_true", help="the tiny interpreter problems (what a CPU run uses anyway)")
    r.add_argument("--max-candidates", type=int, default=None)
    pf = sub.add_parser("prefilter", help="compile the grid for sm_90 on this CPU, write the grid file")
    pf.add_argument("--out", type=Path, default=GRID_FILE)
    sub.add_parser("grid", help="print the problems and their candidate counts")
    args = parser.parse_args(argv)

    if args.cmd == "grid":
        data = load_grid_file()
        for p in gpu_problems():
            cands, rejected = filtered_grid(p, DEFAULT_SMS, data)
            print(f"{p.name:28s} {len(grid(p)):3d} candidates, {len(cands):3d} after the sm_90 prefilter")
        return 0
    if args.cmd == "prefilter":
        prefilter(args.out)
        return 0
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        from sage_fast.kernels import utils

        if not utils.INTERPRET:
            args.results.mkdir(parents=True, exist_ok=True)
            table_out = args.table_out or args.results / "tuned_launch.json"
            launch.write_table(table_out, launch.read_table(args.base_table or launch.TABLE_PATH), note=NOTE)
            write_json(args.results / "tune.json", {
                "device": "cpu", "final": True, "problems": [],
                "note": "no CUDA device: nothing tuned (set TRITON_INTERPRET=1 to run the interpreter's smoke "
                        "problems); the table is the committed one, unchanged"})
            print("tune: no CUDA device and Triton's interpreter is off: nothing tuned; the committed table copied to "
                  f"{table_out}")
            return 0
    problems = gpu_problems() if on_gpu and not args.smoke else smoke_problems()
    workers = args.workers if args.workers >= 0 else max(0, min(14, (os.cpu_count() or 2) - 2))
    run(problems, args.results, args.budget_s, args.table_out or args.results / "tuned_launch.json",
        base_table=args.base_table, grid_path=args.grid, workers=workers if on_gpu else 0,
        max_candidates=args.max_candidates if (on_gpu or args.max_candidates) else 4)
    if on_gpu and workers:
        # Everything is written. Leave at once: the interpreter's exit would join the compile pool's
        # threads, and a worker stuck in a compile must not hold the stage until its time limit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # pragma: no cover - interrupted before the run loop took over
        traceback.print_exc()
        sys.exit(130)
