"""One problem measured and decided: the correctness gate, the timing, the confirmation rounds, the decision,
and the time budget the problems share.

`tune_problem` gates each candidate (run once on outputs poisoned with NaN, compared with the heuristic's
outputs on the same inputs: `gate`), times those that pass (`KernelRunner.time`: the median of CUDA-event
times of single launches, each after an L2 flush), times the heuristic at the start, middle and end of the
sweep, confirms the fastest few in interleaved rounds and `decide`s: a candidate wins only when it beats
the heuristic by more than the noise and `MIN_MARGIN`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch

from ..error_check import relative_error
from ..timing import median_time
from .candidates import heuristic, split_variants
from .launches import adapter_data, alloc_outputs, kernel_module, launch_spec, loss_data, outputs_of, poison
from .problems import DEFAULT_SMS, Problem, config_to_json

#: a candidate must beat the heuristic by more than this fraction (and more than the measured noise)
MIN_MARGIN = 0.03
#: candidates (besides the heuristic) re-timed in the confirmation rounds, and how many rounds
CONFIRM_TOP = 3
CONFIRM_ROUNDS = 3
#: the correctness gate: largest relative error against the heuristic's output, by output dtype
GATE_LIMITS = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def gate(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> tuple[bool, str, float]:
    """(passed, the worst output's name, its error relative to its limit) of a candidate's outputs against
    the heuristic's. Floating outputs: ||got - want|| / ||want|| within GATE_LIMITS[dtype] (NaN, Inf or a
    shape change: fail); integer outputs: equal."""
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
        self.k = kernel_module(p)
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
