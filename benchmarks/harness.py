"""Shared machinery of the sage-fast benchmarks: device, timing, hardware ceilings, records, env info.

Timing. On a GPU (`run_benchmark`, `median_time`): every timed call runs between two CUDA events,
after a write of a buffer of at least 256 MiB (four times an H100's or H200's L2) that evicts the
previous call's data from L2 (`L2Flush`); the calls are enqueued back to back without a
synchronisation between them (as `triton.testing.do_bench`), so host launch overhead shows only where
the host cannot keep ahead of the device; warm-up calls (and the first call: Triton JIT,
torch.compile) are not timed; the number reported is the median. pytest-benchmark stays the runner
and recorder: its pedantic mode replays the event times through `ReplayTimer`, so its median and the
record's `time_s` are the same number. Every record names its method (`timing_method`). On a CPU
(the smoke run): pedantic mode with a timer that synchronises before reading ``time.perf_counter()``,
rounds of several back-to-back calls, the median round.

Every measured case becomes a *record*: a flat dict stored in ``benchmark.extra_info`` (so the
``--benchmark-json`` file carries it) and appended to ``<results dir>/records.jsonl`` (so a run
cut short by a time limit keeps what it measured). `benchmarks/report.py` turns records into
the Markdown summary and the PNG chart.

Error: every case also measures its error against the eager reference (`check_error`), writes
it into its record and then fails if it is over the limit (`assert_error_ok`), so a fast but
wrong implementation fails the benchmark instead of only showing up as a number in a table.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import pytest
import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"
REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

CPU_NO_TRITON = "Triton kernels need CUDA; the CPU smoke run never uses the Triton interpreter"
CPU_NO_COMPILE = (
    "torch.compile is skipped on CPU (tens of seconds per case on a 2-core CI machine); "
    "pass --sage-compile to include it"
)


# ----------------------------------------------------------------------------------------------
# timing


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def synced_perf_counter() -> float:
    """perf_counter after the device queue has drained: the timer pytest-benchmark uses here."""
    sync()
    return time.perf_counter()


@dataclass(frozen=True)
class TimingPlan:
    """How long to measure.

    CPU (the smoke run): `rounds` timed rounds of about `target_round_s` each (several calls between
    two synchronised host-clock readings; `max_iterations` calls at most).
    GPU: one call per round, timed with CUDA events after an L2 flush (`event_times`); the number of
    rounds is chosen so that the timed calls add up to about `target_total_s`, within
    [`rounds`, `max_rounds`], after warm-up calls adding up to about `warmup_s` (at least
    `warmup_rounds`).
    """

    warmup_rounds: int
    rounds: int
    target_round_s: float
    max_iterations: int
    target_total_s: float = 0.0
    max_rounds: int = 0
    warmup_s: float = 0.0


GPU_PLAN = TimingPlan(warmup_rounds=3, rounds=20, target_round_s=0.0, max_iterations=1,
                      target_total_s=0.15, max_rounds=500, warmup_s=0.025)
CPU_PLAN = TimingPlan(warmup_rounds=1, rounds=3, target_round_s=2e-3, max_iterations=200)
# Training steps are long: a fixed number of single-step rounds.
GPU_STEP_PLAN = TimingPlan(warmup_rounds=2, rounds=8, target_round_s=0.0, max_iterations=1,
                           target_total_s=0.0, max_rounds=8, warmup_s=0.0)
CPU_STEP_PLAN = TimingPlan(warmup_rounds=1, rounds=3, target_round_s=0.0, max_iterations=1)

#: How GPU cases are timed; every GPU record carries it (CPU records carry CPU_TIMING_METHOD).
GPU_TIMING_METHOD = ("cuda-events around each call, L2 flushed before each (>= 256 MiB written), no sync between "
                     "calls, warm-up excluded, median")
CPU_TIMING_METHOD = "host clock around rounds of back-to-back calls, median of rounds"


def default_plan(step: bool = False) -> TimingPlan:
    if step:
        return GPU_STEP_PLAN if ON_GPU else CPU_STEP_PLAN
    return GPU_PLAN if ON_GPU else CPU_PLAN


def time_per_call(fn: Callable[[], object], calls: int) -> float:
    start = synced_perf_counter()
    for _ in range(calls):
        fn()
    return (synced_perf_counter() - start) / calls


def choose_iterations(fn: Callable[[], object], plan: TimingPlan) -> int:
    """Calls per round so that a round lasts about plan.target_round_s (fn already warmed up)."""
    if plan.max_iterations <= 1 or plan.target_round_s <= 0:
        return 1
    estimate = time_per_call(fn, 2)
    if estimate <= 0:
        return plan.max_iterations
    return int(max(1, min(plan.max_iterations, math.ceil(plan.target_round_s / estimate))))


# ----------------------------------------------------------------------------------------------
# GPU timing: CUDA events around each call, L2 flushed before it


def l2_cache_bytes() -> int:
    """The device's L2 size (50 MB on an H100 when the property is missing)."""
    if not ON_GPU:
        return 0
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2**20)


