"""Tuning of the Triton kernels' launch configurations on the GPU at hand (stage "tune" of run_gpu.sh).

    python -m benchmarks.tune run --results DIR [--budget-s 150] [--table-out PATH]   # on the GPU
    python -m benchmarks.tune prefilter       # CPU: compile the grid for sm_90, write benchmarks/tune_grid.json
    python -m benchmarks.tune grid            # print the problems and their candidate counts

**Problems** (`gpu_problems`, in this order, the most useful first): the adapter's forward, dx and
weight-gradient kernels at the benchmark's training shape (M = 128 x 197 token rows, d = 768, bf16
GEMM operands and activations, as under bf16 autocast, block epilogue) for r = 32, 256, 4, 8; then the
loss kernel at batch 512, fp32 logits (the model's), FIT on for C = 8142 and 1000, FIT off (the LA
loss alone) for C = 8142, with every gradient (training).

**Candidates** (`grid`): the heuristic of `sage_fast.ops.launch` first, then a small product of block
sizes and warps (row kernels: block_m x block_d x {4, 8} warps; weight gradients: block_m x block_d x
block_h x {4, 8} warps at the heuristic's two-waves split rule; loss: block_b x block_c x warps with 4
to 32 values per thread), and the heuristic's tile at other pipelining depths (num_stages). They are
tried nearest to the heuristic first (so a sweep cut short has covered its neighbourhood). The
weight-gradient kernel then tries one and four waves of split for its three best tiles. The grid is
pre-filtered on a CPU: `prefilter` compiles every candidate for sm_90 (tests/ops/test_kernels_compile.py
as a child process) and `benchmarks/tune_grid.json` keeps those that compile without register spills
and within sm_90's shared memory; the GPU run tries only those.

**Each candidate**, in a fixed order: compiled (ahead, in a pool of worker processes calling the JIT's
`warmup`, so that the main process finds the binaries in Triton's cache), run once on outputs poisoned
with NaN and compared with the heuristic's outputs on the same inputs (the correctness gate: relative
error per output <= 1e-2 for bf16 / fp16 tensors, 1e-3 for fp32, integers exact, partial sums reduced
first; a candidate that fails is rejected and never timed), then timed: the median of CUDA-event
times of single launches, each after an L2 flush (`benchmarks.harness.median_time`).

**Decision** (`decide`): the heuristic is timed at the start, middle and end of the sweep; the three
fastest candidates and the heuristic are then timed again in three interleaved rounds. The fastest
candidate wins only if its speedup over the heuristic (median times) is larger than the noise (the
spread, max - min over median, of the heuristic's and of its own repeated measurements) and than
`MIN_MARGIN` (3%). A winner becomes a table entry keyed by (device name, d, r, dtype) or (device name,
C, dtype, FIT); no winner removes the device's entry for that key (the heuristic stays).

**Budget** (`Budget`): the run stops measuring at --budget-s; each problem gets an equal share of
what is left when it starts (time a problem does not use passes to the next), and a sweep stops when
its share is spent, keeping what it measured; its confirmation rounds are kept inside the share.
SIGINT (run_gpu.sh's time limit) ends the run the same way. After every problem the log (tune.json)
and the table are rewritten, so a run cut short keeps every problem it decided.

**Output**: DIR/tune.json (every candidate: configuration, gate, time; the decisions) and the table:
the committed `sage_fast/ops/tuned_launch.json` with this device's decided keys replaced, written to
--table-out (default DIR/tuned_launch.json); run_gpu.sh exports it. It is not installed in the
running checkout: every stage of one run measures the committed table; commit the file and the next
run confirms it (it times the heuristic again, and the entry's configuration among the candidates).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from sage_fast.ops import launch
from sage_fast.ops.launch import LossLaunch, RowLaunch, WeightGradLaunch, cdiv, next_pow2, row_block_h

REPO_ROOT = Path(__file__).resolve().parent.parent
GRID_FILE = Path(__file__).resolve().with_name("tune_grid.json")
GRID_FORMAT = 1
COMPILE_CHILD = REPO_ROOT / "tests" / "ops" / "test_kernels_compile.py"

#: a candidate must beat the heuristic by more than this fraction (and more than the measured noise)
MIN_MARGIN = 0.03
#: candidates (besides the heuristic) re-timed in the confirmation rounds, and how many rounds
CONFIRM_TOP = 3
CONFIRM_ROUNDS = 3
#: the correctness gate: largest relative error against the heuristic's output, by output dtype
GATE_LIMITS = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
#: SMs assumed where no GPU says otherwise (H100 / H200 SXM: 132)
DEFAULT_SMS = 132

KERNELS = ("fwd", "dx", "dw", "loss")
CONFIG_TYPES = {"fwd": RowLaunch, "dx": RowLaunch, "dw": WeightGradLaunch, "loss": LossLaunch}

ALPHA, EPS, SCALE = 0.3, 1e-5, 0.8
LOSS_LAMBDAS = (0.015, 0.015, 0.4)
LOSS_S = (0.1, -0.05)


# ----------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class Problem:
    """One tuning target: a kernel at one shape. `dtype` is the GEMM operand (and activation) dtype of
    the adapter kernels, the logits dtype of the loss; both are torch dtype names."""

    kernel: str
    dtype: str
    d: int = 0
    r: int = 0
    rows: int = 0
    classes: int = 0
    batch: int = 0
    fit: bool = True

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    @property
    def name(self) -> str:
        if self.kernel == "loss":
            return f"loss C={self.classes} {'fit' if self.fit else 'la'} {self.dtype}"
        return f"{self.kernel} d={self.d} r={self.r} {self.dtype}"

    @property
    def h(self) -> int:
        return 2 * self.r

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key(self, device_name: str) -> tuple:
        """The tuned-table key of this problem on `device_name`."""
        if self.kernel == "loss":
            return (device_name, self.classes, self.torch_dtype, self.fit)
        return (device_name, self.d, self.r, self.torch_dtype)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Problem":
        return cls(**obj)


GPU_RANKS = (32, 256, 4, 8)  # ImageNet-LT (the end-to-end benchmark's r) first, then iNaturalist, CIFAR, Places
GPU_ROWS = 128 * 197
GPU_D = 768


def gpu_problems() -> List[Problem]:
    """The GPU run's problems, most useful first."""
    out = [Problem(k, "bfloat16", d=GPU_D, r=r, rows=GPU_ROWS) for r in GPU_RANKS for k in ("fwd", "dx", "dw")]
    out += [Problem("loss", "float32", classes=8142, batch=512, fit=True),
            Problem("loss", "float32", classes=1000, batch=512, fit=True),
            Problem("loss", "float32", classes=8142, batch=512, fit=False)]
    return out


