"""What the benchmark cases share beyond timing: skip reasons, long-tailed counts, the kernel record.

The pieces live in their own modules: `benchmarks.timing` (CUDA events, L2 flush, the CPU timer, peak
memory), `benchmarks.error_check` (error against the eager reference, recorded then asserted),
`benchmarks.ceilings` (copy bandwidth and matmul throughput of the device), `benchmarks.records` (the
results folder's records and files) and `benchmarks.environment` (device, versions, attention kernels).
This module holds what a `bench_*.py` case needs on top of them.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Optional

import pytest

from .ceilings import ceiling_fractions
from .error_check import ErrorCheck
from .timing import Timing, peak_memory_fields, reset_peak_memory, run_benchmark

CPU_NO_TRITON = "Triton kernels need CUDA; the CPU smoke run never uses the Triton interpreter"
CPU_NO_COMPILE = (
    "torch.compile is skipped on CPU (tens of seconds per case on a 2-core CI machine); "
    "pass --sage-compile to include it"
)


def long_tailed_counts(num_classes: int, n_max: int = 1280, imbalance: float = 256.0) -> list[int]:
    """Exponentially decaying class counts, n_max down to n_max / imbalance (ImageNet-LT-like)."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(round(n_max * imbalance ** (-k / (num_classes - 1))))) for k in range(num_classes)]


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
        **timing.record_fields(),
        "tokens_per_s": items / timing.median_s,
        "GBps": gbps,
        "TFLOPs": tflops,
        "bytes_model": nbytes,
        "flops_model": flops,
        **peak_memory_fields(),
        **check.record_fields(),
        **ceiling_fractions(ceilings, case.dtype, gbps, tflops),
    }