class L2Flush:
    """A buffer of max(256 MiB, 4 x L2) bytes; `flush()` writes all of it, so that nothing a timed call
    reads can still be in L2 (an H100's L2 is 50 MB; one ViT-B/16 bf16 activation is 39 MB).
    One per process, allocated on first use (`l2_flush()`)."""

    def __init__(self, device=None):
        device = device or DEVICE
        self.nbytes = max(256 * 2**20, 4 * l2_cache_bytes())
        self.buf = torch.empty(self.nbytes // 4, dtype=torch.int32, device=device)

    def flush(self) -> None:
        self.buf.zero_()


_FLUSH: list = []


def l2_flush() -> Optional[L2Flush]:
    """The process's flush buffer (None without CUDA)."""
    if not ON_GPU:
        return None
    if not _FLUSH:
        _FLUSH.append(L2Flush())
    return _FLUSH[0]


def flush_mib() -> float:
    return _FLUSH[0].nbytes / 2**20 if _FLUSH else 0.0


class ReplayTimer:
    """A pytest-benchmark timer that replays durations measured beforehand (`event_times`).

    pytest-benchmark's pedantic runner reads ``timer()`` right before and right after each round; the
    first reading of a round returns the clock, the second advances it by the next sample. Run
    ``benchmark.pedantic(noop, rounds=len(samples), iterations=1)`` with it: pytest-benchmark then records
    (and reports the median of) exactly these samples, the device times of single calls between CUDA
    events. The calls themselves ran in `event_times`, back to back without a synchronisation per call
    (as `triton.testing.do_bench`), so the host's launch overhead hides behind the device's work as it
    does in a training loop, but not behind a synchronisation inside the call (the fused loss has one).
    """

    def __init__(self, samples: Sequence[float]):
        self.samples = list(samples)
        self.clock = 0.0
        self.i = 0
        self.in_round = False

    def __call__(self) -> float:
        if self.in_round:
            self.clock += self.samples[self.i]
            self.i += 1
        self.in_round = not self.in_round
        return self.clock


def _noop() -> None:
    return None


def event_times(fn: Callable[[], object], reps: int, flush: Optional[L2Flush] = None) -> list[float]:
    """Device seconds of each of `reps` calls of fn, each between two CUDA events after an L2 flush;
    one synchronisation at the end (as triton.testing.do_bench)."""
    flush = flush if flush is not None else l2_flush()
    pairs = []
    for _ in range(reps):
        flush.flush()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in pairs]