def smoke_problems() -> List[Problem]:
    """Tiny problems for Triton's interpreter (CPU tests): fp32 operands (the interpreter's bf16 dots are wrong)."""
    return [Problem(k, "float32", d=64, r=4, rows=96) for k in ("fwd", "dx", "dw")] + [
        Problem("loss", "float32", classes=100, batch=8, fit=True)]


# ----------------------------------------------------------------------------------------------
# candidates


def config_to_json(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_json(kernel: str, obj: dict):
    return CONFIG_TYPES[kernel](**obj)


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


def _distance(a, b) -> float:
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
    out = sorted(_unique(out), key=lambda c: (_distance(c, base), repr(c)))
    return _unique([base] + out + [dataclasses.replace(base, num_stages=s) for s in stages])


def split_variants(p: Problem, cfgs: Sequence[WeightGradLaunch], sms: int) -> list:
    """Phase 2 of the weight-gradient kernel: each tile of `cfgs` at one and at four waves of split."""
    out = []
    for c in cfgs:
        for waves in (1, 4):
            out.append(dataclasses.replace(c, split=dw_split(p, c.block_m, c.block_d, c.block_h, sms, waves)))
    return [c for c in _unique(out) if c not in cfgs]


def _compile_key(kernel: str, cfg) -> str:
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
    generator changed since the prefilter ran) stays too; benchmarks/test_tune.py fails in that case.
    """
    cands = grid(p, sms)
    if not grid_data or p.name not in grid_data.get("problems", {}):
        return cands, {}
    entry = grid_data["problems"][p.name]
    rejected = {r["key"]: r["reason"] for r in entry.get("rejected", [])}
    keep = [c for i, c in enumerate(cands) if i == 0 or _compile_key(p.kernel, c) not in rejected]
    return keep, rejected


# ----------------------------------------------------------------------------------------------
# problem data and kernel launches (the same arguments as the glue: benchmarks/test_tune.py checks it)


def _kernels(p: Problem):
    if p.kernel == "loss":
        from sage_fast.kernels import la_loss

        return la_loss
    from sage_fast.kernels import sg_adapter

    return sg_adapter


def adapter_data(p: Problem, device, seed: int = 0, placeholder: bool = False, tensors: Optional[dict] = None):
    """The inputs of the adapter kernels for (d, r, rows, dtype), derived as the glue derives them from
    (x, mlp, dout, w_cat, b_cat, w_up, b_up, scale). `tensors` gives those (the consistency test);
    `placeholder`: 16-element CPU tensors of the right dtypes (enough for compiling: the JIT
    specialises on dtypes, alignment and integer values, not on sizes)."""
    from sage_fast.ops.sg_adapter import _dot_precision

    dt, m, d, h = p.torch_dtype, p.rows, p.d, p.h
    if placeholder:
        def mk(shape, dtype):
            return torch.empty(16, dtype=dtype)
        t = {"x": mk(0, dt), "mlp": mk(0, dt), "dout": mk(0, dt), "w_cat": mk(0, torch.float32),
             "b_cat": mk(0, torch.float32), "w_up": mk(0, torch.float32), "b_up": mk(0, torch.float32),
             "scale": torch.empty((), dtype=torch.float32)}
        ns = SimpleNamespace(**t, w_cat_c=mk(0, dt), w_up_t=mk(0, dt), w_cat_t=mk(0, dt), w_up_c=mk(0, dt),
                             wsum=mk(0, torch.float32))
    else:
        if tensors is None:
            gen = torch.Generator(device=device).manual_seed(seed)

            def randn(*shape, std=1.0, mean=0.0):
                return torch.randn(*shape, generator=gen, device=device) * std + mean

            tensors = {
                "x": randn(m, d).to(dt), "mlp": randn(m, d).to(dt), "dout": randn(m, d, mean=1.0).to(dt),
                "w_cat": randn(d, h, std=d ** -0.5), "b_cat": randn(h, std=0.5),
                "w_up": randn(d, h, std=h ** -0.5), "b_up": randn(d, std=0.1),
                "scale": torch.tensor(SCALE, device=device),
            }
        ns = SimpleNamespace(**tensors)
        ns.w_cat_c = ns.w_cat.to(dt).contiguous()
        ns.w_up_t = ns.w_up.t().to(dt).contiguous()
        ns.w_cat_t = ns.w_cat_c.t().contiguous()
        ns.w_up_c = ns.w_up.to(dt).contiguous()
        ns.wsum = ns.w_cat_c.float().sum(0)
        ns.b_cat = ns.b_cat.float().contiguous()
        ns.b_up = ns.b_up.float().contiguous()
        ns.scale = ns.scale.float()
    ns.rows, ns.d, ns.h, ns.slope, ns.eps = m, d, h, 1.0 - ALPHA, EPS
    ns.prec = _dot_precision(dt)
    ns.placeholder, ns.device = placeholder, ("cpu" if placeholder else device)
    return ns


def loss_data(p: Problem, device, seed: int = 0, placeholder: bool = False, tensors: Optional[dict] = None):
    """The loss kernel's inputs (training: every gradient), as `_fit_la_loss_forward` passes them."""
    from sage_fast.ops import compensated_log_prior

    from .harness import long_tailed_counts

    dt, b, c = p.torch_dtype, p.batch, p.classes
    if placeholder:
        ns = SimpleNamespace(z=torch.empty(16, dtype=dt), zv=torch.empty(16, dtype=dt), zt=torch.empty(16, dtype=dt),
                             target=torch.empty(16, dtype=torch.int64), log_prior=torch.empty(16),
                             s=torch.empty(16), n_valid=torch.empty(1, dtype=torch.int64))
    else:
        if tensors is None:
            gen = torch.Generator(device=device).manual_seed(seed)
            target = torch.randint(0, c, (b,), generator=gen, device=device)
            label = torch.nn.functional.one_hot(target, c).float()
            z, zv, zt = ((torch.randn(b, c, generator=gen, device=device) * 5 + 5 * label).to(dt) for _ in range(3))
            tensors = {"z": z, "zv": zv, "zt": zt, "target": target,
                       "log_prior": compensated_log_prior(long_tailed_counts(c)).to(device)}
        ns = SimpleNamespace(**tensors)
        ns.log_prior = ns.log_prior.to(device=device, dtype=torch.float32).contiguous()
        ns.s = torch.tensor(LOSS_S, device=device, dtype=torch.float32)
        ns.n_valid = (ns.target != -100).sum().reshape(1)
    if not p.fit:
        ns.zv = ns.zt = ns.z
        ns.s = ns.log_prior
    ns.batch, ns.classes, ns.stride = b, c, c
    ns.lambdas = LOSS_LAMBDAS if p.fit else (0.0, 0.0, 0.0)
    ns.placeholder, ns.device = placeholder, ("cpu" if placeholder else device)
    return ns


