"""The candidates of a problem: the heuristic of `sage_fast.ops.launch` (the baseline to beat) and a small
grid of launch configurations around it, nearest first; the grid file pre-filtered for sm_90.

`grid.json` (beside this file, committed) holds, per GPU problem, the compile keys that passed the sm_90
prefilter (`python -m benchmarks.tuning prefilter`) and those rejected with the reason; the GPU run tries
only the passed ones (`filtered_grid`). `benchmarks/test_tuning.py` fails when the file no longer matches
the generator.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Optional, Sequence

from sage_fast.ops import launch
from sage_fast.ops.launch import LossLaunch, RowLaunch, WeightGradLaunch, cdiv, next_pow2, row_block_h

from .problems import DEFAULT_SMS, Problem, config_to_json

GRID_FILE = Path(__file__).resolve().with_name("grid.json")
GRID_FORMAT = 1


def dw_split(p: Problem, block_m: int, block_d: int, block_h: int, sms: int, waves: int) -> int:
    """The weight-gradient kernel's split-K factor for about `waves` waves of programs on `sms` SMs (the
    heuristic's rule at waves = 2), at most one row block per split."""
    tiles = cdiv(p.d, block_d) * cdiv(row_block_h(p.h), block_h)
    return max(1, min(cdiv(p.rows, block_m), cdiv(waves * sms, tiles)))


def heuristic(p: Problem, sms: int = DEFAULT_SMS):
    """The configuration `sage_fast.ops.launch` gives without a tuned entry: the baseline to beat."""
    if p.kernel in ("fwd", "dx"):
        return launch.gpu_row_launch(p.d, p.h, p.torch_dtype)
    if p.kernel == "dw":
        return launch.gpu_weight_grad_launch(p.d, p.h, p.rows, sms)
    return launch.gpu_loss_launch(p.batch, p.classes)


def distance(a, b) -> float:
    """How far configuration a is from b: the sum of |log2| ratios of their fields (stages: 3 when None)."""
    total = 0.0
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name == "num_stages":
            va, vb = va or 3, vb or 3
        total += abs(math.log2(va) - math.log2(vb))
    return total


def _unique(configs) -> list:
    seen, out = set(), []
    for c in configs:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def grid(p: Problem, sms: int = DEFAULT_SMS) -> list:
    """Phase-1 candidates of problem p, the heuristic first, then nearest to it first (see the module doc)."""
    base = heuristic(p, sms)
    out = []
    if p.kernel in ("fwd", "dx"):
        bh = row_block_h(p.h)
        dmax = max(16, next_pow2(p.d))
        if bh >= 256:
            ms, ds = (16, 32), (16, 32, 64)
        elif bh >= 128:
            ms, ds = (16, 32, 64), (32, 64, 128)
        else:
            ms, ds = (32, 64, 128), (32, 64, 128)
        for m, d, w in itertools.product(ms, ds, (4, 8)):
            if d <= dmax and m * d <= 8192:
                out.append(RowLaunch(m, d, w))
    elif p.kernel == "dw":
        full = row_block_h(p.h)
        dmax = max(16, next_pow2(p.d))
        bhs = [b for b in (16, 32, 64, 128) if b <= min(full, 128)]
        bhs = [64, 128] if full >= 256 else bhs[-2:]
        for m, d, bh, w in itertools.product((32, 64, 128), (32, 64, 128), bhs, (4, 8)):
            if d <= dmax and d * bh <= 8192:
                out.append(WeightGradLaunch(m, d, bh, dw_split(p, m, d, bh, sms, 2), w))
    else:
        cmax = max(16, next_pow2(p.classes))
        widths = sorted({min(c, cmax) for c in (512, 1024, 2048, 4096)})
        for b, c, w in itertools.product((1, 2), widths, (2, 4, 8, 16)):
            if 4 <= b * c / (32 * w) <= 32:
                out.append(LossLaunch(b, c, w))
    stages = (1, 2) if p.kernel == "loss" else (1, 2, 4)
    out = sorted(_unique(out), key=lambda c: (distance(c, base), repr(c)))
    return _unique([base] + out + [dataclasses.replace(base, num_stages=s) for s in stages])


def split_variants(p: Problem, cfgs: Sequence[WeightGradLaunch], sms: int) -> list:
    """Phase 2 of the weight-gradient kernel: each tile of `cfgs` at one and at four waves of split."""
    out = []
    for c in cfgs:
        for waves in (1, 4):
            out.append(dataclasses.replace(c, split=dw_split(p, c.block_m, c.block_d, c.block_h, sms, waves)))
    return [c for c in _unique(out) if c not in cfgs]


def compile_key(kernel: str, cfg) -> str:
    """What the sm_90 prefilter decides on: the configuration without the split (a runtime argument)."""
    obj = config_to_json(cfg)
    if kernel == "dw":
        obj.pop("split")
    return json.dumps(obj, sort_keys=True)


def load_grid_file(path: Path = GRID_FILE) -> Optional[dict]:
    """The committed, pre-filtered grid (None when there is none)."""
    path = Path(path)
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("format") != GRID_FORMAT:
        raise ValueError(f"{path}: not a tuning grid of format {GRID_FORMAT}")
    return data


def filtered_grid(p: Problem, sms: int, grid_data: Optional[dict]) -> tuple[list, dict]:
    """(candidates to try, {compile key: reason} of those the sm_90 prefilter rejected).

    The heuristic always stays (it is what runs today). A candidate the grid file does not know (the
    generator changed since the prefilter ran) stays too; benchmarks/test_tuning.py fails in that case.
    """
    cands = grid(p, sms)
    if not grid_data or p.name not in grid_data.get("problems", {}):
        return cands, {}
    entry = grid_data["problems"][p.name]
    rejected = {r["key"]: r["reason"] for r in entry.get("rejected", [])}
    keep = [c for i, c in enumerate(cands) if i == 0 or compile_key(p.kernel, c) not in rejected]
    return keep, rejected