def host_times(fn: Callable[[], object], reps: int) -> list[float]:
    """Host seconds of each of `reps` calls (CPU: no device queue to wait for)."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median_time(fn: Callable[[], object], target_s: float = 0.02, min_reps: int = 5, max_reps: int = 200,
                warmup: int = 2, estimate_reps: int = 3) -> tuple[float, int]:
    """(median seconds per call, reps) of an already compiled fn: CUDA events with an L2 flush before
    each call on a GPU, the host clock on a CPU; `warmup` untimed calls, then enough reps to fill about
    target_s (between min_reps and max_reps). The tuner's measurement."""
    timed = event_times if ON_GPU else host_times
    for _ in range(warmup):
        fn()
    estimate = statistics.median(timed(fn, estimate_reps))
    reps = int(max(min_reps, min(max_reps, math.ceil(target_s / max(estimate, 1e-7)))))
    return statistics.median(timed(fn, reps)), reps


@dataclass
class Timing:
    median_s: float
    mean_s: float
    stddev_s: float
    min_s: float
    rounds: int
    iterations: int
    method: str = CPU_TIMING_METHOD
    warmup_rounds: int = 0
    iqr_s: Optional[float] = None

    def record_fields(self) -> dict:
        fields = {"timing_method": self.method, "timing_rounds": self.rounds, "timing_warmup": self.warmup_rounds}
        if self.iqr_s is not None:
            fields["iqr_s"] = self.iqr_s
        if self.method == GPU_TIMING_METHOD:
            fields["l2_flush_MiB"] = flush_mib()
        return fields