def alloc_outputs(p: Problem, data, cfg) -> SimpleNamespace:
    """The output buffers of one launch of `cfg` (their sizes may depend on it: partial sums)."""
    dev = data.device

    def mk(shape, dtype, zeros=False):
        if data.placeholder:
            return torch.empty(16, dtype=dtype)
        return (torch.zeros if zeros else torch.empty)(shape, dtype=dtype, device=dev)

    f32 = torch.float32
    if p.kernel == "fwd":
        return SimpleNamespace(out=mk((data.rows, data.d), data.x.dtype), mean=mk((data.rows,), f32),
                               rstd=mk((data.rows,), f32))
    if p.kernel == "dx":
        n = cfg.programs(data.rows)
        dt = data.w_cat_c.dtype
        return SimpleNamespace(dx=mk((data.rows, data.d), data.x.dtype), act=mk((data.rows, data.h), dt),
                               dh=mk((data.rows, data.h), dt), ds_part=mk((n,), f32), dbcat_part=mk((n, data.h), f32))
    if p.kernel == "dw":
        return SimpleNamespace(dwcat_part=mk((cfg.split, data.d, data.h), f32),
                               dwup_part=mk((cfg.split, data.d, data.h), f32), dbup_part=mk((cfg.split, data.d), f32))
    shape, dt = (data.batch, data.classes), data.z.dtype
    return SimpleNamespace(loss_rows=mk((data.batch,), f32), ds_rows=mk((data.batch, 2), f32, zeros=True),
                           status=mk((data.batch,), torch.int32, zeros=True), dz=mk(shape, dt),
                           dzv=mk(shape, dt) if p.fit else None, dzt=mk(shape, dt) if p.fit else None,
                           z_hat=mk(shape, dt) if p.fit else None)


