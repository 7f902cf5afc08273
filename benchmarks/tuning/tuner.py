"""A tuning run: every problem within the time budget, in order; tune.json and the table rewritten after
each problem, so that a run cut short (its budget, SIGINT, an error) keeps every problem it decided."""
from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from sage_fast.ops import launch

from ..records import now_utc, write_json
from .candidates import GRID_FILE, filtered_grid, heuristic, load_grid_file
from .measure import (CONFIRM_ROUNDS, CONFIRM_TOP, GATE_LIMITS, MIN_MARGIN, Budget, DataCache, KernelRunner,
                      ProblemResult, tune_problem)
from .precompile import Precompiler
from .problems import DEFAULT_SMS, Problem
from .table import NOTE, evidence, merge_table, versions


def run(problems: Sequence[Problem], out_dir: Path, budget_s: float, table_out: Path,
        base_table: Optional[Path] = None, grid_path: Optional[Path] = GRID_FILE, workers: int = 0,
        device=None, max_candidates: Optional[int] = None, measure_s: float = 0.02,
        log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> dict:
    """Tune `problems` within budget_s seconds; write out_dir/tune.json and the table to table_out.
    Returns the log's content."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = Budget(budget_s, clock=clock)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device_name, sms = launch.device_info(device)
    if device.type != "cuda":
        device_name, sms = "cpu (interpreter)", DEFAULT_SMS
    base_entries = launch.read_table(base_table if base_table is not None else launch.TABLE_PATH)
    grid_data = load_grid_file(grid_path) if grid_path else None
    run_versions = versions()
    meta = {"device": device_name, "sms": sms, "budget_s": budget_s, "started_at": now_utc(), **run_versions,
            "grid_file": str(grid_path) if grid_data else None, "min_margin": MIN_MARGIN,
            "gate_limits": {str(k).replace("torch.", ""): v for k, v in GATE_LIMITS.items()},
            "timing": "median of CUDA-event times of single launches, L2 flushed before each (benchmarks.timing.median_time)"
            if device.type == "cuda" else "host clock (Triton interpreter: a test of the code, not a measurement)"}
    results: List[ProblemResult] = [ProblemResult(p, p.key(device_name), heuristic(p, sms)) for p in problems]
    plans = {}
    for r in results:
        cands, rejected = filtered_grid(r.problem, sms, grid_data)
        current = {e.kernel: e for e in base_entries if e.key == r.key and e.kernel == r.problem.kernel}
        if r.problem.kernel in current and current[r.problem.kernel].config not in cands:
            cands = [cands[0], current[r.problem.kernel].config] + cands[1:]  # re-time the committed entry
        if max_candidates:
            cands = cands[:max_candidates]
        plans[r.problem] = (cands, rejected)

    pre = None
    if device.type == "cuda" and workers > 0:
        try:
            pre = Precompiler(workers)
            for r in results:
                pre.submit(r.problem, plans[r.problem][0])
        except Exception as exc:  # noqa: BLE001 - compile in the main process instead
            log(f"precompile pool not started ({type(exc).__name__}: {exc}); compiling in the main process")
            pre = None

    def write(final: bool) -> dict:
        content = {**meta, "elapsed_s": round(budget.elapsed(), 1), "final": final,
                   "precompile": pre.stats() if pre else None,
                   "problems": [r.to_json() for r in results]}
        if grid_data is None:
            content["note"] = "no pre-filtered grid file: the unfiltered grid was tried"
        write_json(out_dir / "tune.json", content)
        entries = merge_table(base_entries, results, device_name, lambda r: evidence(r, run_versions))
        launch.write_table(table_out, entries, note=NOTE)
        return content

    try:
        cache = DataCache(device, sms)
        for i, r in enumerate(results):
            p = r.problem
            share = budget.share(len(results) - i)
            if share < 1.0:
                r.status = "skipped: out of time budget"
                continue
            deadline = budget.clock() + share
            cands, rejected = plans[p]
            gpu = device.type == "cuda"

            def wait(c, p=p, deadline=deadline):
                return pre.wait(p, c, timeout=deadline - budget.clock()) if pre else None

            wait(r.heuristic)
            if p.kernel != "loss":  # the intermediates come from the forward and dx heuristics
                wait(heuristic(dataclasses.replace(p, kernel="fwd"), sms))
                wait(heuristic(dataclasses.replace(p, kernel="dx"), sms))
            runner = KernelRunner(p, device, cache.get(p), measure_s=measure_s, min_reps=5 if gpu else 1,
                                  warmup=2 if gpu else 0)
            if not gpu:
                runner.estimate_reps = 1
            try:
                done = tune_problem(p, runner, r.heuristic, cands, deadline, budget.clock, wait, sms, log, r.key,
                                    confirm_top=CONFIRM_TOP if gpu else 1, confirm_rounds=CONFIRM_ROUNDS if gpu else 1)
            except Exception as exc:  # noqa: BLE001 - e.g. a CUDA error: the context may be unusable, stop here
                r.status = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
                meta["error"] = traceback.format_exc()[-3000:]
                log(f"{p.name}: {r.status}; stopping (the problems decided so far are kept)")
                break
            done.candidates += [{"config": {"compile_key": k}, "status": "rejected by the sm_90 prefilter",
                                 "error": v} for k, v in rejected.items()]
            results[i] = done
            runner.release()
            write(final=False)
    except KeyboardInterrupt:
        log("interrupted: writing what was decided")
    finally:
        if pre:
            pre.close()
    content = write(final=True)
    n_win = sum(1 for r in results if r.decision is not None and r.decision.winner is not None)
    log(f"tuning: {sum(r.status.startswith('decided') for r in results)} of {len(results)} problems decided, "
        f"{n_win} winners, {budget.elapsed():.0f} s; log {out_dir / 'tune.json'}, table {table_out}")
    return content