def _gpu_rounds(fn: Callable[[], object], plan: TimingPlan) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) of the GPU plan for an already warmed-up fn."""
    if plan.target_total_s <= 0:
        return plan.warmup_rounds, plan.rounds
    estimate = statistics.median(event_times(fn, 3))
    rounds = int(max(plan.rounds, min(plan.max_rounds, math.ceil(plan.target_total_s / max(estimate, 1e-7)))))
    warmup = int(max(plan.warmup_rounds, min(100, math.ceil(plan.warmup_s / max(estimate, 1e-7)))))
    return warmup, rounds


def run_benchmark(benchmark, fn: Callable[[], object], plan: Optional[TimingPlan] = None) -> Optional[Timing]:
    """Warm fn up, time it with pytest-benchmark; None if benchmarks are disabled.

    The first call happens here, untimed: it triggers Triton JIT compilation and torch.compile.
    GPU: warm-up calls, then `rounds` calls each between two CUDA events after an L2 flush
    (`event_times`), recorded through pytest-benchmark's pedantic mode with a `ReplayTimer`: the
    median pytest-benchmark reports is the events median. CPU: pedantic mode with a synchronised host
    clock around rounds of several calls.
    """
    plan = plan or default_plan()
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(fn)  # --benchmark-disable: pytest-benchmark runs it once, measures nothing
        sync()
        return None
    fn()
    sync()
    if ON_GPU:
        warmup, rounds = _gpu_rounds(fn, plan)
        event_times(fn, warmup)  # warm-up calls, not kept
        samples = event_times(fn, rounds)
        benchmark._timer = ReplayTimer(samples)  # noqa: SLF001 - pytest-benchmark has no public timer hook
        benchmark.pedantic(_noop, rounds=rounds, iterations=1, warmup_rounds=0)
        st = benchmark.stats.stats
        return Timing(st.median, st.mean, st.stddev, st.min, rounds, 1, GPU_TIMING_METHOD, warmup, st.iqr)
    benchmark._timer = synced_perf_counter  # noqa: SLF001
    iterations = choose_iterations(fn, plan)
    benchmark.pedantic(fn, rounds=plan.rounds, iterations=iterations, warmup_rounds=plan.warmup_rounds)
    st = benchmark.stats.stats
    return Timing(st.median, st.mean, st.stddev, st.min, plan.rounds, iterations, CPU_TIMING_METHOD,
                  plan.warmup_rounds, getattr(st, "iqr", None))


def reset_peak_memory() -> None:
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib() -> Optional[float]:
    """Peak allocated device memory since the last reset, without the L2-flush buffer (allocated once
    per process and alive during every timed call)."""
    if not ON_GPU:
        return None
    flush = _FLUSH[0].nbytes if _FLUSH else 0
    return (torch.cuda.max_memory_allocated() - flush) / 2**20


def free_memory() -> None:
    import gc

    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# error against the eager reference: recorded, then asserted

#: Largest relative error a case may have against the eager reference, by the precision it runs
#: in ("bf16" covers the bf16-autocast cases too). The one place these limits are set.
TOLERANCES = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 2e-2}
#: In fp16 / bf16 a tensor may also be off by up to this many times the error that the eager
#: reference itself makes at that precision on the same tensor (PyTorch's own low-precision
#: reductions can be far worse than TOLERANCES; an implementation is not failed for matching them).
EAGER_FACTOR = 2.0


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius norm, float64); inf for a shape mismatch or a NaN / Inf
    in got; the absolute error ||got|| when want is all zero."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    diff, scale = (got - want).norm().item(), want.norm().item()
    return diff / scale if scale > 0 else diff


@dataclass(frozen=True)
class ErrorCheck:
    """Per-tensor relative errors of one case against the eager reference run in fp32 on the same
    inputs and weights (already rounded to the case's dtype), and the limit of each tensor.

    errors: tensor name -> relative error of the implementation under test.
    eager_errors: tensor name -> relative error of the eager reference run at the case's own
    precision (empty for fp32, where it is the reference itself).
    A tensor's limit is max(TOLERANCES[precision], EAGER_FACTOR * its eager error).
    """

    precision: str
    errors: Mapping[str, float]
    eager_errors: Mapping[str, float] = field(default_factory=dict)

    def limit(self, name: str) -> float:
        return max(TOLERANCES[self.precision], EAGER_FACTOR * self.eager_errors.get(name, 0.0))

    @property
    def worst(self) -> str:
        """The tensor closest to (or furthest over) its limit."""
        return max(self.errors, key=lambda n: self.errors[n] / self.limit(n))

    @property
    def ok(self) -> bool:
        return all(self.errors[n] <= self.limit(n) for n in self.errors)

    def record_fields(self) -> dict:
        """What a record keeps: the deciding tensor's error and limit, and the verdict."""
        worst = self.worst
        return {
            "rel_err_vs_eager": self.errors[worst],
            "rel_err_tensor": worst,
            "rel_err_limit": self.limit(worst),
            "rel_err_ok": self.ok,
            "rel_err_precision": self.precision,
        }

    def failures(self) -> list[str]:
        return [f"{n}: {self.errors[n]:.3g} > {self.limit(n):.3g}" for n in self.errors
                if not self.errors[n] <= self.limit(n)]


def check_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], precision: str,
                eager: Optional[Mapping[str, torch.Tensor]] = None) -> ErrorCheck:
    """Compare the named tensors of an implementation (`got`) with the fp32 eager reference (`want`).

    eager: the same tensors from the eager reference run at the case's precision (fp16 / bf16 only),
    which sets how much error that precision allows on each tensor (see EAGER_FACTOR).
    """
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {sorted(TOLERANCES)}, got {precision!r}")
    if set(got) != set(want) or (eager is not None and set(eager) != set(want)):
        raise ValueError(f"compared tensors differ: {sorted(got)} vs {sorted(want)}")
    errors = {n: relative_error(got[n], want[n]) for n in want}
    eager_errors = {} if (eager is None or precision == "fp32") else {n: relative_error(eager[n], want[n]) for n in want}
    return ErrorCheck(precision, errors, eager_errors)


def assert_error_ok(check: ErrorCheck, what: str) -> None:
    """Fail the case when a tensor is over its limit (call it after the record is written)."""
    if not check.ok:
        raise AssertionError(
            f"{what}: error against the eager reference over the {check.precision} limit "
            f"(tolerance {TOLERANCES[check.precision]:g}, or {EAGER_FACTOR:g}x the eager reference's own "
            f"error at that precision): " + "; ".join(check.failures())
        )


# ----------------------------------------------------------------------------------------------
# hardware ceilings, measured in the same session


