"""How the benchmarks time a call: CUDA events with an L2 flush on a GPU, a synchronised host clock on a CPU.

GPU (`run_benchmark`, `median_time`): every timed call runs between two CUDA events, after a write of a
buffer of at least 256 MiB (four times an H100's or H200's L2) that evicts the previous call's data from
L2 (`L2Flush`); the calls are enqueued back to back without a synchronisation between them (as
`triton.testing.do_bench`), so host launch overhead shows only where the host cannot keep ahead of the
device; warm-up calls (and the first call: Triton JIT, torch.compile) are not timed; the number reported
is the median. pytest-benchmark stays the runner and recorder: its pedantic mode replays the event times
through `ReplayTimer`, so its median and the record's `time_s` are the same number. Every record names
its method (`Timing.record_fields`).

CPU (the smoke run): pedantic mode with a timer that synchronises before reading ``time.perf_counter()``,
rounds of several back-to-back calls, the median round.

Peak memory (`reset_peak_memory`, `peak_memory_mib`) is read here too: it excludes the flush buffer.
What a case measures goes into a record (`benchmarks.records`); its error against the eager reference
is `benchmarks.error_check`'s.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"


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
        """What a record keeps of the timing: the median (`time_s`), its spread and how it was measured."""
        fields = {"time_s": self.median_s, "mean_s": self.mean_s, "stddev_s": self.stddev_s, "rounds": self.rounds,
                  "iterations": self.iterations, "timing_method": self.method, "timing_rounds": self.rounds,
                  "timing_warmup": self.warmup_rounds}
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


_AT_RESET: list = []  # (bytes allocated, flush-buffer bytes allocated) at the last reset_peak_memory()


def _flush_bytes() -> int:
    return _FLUSH[0].nbytes if _FLUSH else 0


def reset_peak_memory() -> None:
    """Start a new peak (`torch.cuda.reset_peak_memory_stats`); call it before each variant."""
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _AT_RESET[:] = [torch.cuda.memory_allocated(), _flush_bytes()]


def peak_memory_mib() -> Optional[float]:
    """Peak allocated device memory (`torch.cuda.max_memory_allocated`) since the last reset, without the
    L2-flush buffer (allocated once per process and alive during every timed call). None without CUDA."""
    if not ON_GPU:
        return None
    return (torch.cuda.max_memory_allocated() - _flush_bytes()) / 2**20


def peak_memory_fields() -> dict:
    """A record's memory fields: `peak_mem_MiB` (peak_memory_mib) and `peak_mem_added_MiB`, the peak above
    what was already allocated at the last reset (the model's weights, the inputs): what the measured calls
    themselves needed (activations, gradients, optimizer state). None without CUDA."""
    if not ON_GPU or not _AT_RESET:
        return {"peak_mem_MiB": None, "peak_mem_added_MiB": None}
    base, flush_then = _AT_RESET
    added = torch.cuda.max_memory_allocated() - base - (_flush_bytes() - flush_then)
    return {"peak_mem_MiB": peak_memory_mib(), "peak_mem_added_MiB": added / 2**20}


def free_memory() -> None:
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()
