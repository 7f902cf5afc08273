"""The table a tuning run writes: the committed `sage_fast/ops/tuned_launch.json` with this device's decided
keys replaced (a winner's entry with its evidence, or no entry where the heuristic held), written with
`sage_fast.ops.launch.write_table`, the format `launch.py` reads."""
from __future__ import annotations

import json
import statistics
from typing import Callable, List, Sequence

import torch

from sage_fast.ops import launch

from ..environment import git_commit, package_version
from ..records import now_utc
from .measure import ProblemResult
from .problems import config_to_json

NOTE = ("Tuned Triton launch configurations, read by sage_fast/ops/launch.py at import. Written by "
        "`python -m benchmarks.tuning run` (stage 'tune' of benchmarks/run_gpu.sh) on a GPU; an entry is kept "
        "only when it beat the heuristic by more than the measured noise (its evidence says by how much).")


def versions() -> dict:
    """What an entry's evidence names: torch, Triton and the commit of the code that measured it."""
    return {"torch": torch.__version__, "triton": package_version("triton"), "commit": git_commit()}


def evidence(r: ProblemResult, versions: dict) -> dict:
    """A winner's evidence: its and the heuristic's median times, the speedup and noise, the shape, when."""
    d = r.decision
    base_t = statistics.median(r.base_times)
    win_t = statistics.median(r.confirm[json.dumps(config_to_json(d.winner))])
    shape = {"rows": r.problem.rows} if r.problem.kernel != "loss" else {"batch": r.problem.batch}
    return {"time_us": round(win_t * 1e6, 2), "heuristic_us": round(base_t * 1e6, 2),
            "speedup": round(d.speedup, 4), "noise": round(d.noise, 4), **shape,
            "measured_at": now_utc(), **versions}


def merge_table(base: Sequence[launch.TunedEntry], results: Sequence[ProblemResult], device_name: str,
                evidence: Callable[[ProblemResult], dict]) -> List[launch.TunedEntry]:
    """`base` with the decided problems' keys replaced: the winner's entry, or none (the heuristic)."""
    decided = {(r.problem.kernel, r.key) for r in results if r.decision is not None and r.status.startswith("decided")}
    out = [e for e in base if (e.kernel, e.key) not in decided]
    for r in results:
        if (r.problem.kernel, r.key) in decided and r.decision.winner is not None:
            out.append(launch.TunedEntry(r.problem.kernel, r.key, r.decision.winner, evidence(r)))
    return out