def _median_time(fn: Callable[[], object], rounds: int, calls: int) -> float:
    """Median seconds per call: CUDA events around each of rounds x calls calls (L2 flushed before
    each) on a GPU; median over rounds of back-to-back calls on a CPU."""
    fn()
    sync()
    if ON_GPU:
        return statistics.median(event_times(fn, rounds * calls))
    samples = sorted(time_per_call(fn, calls) for _ in range(rounds))
    return samples[len(samples) // 2]


def measure_ceilings() -> dict:
    """Copy bandwidth (a large device-to-device copy) and dense matmul throughput, bf16 and fp32.

    Returns {"copy_GBps", "matmul_TFLOPs": {"bf16", "fp32"}, and the sizes used}. fp32 matmuls
    run without TF32 (PyTorch's default), which is the precision the fp32 kernels use.
    """
    if ON_GPU:
        copy_elems, mm_sizes, rounds, calls = 128 * 2**20, {"bf16": 8192, "fp32": 4096}, 5, 10
    else:
        copy_elems, mm_sizes, rounds, calls = 8 * 2**20, {"bf16": 256, "fp32": 512}, 3, 3
    src = torch.randn(copy_elems, device=DEVICE)
    dst = torch.empty_like(src)
    t_copy = _median_time(lambda: dst.copy_(src), rounds, calls)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    del src, dst
    out = {
        "timing_method": GPU_TIMING_METHOD if ON_GPU else CPU_TIMING_METHOD,
        "copy_GBps": copy_bytes / t_copy / 1e9,
        "copy_MiB": copy_elems * 4 / 2**20,
        "matmul_TFLOPs": {},
        "matmul_n": dict(mm_sizes),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if ON_GPU else False,
    }
    for name, n in mm_sizes.items():
        dtype = DTYPES[name]
        a = torch.randn(n, n, device=DEVICE, dtype=dtype)
        b = torch.randn(n, n, device=DEVICE, dtype=dtype)
        t_mm = _median_time(lambda: torch.mm(a, b), rounds, max(1, calls // 2))
        out["matmul_TFLOPs"][name] = 2 * n**3 / t_mm / 1e12
        del a, b
    free_memory()
    return out


def load_or_measure_ceilings(path: Path, reuse: bool) -> dict:
    """Ceilings of this device: those in `path` when reuse is set and they were measured on this device
    (run_gpu.sh's pytest sessions share one results folder: measure once per run), else measured
    now and written to `path`."""
    path = Path(path)
    if reuse and path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("device") == device_name() and saved.get("copy_GBps"):
            return saved
    ceilings = measure_ceilings()
    ceilings["device"] = device_name()
    ceilings["measured_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ceilings, indent=2))
    return ceilings


def ceiling_fractions(ceilings: dict, dtype_name: str, gbps: Optional[float], tflops: Optional[float]) -> dict:
    """Achieved / ceiling; fp16 work is compared with the bf16 matmul ceiling (same tensor-core rate)."""
    out = {}
    if gbps is not None and ceilings.get("copy_GBps"):
        out["frac_copy_bw"] = gbps / ceilings["copy_GBps"]
    peak = ceilings.get("matmul_TFLOPs", {}).get("bf16" if dtype_name == "fp16" else dtype_name)
    if tflops is not None and peak:
        out["frac_matmul_peak"] = tflops / peak
    return out


def time_kernel_case(benchmark, fn: Callable[[], object], impl: str) -> Optional[Timing]:
    """run_benchmark, where a torch.compile failure skips the case (reported) instead of failing the run."""
    reset_peak_memory()
    try:
        return run_benchmark(benchmark, fn)
    except Exception as err:
        skip_if_compile_failed(impl, err)
        raise


def skip_if_compile_failed(impl: str, err: Exception) -> None:
    if impl == "compile":
        pytest.skip(f"torch.compile failed: {type(err).__name__}: {str(err)[:200]}")


def kernel_record(group: str, case, backend: str, timing: Timing, items: int, nbytes: int, flops: int,
                  check: ErrorCheck, ceilings: dict) -> dict:
    """One kernel benchmark's record: time, throughput (items/s as tokens_per_s), GB/s, TFLOP/s,
    peak memory, error against the eager reference and fractions of the session's ceilings."""
    gbps, tflops = nbytes / timing.median_s / 1e9, flops / timing.median_s / 1e12
    return {
        "group": group,
        "case": case.key,
        "impl": case.impl,
        "backend": backend,
        "params": {k: v for k, v in asdict(case).items() if k != "impl"},
        "time_s": timing.median_s,
        "mean_s": timing.mean_s,
        "stddev_s": timing.stddev_s,
        "rounds": timing.rounds,
        "iterations": timing.iterations,
        "tokens_per_s": items / timing.median_s,
        **timing.record_fields(),
        "GBps": gbps,
        "TFLOPs": tflops,
        "bytes_model": nbytes,
        "flops_model": flops,
        "peak_mem_MiB": peak_memory_mib(),
        **check.record_fields(),
        **ceiling_fractions(ceilings, case.dtype, gbps, tflops),
    }


# ----------------------------------------------------------------------------------------------
# records


class Recorder:
    """Session-wide store of measured cases; appends each record to records.jsonl as it is measured."""

    def __init__(self, results_dir: Path, append: bool):
        self.results_dir = Path(results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.results_dir / "records.jsonl"
        self.records: list[dict] = []
        self.extra_infos: list[dict] = []
        if append and self.path.exists():
            self.records = load_records_file(self.path)
        elif self.path.exists():
            self.path.unlink()

    def add(self, record: dict, extra_info: Optional[dict] = None) -> dict:
        record = dict(record)
        record.setdefault("device", device_name())
        record.setdefault("torch_threads", torch.get_num_threads())
        record.setdefault("measured_at", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        add_ratios(record, self.records)
        self.records = [r for r in self.records if not _same_slot(r, record)] + [record]
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if extra_info is not None:
            extra_info.update(record)
            self.extra_infos.append(extra_info)
        return record

    def refresh_ratios(self) -> None:
        """Recompute ratios once everything ran (order-independent), also in the benchmark extra_info."""
        for rec in self.records:
            add_ratios(rec, self.records)
        by_slot = {_slot(r): r for r in self.records}
        for info in self.extra_infos:
            rec = by_slot.get(_slot(info))
            if rec is not None:
                info.update(rec)


def _slot(rec: dict) -> tuple:
    return rec.get("group"), rec.get("case"), rec.get("impl")


def _same_slot(a: dict, b: dict) -> bool:
    return _slot(a) == _slot(b)


def load_records_file(path: Path) -> list[dict]:
    records = {}
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                rec = json.loads(line)
                records[_slot(rec)] = rec  # a later measurement of the same case wins
    return list(records.values())


# Which implementation each group's ratios are taken against.
BASELINES = {
    "adapter": ("eager", "compile"),
    "loss": ("eager", "compile"),
    "train": ("reference",),
    "infer": ("reference",),
}
FLOOR_CASE = "floor"
#: the training step's frozen-backbone floor: forward + backward through the frozen blocks without
#: adapters (+ FIT's second forward with FIT on), one per FIT setting ("case")
FLOOR_BWD = "floor_bwd"


def add_ratios(record: dict, records: list[dict]) -> None:
    """speedup_vs_<base> = time(base) / time(this), for the same group and case, where both exist.

    Train records (Sage) also get vs_floor: images/s as a fraction of the frozen-backbone floor with the
    same FIT setting (floor_bwd), and fused_compile its speedup over fused; inference records vs_floor
    against the no-grad floor.
    """
    group, case, impl = _slot(record)
    time_s = record.get("time_s")
    if not time_s:
        return
    for base in BASELINES.get(group, ()):
        if base == impl:
            continue
        other = next((r for r in records if _slot(r) == (group, case, base)), None)
        if other and other.get("time_s"):
            record[f"speedup_vs_{base}"] = other["time_s"] / time_s
    if group == "train" and impl not in ("floor", FLOOR_BWD):
        floor = next((r for r in records if _slot(r) == (group, case, FLOOR_BWD)), None)
        if floor and floor.get("time_s"):
            record["vs_floor"] = floor["time_s"] / time_s
    if group == "train" and impl == "fused_compile":
        fused = next((r for r in records if _slot(r) == (group, case, "fused")), None)
        if fused and fused.get("time_s"):
            record["speedup_vs_fused"] = fused["time_s"] / time_s
    if group == "infer" and case != FLOOR_CASE:
        floor = next((r for r in records if _slot(r) == (group, FLOOR_CASE, "floor")), None)
        if floor and floor.get("time_s"):
            record["vs_floor"] = floor["time_s"] / time_s


# ----------------------------------------------------------------------------------------------
# the pieces under test


def attention_backend() -> str:
    """The attention kernel the train-step benchmark uses: the model's "auto" choice on this device
    (SDPA; see sage_fast.model.attention)."""
    from sage_fast.model import resolve_attention

    return resolve_attention("auto", DEVICE)


_SDPA_KERNEL: list[str] = []  # cached probe result


def sdpa_kernel() -> str:
    """Which kernel PyTorch SDPA runs for ViT-B/16 attention: sdpa-flash, sdpa-efficient or sdpa-math.

    "sdpa" alone does not say it: flash needs a supported GPU, dtype and head size, and SDPA falls back
    silently. Probed once on a (128, 12, 197, 64) bf16 problem (the train step's shape, unmasked), each
    backend forced in turn; the first that runs is the one SDPA's dispatcher prefers. CPU: "sdpa (cpu)".
    """
    if _SDPA_KERNEL:
        return _SDPA_KERNEL[0]
    result = "sdpa (cpu)"
    if ON_GPU:
        result = "sdpa-math"
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel as force_kernel

            q = torch.randn(128, 12, 197, 64, device=DEVICE, dtype=torch.bfloat16)
            for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with force_kernel([backend]):
                        torch.nn.functional.scaled_dot_product_attention(q, q, q)
                    torch.cuda.synchronize()
                    result = name
                    break
                except RuntimeError:  # "No available kernel": try the next one
                    continue
            del q
        except ImportError:  # torch without torch.nn.attention.sdpa_kernel
            result = "sdpa (kernel unknown)"
    _SDPA_KERNEL.append(result)
    return result


def long_tailed_counts(num_classes: int, n_max: int = 1280, imbalance: float = 256.0) -> list[int]:
    """Exponentially decaying class counts, n_max down to n_max / imbalance (ImageNet-LT-like)."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(round(n_max * imbalance ** (-k / (num_classes - 1))))) for k in range(num_classes)]


# ----------------------------------------------------------------------------------------------
# environment


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def device_slug() -> str:
    """File-name form of the device, e.g. nvidia-h100-80gb-hbm3 (cpu-smoke without CUDA)."""
    name = device_name() if ON_GPU else "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(module: str) -> Optional[str]:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # not installed, or broken install: report it as absent
        return None


def _run(cmd: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def collect_env(command: Optional[str] = None) -> dict:
    """Device, driver, library versions, date, git commit and the command line of this run."""
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "device_type": DEVICE.type,
        "mode": "gpu" if ON_GPU else "cpu-smoke",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "open_clip": _version("open_clip"),
        "xformers": _version("xformers"),
        "sdpa_kernel": sdpa_kernel(),
        "pytest_benchmark": _version("pytest_benchmark"),
        "sage_fast": _version("sage_fast"),
        "cpu_threads": torch.get_num_threads(),
        "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    if ON_GPU:
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if env["driver"]:
            env["driver"] = env["driver"].splitlines()[0]
    commit = os.environ.get("SAGE_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"], REPO_ROOT)
    env["git_commit"] = commit or "unknown"
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO_ROOT)
    env["git_dirty"] = None if status is None else bool(status)
    return env