def launch_spec(k, p: Problem, data, cfg, out) -> tuple:
    """(kernel, grid, args, kwargs) of one launch of `cfg`: exactly what the glue passes
    (sage_fast/ops/sg_adapter.py, sage_fast/ops/la_loss.py) for the same inputs and configuration."""
    if p.kernel == "fwd":
        fn = k.sg_adapter_fwd_kernel
        args = (data.x, data.mlp, out.out, out.mean, out.rstd, data.w_cat_c, data.b_cat, data.w_up_t, data.b_up,
                data.scale, data.rows, data.d, data.h, data.slope, data.eps)
        kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_H=row_block_h(data.h), BLOCK_EPILOGUE=True,
                      DOT_PRECISION=data.prec, **cfg.options())
        return fn, (cfg.programs(data.rows),), args, kwargs
    if p.kernel == "dx":
        fn = k.sg_adapter_bwd_dx_kernel
        args = (data.x, data.dout, out.dx, data.mean, data.rstd, data.w_cat_c, data.w_cat_t, data.b_cat, data.wsum,
                data.w_up_c, data.scale, out.act, out.dh, out.ds_part, out.dbcat_part,
                data.rows, data.d, data.h, data.slope)
        kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_H=row_block_h(data.h), BLOCK_EPILOGUE=True,
                      DOT_PRECISION=data.prec, **cfg.options())
        return fn, (cfg.programs(data.rows),), args, kwargs
    if p.kernel == "dw":
        fn = k.sg_adapter_bwd_dw_kernel
        args = (data.x, data.dout, data.mean, data.rstd, data.act, data.dh, out.dwcat_part, out.dwup_part,
                out.dbup_part, data.rows, data.d, data.h)
        kwargs = dict(SPLIT=cfg.split, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_H=cfg.block_h,
                      DOT_PRECISION=data.prec, **cfg.options())
        return fn, cfg.grid(data.d, data.h), args, kwargs
    fn = k.fit_la_loss_fwd_kernel
    lam1, lam2, lam3 = data.lambdas
    args = (data.z, data.zv, data.zt, data.stride, data.stride, data.stride, data.target, data.log_prior, data.s,
            data.n_valid, out.loss_rows, out.ds_rows, out.status, out.dz,
            out.dzv if p.fit else out.loss_rows, out.dzt if p.fit else out.loss_rows,
            out.z_hat if p.fit else out.loss_rows, data.batch, data.classes, -100,
            float(lam1), float(lam2), float(lam3))
    kwargs = dict(FIT=p.fit, NEED_DZ=True, NEED_DZV=p.fit, NEED_DZT=p.fit, WRITE_ZHAT=p.fit,
                  BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, **cfg.options())
    return fn, (cfg.programs(data.batch),), args, kwargs


def outputs_of(p: Problem, out) -> Dict[str, torch.Tensor]:
    """The outputs the gate compares, partial sums reduced (their count depends on the configuration)."""
    if p.kernel == "fwd":
        return {"out": out.out, "mean": out.mean, "rstd": out.rstd}
    if p.kernel == "dx":
        return {"dx": out.dx, "act": out.act, "dh": out.dh, "ds": out.ds_part.sum(), "db_cat": out.dbcat_part.sum(0)}
    if p.kernel == "dw":
        return {"dw_cat": out.dwcat_part.sum(0), "dw_up": out.dwup_part.sum(0), "db_up": out.dbup_part.sum(0)}
    got = {"loss": out.loss_rows, "status": out.status, "dz": out.dz}
    if p.fit:
        got.update({"ds": out.ds_rows, "dzv": out.dzv, "dzt": out.dzt, "z_hat": out.z_hat})
    return got


def poison(p: Problem, out) -> None:
    """NaN into every output the kernel must write (integers: -7), so that an unwritten element fails the gate."""
    for name, t in vars(out).items():
        if t is None or (p.kernel == "loss" and name == "ds_rows" and not p.fit):
            continue  # the LA loss does not write ds (the glue zero-fills it)
        t.fill_(float("nan") if t.is_floating_point() else -7)


# ----------------------------------------------------------------------------------------------
# the correctness gate and the decision


