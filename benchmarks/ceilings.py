"""Hardware ceilings of the device, measured in the same run: copy bandwidth and dense matmul throughput.

A case's GB/s and TFLOP/s become fractions of these (`ceiling_fractions`); they are measured once per
results folder (`load_or_measure_ceilings`: run_gpu.sh's pytest sessions share ceilings.json).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Optional

import torch

from .environment import device_name
from .error_check import DTYPES
from .records import now_utc, read_json, write_json
from .timing import CPU_TIMING_METHOD, DEVICE, GPU_TIMING_METHOD, ON_GPU, event_times, free_memory, sync, time_per_call

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
    if reuse:
        try:
            saved = read_json(path)
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and saved.get("device") == device_name() and saved.get("copy_GBps"):
            return saved
    ceilings = measure_ceilings()
    ceilings["device"] = device_name()
    ceilings["measured_at"] = now_utc()
    write_json(path, ceilings)
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
