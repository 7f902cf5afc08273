"""The sm_90 prefilter of the tuning grid, on a CPU: compile every candidate of every GPU problem for sm_90
(`compile_sm90`, a child process), keep those that compile without register spills and within sm_90's
shared memory, and write the grid file (`candidates.GRID_FILE`) that the GPU run reads.

    python -m benchmarks.tuning prefilter    # about 3 minutes on 2 cores
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sage_fast.utils.files import atomic_write_text

from ..records import now_utc
from . import compile_sm90
from .candidates import GRID_FILE, GRID_FORMAT, compile_key, grid
from .problems import DEFAULT_SMS, Problem, config_to_json, gpu_problems


def grid_items(problems: Sequence[Problem], sms: int = DEFAULT_SMS) -> List[dict]:
    """One compile item per (problem, distinct compile key) of the grid, labelled 'problem | key'."""
    items = []
    for p in problems:
        seen = set()
        for c in grid(p, sms):
            key = compile_key(p.kernel, c)
            if key in seen:
                continue
            seen.add(key)
            item = {"label": f"{p.name} | {key}", "kernel": p.kernel, "dtype": p.dtype, "config": config_to_json(c)}
            item.update({"classes": p.classes, "fit": p.fit} if p.kernel == "loss" else {"d": p.d, "r": p.r})
            items.append(item)
    return items


def classify(report: dict, problems: Sequence[Problem], limits: dict) -> dict:
    """The grid file's content from the compile child's report: per problem, the compile keys that pass
    (compiled, spills <= limits['spill_bytes'], shared memory <= limits['shared_bytes']) and those rejected."""
    verdict: Dict[str, tuple] = {}
    for case in report["cases"]:
        if not case["ok"]:
            why = f"does not compile: {str(case['error'])[:200]}"
        elif case["shared"] is not None and case["shared"] > limits["shared_bytes"]:
            why = f"{case['shared']} bytes of shared memory > {limits['shared_bytes']}"
        elif case["spill_stores"] is not None and max(case["spill_stores"], case["spill_loads"]) > limits["spill_bytes"]:
            why = f"register spills {case['spill_stores']}/{case['spill_loads']} bytes ({case['registers']} registers)"
        else:
            why = None
        for label in case["labels"]:
            verdict[label] = (why, case)
    out = {}
    for p in problems:
        passed, rejected = [], []
        for item in grid_items([p]):
            why, case = verdict.get(item["label"], ("not compiled (no launch recorded)", {}))
            key = item["label"].split(" | ", 1)[1]
            info = {"key": key, "registers": case.get("registers"), "shared": case.get("shared"),
                    "spills": [case.get("spill_stores"), case.get("spill_loads")]}
            if why is None:
                passed.append(info)
            else:
                rejected.append({**info, "reason": why})
        out[p.name] = {"passed": passed, "rejected": rejected}
    return out


def prefilter(out_path: Path = GRID_FILE, problems: Optional[Sequence[Problem]] = None, log=print) -> dict:
    """Compile every grid candidate for sm_90 on this (CPU) machine; write the grid file."""
    problems = list(problems or gpu_problems())
    items = grid_items(problems)
    log(f"prefilter: compiling {len(items)} grid configurations for sm_90 (one process; ~1 s each)")
    with tempfile.TemporaryDirectory(prefix="sage-tune-prefilter-") as tmp:
        items_json = Path(tmp) / "items.json"
        items_json.write_text(json.dumps({"items": items}))
        proc, report = compile_sm90.run_child(Path(tmp), grid_path=items_json, timeout=None)
        if report is None:
            raise RuntimeError(f"compile child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if report.get("skip"):
        raise RuntimeError(report["skip"])
    limits = {"spill_bytes": compile_sm90.SPILL_TOLERANCE_BYTES, "shared_bytes": compile_sm90.SM90_MAX_SHARED_PER_BLOCK}
    content = {"format": GRID_FORMAT, "target": "sm_90", "sms": DEFAULT_SMS, "triton": report.get("triton"),
               "ptxas": report.get("ptxas"), "limits": limits, "generated_at": now_utc(),
               "compile_seconds": report.get("seconds"),
               "note": "Written by `python -m benchmarks.tuning prefilter` on a CPU: the tuning grid compiled for sm_90; "
                       "the GPU run tries the 'passed' configurations only (dw: any split).",
               "problems": classify(report, problems, limits)}
    atomic_write_text(out_path, json.dumps(content, indent=1) + "\n")
    n_pass = sum(len(v["passed"]) for v in content["problems"].values())
    log(f"prefilter: {n_pass} of {len(items)} pass; written {out_path}")
    return content