def gate(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> tuple[bool, str, float]:
    """(passed, the worst output's name, its error relative to its limit) of a candidate's outputs against
    the heuristic's. Floating outputs: ||got - want|| / ||want|| within GATE_LIMITS[dtype] (NaN, Inf or a
    shape change: fail); integer outputs: equal."""
    from .harness import relative_error

    worst, worst_ratio = "", 0.0
    for name, w in want.items():
        g = got[name]
        if w.is_floating_point():
            err = relative_error(g, w)
            ratio = err / GATE_LIMITS.get(w.dtype, 1e-3)
        else:
            ratio = 0.0 if (g.shape == w.shape and bool(torch.equal(g, w))) else math.inf
        if ratio > worst_ratio or not worst:
            worst, worst_ratio = name, ratio
    return worst_ratio <= 1.0, worst, worst_ratio


def spread(times: Sequence[float]) -> float:
    """(max - min) / median of repeated measurements of one configuration (inf for fewer than two)."""
    if len(times) < 2:
        return math.inf
    return (max(times) - min(times)) / statistics.median(times)


@dataclass
class Decision:
    winner: Optional[object]
    best: Optional[object]
    speedup: Optional[float]
    noise: Optional[float]
    margin: Optional[float]
    reason: str

    def to_json(self) -> dict:
        return {"winner": config_to_json(self.winner) if self.winner is not None else None,
                "best": config_to_json(self.best) if self.best is not None else None,
                "speedup": self.speedup, "noise": self.noise, "margin": self.margin, "reason": self.reason}


def decide(base, base_times: Sequence[float], times: Dict[object, Sequence[float]],
           min_margin: float = MIN_MARGIN) -> Decision:
    """The winner among `times` (config -> repeated median times; the heuristic `base` excluded): the
    fastest by median, if its speedup over `base` exceeds max(noise of both, min_margin)."""
    times = {c: t for c, t in times.items() if c != base and t}
    if len(base_times) < 2:
        return Decision(None, None, None, None, None, "the heuristic was timed fewer than twice: noise unknown")
    if not times:
        return Decision(None, None, None, spread(base_times), None, "no candidate passed the gate and was timed")
    t_base = statistics.median(base_times)
    best = min(times, key=lambda c: statistics.median(times[c]))
    t_best = statistics.median(times[best])
    speedup = t_base / t_best - 1.0
    noise = max(spread(base_times), spread(times[best]) if len(times[best]) > 1 else 0.0)
    margin = max(noise, min_margin)
    if len(times[best]) < 2:
        return Decision(None, best, speedup, noise, margin, "the best candidate was not re-timed (out of budget)")
    if speedup > margin:
        return Decision(best, best, speedup, noise, margin, f"{speedup:.1%} faster than the heuristic (> {margin:.1%})")
    return Decision(None, best, speedup, noise, margin,
                    f"best candidate {speedup:+.1%} vs the heuristic, within max(noise, {min_margin:.0%}) = {margin:.1%}")


# ----------------------------------------------------------------------------------------------
# budget


class Budget:
    """Seconds left of the tuning run. Each problem gets `share(n)`: an equal part of what is left
    (minus `reserve_s`, kept for writing the outputs) over the n problems still to do."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic, reserve_s: float = 2.0):
        self.total_s, self.clock, self.reserve_s = float(total_s), clock, float(reserve_s)
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed() - self.reserve_s

    def share(self, remaining_problems: int) -> float:
        return max(0.0, self.left()) / max(1, remaining_problems)


# ----------------------------------------------------------------------------------------------
# one problem


class KernelRunner:
    """Runs and times one problem's kernel on its device (CUDA; on a CPU, Triton's interpreter)."""

    def __init__(self, p: Problem, device, data=None, measure_s: float = 0.02, warmup: int = 2, min_reps: int = 5):
        self.p, self.device = p, torch.device(device)
        self.k = _kernels(p)
        self.data = data
        self.measure_s, self.warmup, self.min_reps = measure_s, warmup, min_reps
        self.outs: dict = {}
        self.keep_outputs = 6

    def _launch(self, cfg):
        out = self.outs.pop(cfg, None)
        if out is None:
            out = alloc_outputs(self.p, self.data, cfg)
            while len(self.outs) >= self.keep_outputs:  # bounded memory: drop the least recently used
                self.outs.pop(next(iter(self.outs)))
        self.outs[cfg] = out
        fn, grid_, args, kwargs = launch_spec(self.k, self.p, self.data, cfg, out)
        runner = fn[grid_]
        return out, (lambda: runner(*args, **kwargs))

    def outputs(self, cfg) -> Dict[str, torch.Tensor]:
        """Run cfg once on poisoned outputs; its results (copies)."""
        out, call = self._launch(cfg)
        poison(self.p, out)
        call()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {k: v.clone() for k, v in outputs_of(self.p, out).items()}

    def time(self, cfg, target_s: Optional[float] = None) -> float:
        """Median seconds of one launch of cfg (already compiled by `outputs`)."""
        from .harness import median_time

        _, call = self._launch(cfg)
        return median_time(call, target_s or self.measure_s, self.min_reps, 400, self.warmup,
                           estimate_reps=self.estimate_reps)[0]

    estimate_reps = 3

    def release(self) -> None:
        self.outs = {}


class DataCache:
    """Inputs of the problems, made on first use; the adapter's intermediates (mean, rstd, act, dh) come
    from the heuristic's forward and dx kernels (shared by the three kernels of one shape)."""

    def __init__(self, device, sms: int):
        self.device, self.sms = device, sms
        self.adapter: dict = {}

    def get(self, p: Problem):
        if p.kernel == "loss":
            return loss_data(p, self.device)
        shape = (p.d, p.r, p.rows, p.dtype)
        data = self.adapter.get(shape)
        if data is None:
            self.adapter.clear()  # one shape at a time on the device
            data = adapter_data(p, self.device)
            fwd = KernelRunner(dataclasses.replace(p, kernel="fwd"), self.device, data)
            res = fwd.outputs(heuristic(fwd.p, self.sms))
            data.mean, data.rstd = res["mean"], res["rstd"]
            dx = KernelRunner(dataclasses.replace(p, kernel="dx"), self.device, data)
            o, call = dx._launch(heuristic(dx.p, self.sms))
            call()
            data.act, data.dh = o.act.clone(), o.dh.clone()
            self.adapter[shape] = data
        return data


@dataclass
class ProblemResult:
    problem: Problem
    key: tuple
    heuristic: object
    candidates: list = field(default_factory=list)  # dicts: config, status, ...
    base_times: list = field(default_factory=list)
    confirm: dict = field(default_factory=dict)  # config json -> times
    decision: Optional[Decision] = None
    seconds: float = 0.0
    status: str = "not reached"

    def to_json(self) -> dict:
        return {
            "problem": self.problem.name, "params": self.problem.to_json(), "status": self.status,
            "heuristic": config_to_json(self.heuristic), "base_times_s": self.base_times,
            "candidates": self.candidates, "confirm_s": self.confirm,
            "decision": self.decision.to_json() if self.decision else None, "seconds": round(self.seconds, 2),
        }


def tune_problem(p: Problem, runner, base, cands: Sequence, deadline: float, clock: Callable[[], float],
                 wait: Callable[[object], Optional[str]] = lambda c: None, sms: int = DEFAULT_SMS,
                 log: Callable[[str], None] = lambda s: None, key: tuple = (), confirm_top: int = CONFIRM_TOP,
                 confirm_rounds: int = CONFIRM_ROUNDS) -> ProblemResult:
    """Gate, time, confirm and decide one problem before `deadline` (a `clock` value).

    runner: `outputs(cfg) -> dict`, `time(cfg, target_s=None) -> seconds` (KernelRunner, or a fake).
    wait(cfg): blocks until cfg's ahead-of-time compilation is done; an error text rejects cfg (the
    Precompiler never returns one: a failed precompile is retried by the main process).
    """
    t0 = clock()
    res = ProblemResult(p, key, base)
    res.status = "running"
    try:
        want = runner.outputs(base)
    except Exception as exc:  # the heuristic itself does not run: nothing to compare against
        res.status = f"heuristic failed: {type(exc).__name__}: {str(exc)[:300]}"
        res.decision = Decision(None, None, None, None, None, res.status)
        return res
    bad = [n for n, t in want.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        res.status = f"heuristic output not finite: {bad}"
        res.decision = Decision(None, None, None, None, None, res.status)
        return res
    t1 = clock()
    res.base_times.append(runner.time(base))
    per_measure = max(1e-3, 1.5 * (clock() - t1))  # one timing (with a margin): what a confirmation step costs
    sweep_times: Dict[object, float] = {}
    todo = [c for c in cands if c != base]

    def confirm_cost() -> float:
        return (confirm_top + 1) * confirm_rounds * per_measure

    def try_candidate(c) -> None:
        entry = {"config": config_to_json(c), "status": "not reached"}
        res.candidates.append(entry)
        err = wait(c)
        if err:
            entry.update(status="compile failed", error=err[:500])
            return
        try:
            t1 = clock()
            got = runner.outputs(c)
            entry["first_run_s"] = round(clock() - t1, 4)
        except Exception as exc:  # out of resources at launch, ...
            entry.update(status="launch failed", error=f"{type(exc).__name__}: {str(exc)[:500]}")
            return
        ok, name, ratio = gate(got, want)
        entry.update(gate_output=name, gate_error_over_limit=ratio)
        if not ok:
            entry["status"] = "rejected by the gate"
            return
        sweep_times[c] = runner.time(c)
        entry.update(status="timed", time_s=sweep_times[c])

    def out_of_time() -> bool:
        return clock() + confirm_cost() > deadline

    stopped = False
    for i, c in enumerate(todo):
        if out_of_time():
            stopped = True
            break
        try_candidate(c)
        if i == len(todo) // 2:
            res.base_times.append(runner.time(base))  # the heuristic again, mid-sweep: noise
    if p.kernel == "dw" and sweep_times and not stopped:
        best = sorted(sweep_times, key=sweep_times.get)[:confirm_top]
        for c in split_variants(p, best, sms):
            if out_of_time():
                stopped = True
                break
            if c not in sweep_times:
                try_candidate(c)
    res.base_times.append(runner.time(base))
    # confirmation: the fastest few and the heuristic, in interleaved rounds
    top = sorted(sweep_times, key=sweep_times.get)[:confirm_top]
    times = {c: [sweep_times[c]] for c in top}
    for rnd in range(confirm_rounds):
        if clock() > deadline and rnd > 0:
            break
        order = [base] + top
        order = order[rnd % len(order):] + order[:rnd % len(order)]
        for c in order:
            t = runner.time(c, target_s=None)
            (res.base_times if c == base else times[c]).append(t)
    res.confirm = {json.dumps(config_to_json(c)): ts for c, ts in times.items()}
    res.decision = decide(base, res.base_times, times)
    res.status = "decided (sweep cut by the budget)" if stopped else "decided"
    res.seconds = clock() - t0
    log(f"{p.name}: {len(sweep_times)} timed, {sum(e['status'] != 'timed' for e in res.candidates)} not; "
        f"heuristic {statistics.median(res.base_times) * 1e6:.1f} us; {res.decision.reason}")
    return res


# ----------------------------------------------------------------------------------------------
# ahead-of-time compilation in worker processes


_PLACEHOLDERS: dict = {}


def _worker_init() -> None:
    """Workers run at lower priority: the main process times launches meanwhile."""
    try:
        os.nice(10)
    except OSError:
        pass


def _warm(problem_json: dict, config_json: dict) -> float:
    """Worker: compile one candidate through the JIT's `warmup` (the key the main process will look up in
    Triton's cache), on placeholder CPU tensors. Returns seconds."""
    p = Problem.from_json(problem_json)
    cfg = config_from_json(p.kernel, config_json)
    data = _PLACEHOLDERS.get(p)
    if data is None:
        data = _PLACEHOLDERS[p] = (loss_data if p.kernel == "loss" else adapter_data)(p, "cpu", placeholder=True)
        if p.kernel == "dw":
            data.mean = data.rstd = torch.empty(16)
            data.act = data.dh = torch.empty(16, dtype=p.torch_dtype)
        elif p.kernel == "dx":
            data.mean = data.rstd = torch.empty(16)
    t0 = time.time()
    fn, grid_, args, kwargs = launch_spec(_kernels(p), p, data, cfg, alloc_outputs(p, data, cfg))
    fn.warmup(*args, grid=grid_, **kwargs)
    return time.time() - t0


class Precompiler:
    """A pool of worker processes compiling candidates ahead of the main process, in submission order."""

    def __init__(self, workers: int):
        import multiprocessing

        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init)
        self.futures: Dict[tuple, Future] = {}
        self.workers = workers
        self.broken = False
        self.errors: List[str] = []

    def submit(self, p: Problem, cfgs: Sequence) -> None:
        for c in cfgs:
            key = (p, c)
            if key not in self.futures:
                self.futures[key] = self.pool.submit(_warm, p.to_json(), config_to_json(c))

    def wait(self, p: Problem, c, timeout: float) -> Optional[str]:
        """Wait up to `timeout` s for cfg's compilation. Never rejects a candidate: on an error (noted in
        `errors`) or a timeout the main process compiles it itself, and only a failure there rejects it,
        so that a problem of the pool (e.g. a Triton version whose warmup differs) cannot reject the grid."""
        fut = self.futures.get((p, c))
        if fut is None or self.broken:
            return None
        try:
            fut.result(timeout=max(0.0, timeout))
        except TimeoutError:
            pass  # still compiling: the main process compiles it itself
        except BrokenProcessPool:
            self.broken = True  # a worker died: the main process compiles from now on
        except Exception as exc:  # noqa: BLE001 - recorded; the main process decides
            text = str(exc).strip().splitlines()
            self.errors.append(f"{p.name} {config_to_json(c)}: {type(exc).__name__}: {text[-1] if text else ''}"[:400])
        return None

    def stats(self) -> dict:
        done = [f for f in self.futures.values() if f.done() and not f.cancelled()]
        ok = [f.result() for f in done if f.exception() is None]
        return {"workers": self.workers, "submitted": len(self.futures), "done": len(done), "failed": len(done) - len(ok),
                "compile_s_median": statistics.median(ok) if ok else None, "compile_s_total": sum(ok),
                "broken": self.broken, "errors": self.errors[:20]}

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        procs = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:  # our own workers; one may be inside a compile
            if proc.is_alive():
                proc.terminate()


# ----------------------------------------------------------------------------------------------
# the run


def merge_table(base: Sequence[launch.TunedEntry], results: Sequence[ProblemResult], device_name: str,
                evidence: Callable[[ProblemResult], dict]) -> List[launch.TunedEntry]:
    """`base` with the decided problems' keys replaced: the winner's entry, or none (the heuristic)."""
    decided = {(r.problem.kernel, r.key) for r in results if r.decision is not None and r.status.startswith("decided")}
    out = [e for e in base if (e.kernel, e.key) not in decided]
    for r in results:
        if (r.problem.kernel, r.key) in decided and r.decision.winner is not None:
            out.append(launch.TunedEntry(r.problem.kernel, r.key, r.decision.winner, evidence(r)))
    return out


def _versions() -> dict:
    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    commit = os.environ.get("SAGE_GIT_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"torch": torch.__version__, "triton": tv, "commit": commit}


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
    versions = _versions()
    meta = {"device": device_name, "sms": sms, "budget_s": budget_s, "started_at": _now(), **versions,
            "grid_file": str(grid_path) if grid_data else None, "min_margin": MIN_MARGIN,
            "gate_limits": {str(k).replace("torch.", ""): v for k, v in GATE_LIMITS.items()},
            "timing": "median of CUDA-event times of single launches, L2 flushed before each (harness.median_time)"
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

    def evidence(r: ProblemResult) -> dict:
        d = r.decision
        base_t = statistics.median(r.base_times)
        win_t = statistics.median(r.confirm[json.dumps(config_to_json(d.winner))])
        shape = {"rows": r.problem.rows} if r.problem.kernel != "loss" else {"batch": r.problem.batch}
        return {"time_us": round(win_t * 1e6, 2), "heuristic_us": round(base_t * 1e6, 2),
                "speedup": round(d.speedup, 4), "noise": round(d.noise, 4), **shape,
                "measured_at": _now(), **versions}

    def write(final: bool) -> dict:
        content = {**meta, "elapsed_s": round(budget.elapsed(), 1), "final": final,
                   "precompile": pre.stats() if pre else None,
                   "problems": [r.to_json() for r in results]}
        if grid_data is None:
            content["note"] = "no pre-filtered grid file: the unfiltered grid was tried"
        (out_dir / "tune.json").write_text(json.dumps(content, indent=1, default=str))
        entries = merge_table(base_entries, results, device_name, evidence)
        launch.write_table(table_out, entries, note=_table_note(base_table))
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


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _table_note(base_table) -> str:
    return ("Tuned Triton launch configurations, read by sage_fast/ops/launch.py at import. Written by "
            "`python -m benchmarks.tune run` (stage 'tune' of benchmarks/run_gpu.sh) on a GPU; an entry is kept "
            "only when it beat the heuristic by more than the measured noise (its evidence says by how much).")


# ----------------------------------------------------------------------------------------------
# prefilter (CPU): compile the grid for sm_90


def grid_items(problems: Sequence[Problem], sms: int = DEFAULT_SMS) -> List[dict]:
    """One compile item per (problem, distinct compile key) of the grid, labelled 'problem | key'."""
    items = []
    for p in problems:
        seen = set()
        for c in grid(p, sms):
            key = _compile_key(p.kernel, c)
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
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sage_compile_child", COMPILE_CHILD)
    child = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(child)
    problems = list(problems or gpu_problems())
    items = grid_items(problems)
    log(f"prefilter: compiling {len(items)} grid configurations for sm_90 (one process; ~1 s each)")
    with tempfile.TemporaryDirectory(prefix="sage-tune-prefilter-") as tmp:
        grid_json = Path(tmp) / "grid.json"
        grid_json.write_text(json.dumps({"items": items}))
        report_path = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton-cache")
        env["TRITON_DUMP_PTXAS_LOG"] = "1"
        proc = subprocess.run([sys.executable, str(COMPILE_CHILD), str(report_path), "--grid", str(grid_json)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not report_path.exists():
            raise RuntimeError(f"compile child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        report = json.loads(report_path.read_text())
    if report.get("skip"):
        raise RuntimeError(report["skip"])
    limits = {"spill_bytes": child.SPILL_TOLERANCE_BYTES, "shared_bytes": child.SM90_MAX_SHARED_PER_BLOCK}
    content = {"format": GRID_FORMAT, "target": "sm_90", "sms": DEFAULT_SMS, "triton": report.get("triton"),
               "ptxas": report.get("ptxas"), "limits": limits, "generated_at": _now(),
               "compile_seconds": report.get("seconds"),
               "note": "Written by `python -m benchmarks.tune prefilter` on a CPU: the tuning grid compiled for sm_90; "
                       "the GPU run tries the 'passed' configurations only (dw: any split).",
               "problems": classify(report, problems, limits)}
    Path(out_path).write_text(json.dumps(content, indent=1) + "\n")
    n_pass = sum(len(v["passed"]) for v in content["problems"].values())
    log(f"prefilter: {n_pass} of {len(items)} pass; written {out_path}")
    return content


# ----------------------------------------------------------------------------------------------
# command line


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.split("\n\n")[0])
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
            launch.write_table(table_out, launch.read_table(args.base_table or launch.TABLE_PATH),
                               note=_table_note(None))
            (args.results / "tune.json").write_text(json.dumps({
                "device": "cpu", "final": True, "problems": [],
                "note": "no CUDA device: nothing tuned (set TRITON_INTERPRET=1 to run the interpreter's smoke "
                        "problems); the table is the committed one, unchanged"}, indent=1))
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
