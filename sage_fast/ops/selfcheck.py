"""The kernels' self-check: before a process first trusts a Triton kernel family on a device and dtype,
run it once on a small random problem against PyTorch, forward and every gradient.

A kernel that compiles and launches can still compute the wrong thing on a GPU, driver or Triton
version it was not tested on (a miscompiled reduction, a dtype lowered wrongly). The check
turns that into a decision instead of silently wrong numbers:

* families: "adapter" (`sage_fast.kernels.sg_adapter`, forward and backward; the SG-Adapter and
  AdaptFormer run the same kernels) and "loss" (`sage_fast.kernels.la_loss`: FIT's loss and the LA
  loss alone, gradients included);
* the adapter is checked against the folded PyTorch adapter (`sage_fast.ops.fold.sg_adapter_torch`),
  the loss against the reference (`sage_fast.ops.reference`), both in fp64 from the same (rounded)
  inputs; each output and gradient must lie within `TOLERANCES[dtype]` (relative Frobenius error);
* the problems are tiny (`sage_fast.ops.parity`, which registers the checks here: this module
  imports no glue, so that `sage_fast.ops.backend` can use it), so the cost is the kernels'
  compilation for that specialisation plus a few launches; on CPU, under Triton's interpreter,
  0.1 to 1 s per family and dtype (not measured on a GPU yet).

`sage_fast.ops.backend.resolve_backend` asks for the check (the one place a backend is decided), the
first time it resolves to Triton for a family on a device and dtype; the result is kept for the
rest of the process. A failure (a mismatch, a compile error, a launch error) makes "auto" warn once
(`SelfCheckWarning`) and take the PyTorch path for that family, and "triton" raise
`SelfCheckError`. ``SAGE_FAST_SELF_CHECK=0`` skips the check (recorded as "skipped").

The check runs with autocast off and gradients on, whatever the caller's context.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

FAMILIES = ("adapter", "loss")
#: The one table of the check's tolerances: the largest relative Frobenius error,
#: ||got - want|| / ||want||, of any output or gradient against the fp64 PyTorch result. fp32: rounding
#: of fp32 arithmetic; fp16 (11-bit mantissa) and bf16 (8-bit) outputs and GEMM operands are rounded
#: to the dtype, and a rounded pre-activation may cross 0 and change one unit's leaky slope.
TOLERANCES: Dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
#: the environment variable that turns the check off ("0")
ENV_VAR = "SAGE_FAST_SELF_CHECK"


class SelfCheckError(RuntimeError):
    """backend='triton' where the kernels failed their self-check: a user-facing one-line error."""

    #: the `sage-fast` command prints it as ``sage-fast: error: ...`` and exits with status 2
    user_error = True


class SelfCheckWarning(RuntimeWarning):
    """backend='auto' falls back to PyTorch for a kernel family that failed its self-check."""


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """One family's check on one device and dtype. status: "passed", "failed" or "skipped"."""

    family: str
    device: str
    dtype: str
    status: str
    reason: Optional[str] = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_RESULTS: Dict[Tuple[str, str, torch.dtype], CheckResult] = {}
_WARNED: set = set()
_LOCK = threading.RLock()


def enabled() -> bool:
    """False when SAGE_FAST_SELF_CHECK=0 (read when a check would run)."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


def device_key(device: Union[str, torch.device]) -> str:
    """"cuda:N" (the current device for a bare "cuda") or the device type."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def describe_device(device: Union[str, torch.device]) -> str:
    """The device as a user reads it: GPU name and compute capability, or "cpu (Triton interpreter)"."""
    device = torch.device(device_key(device))
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}, {device})"
    return f"{device} (Triton interpreter)" if device.type == "cpu" else str(device)


def versions_line() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:  # pragma: no cover - Triton is a dependency on Linux
        tv = "not installed"
    return f"torch {torch.__version__}, Triton {tv}"


_CHECKS: Dict[str, Callable[[torch.device, torch.dtype], Optional[str]]] = {}


def register_check(family: str, check: Callable[[torch.device, torch.dtype], Optional[str]]) -> None:
    """Install the check of `family`: check(device, dtype) runs the kernels and PyTorch on a small
    problem and returns None when they agree, else the reason (an exception counts as a failure).
    `sage_fast.ops.parity` registers both families when the ops package is imported."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    _CHECKS[family] = check


def one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _run(family: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Optional[str]]:
    """(status, reason) of running the check now."""
    try:
        no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext()
        with torch.inference_mode(False), torch.enable_grad(), no_autocast:
            bad = _CHECKS[family](device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous launch error surfaces here
    except Exception as err:  # a compile or launch error is a failed check, whatever its type
        return "failed", f"the kernel did not run: {one_line(err)}"
    return ("failed", bad) if bad else ("passed", None)


def self_check(family: str, device: Union[str, torch.device], dtype: torch.dtype) -> CheckResult:
    """The check of `family` on `device` in `dtype`: run on the first call, the kept result after.

    Recorded as "skipped" (and not run) when SAGE_FAST_SELF_CHECK=0 at the first call.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if family not in _CHECKS:  # pragma: no cover - the ops package imports parity, which registers both
        raise RuntimeError(f"no self-check is registered for {family!r} (import sage_fast.ops)")
    if dtype not in TOLERANCES:
        raise ValueError(f"the kernels are checked in {[dtype_name(t) for t in TOLERANCES]}, not {dtype}")
    key = (family, device_key(device), dtype)
    found = _RESULTS.get(key)  # the path of every call after the first: no lock
    if found is not None:
        return found
    with _LOCK:
        found = _RESULTS.get(key)
        if found is not None:
            return found
        if not enabled():
            result = CheckResult(family, key[1], dtype_name(dtype), "skipped", f"{ENV_VAR}=0")
        else:
            start = time.perf_counter()
            status, reason = _run(family, torch.device(key[1]), dtype)
            result = CheckResult(family, key[1], dtype_name(dtype), status, reason,
                                 round(time.perf_counter() - start, 3))
        _RESULTS[key] = result
        return result


def cached_result(family: str, device: Union[str, torch.device], dtype: torch.dtype) -> Optional[CheckResult]:
    """The kept result, or None where the check has not run; never runs it (what torch.compile's trace reads)."""
    return _RESULTS.get((family, device_key(device), dtype))


def failure_message(result: CheckResult) -> str:
    """One line: which kernels, where, with which versions, and what went wrong."""
    return (f"the Triton {result.family} kernels failed their self-check on {describe_device(result.device)} in "
            f"{result.dtype} ({versions_line()}): {result.reason}")


def error(result: CheckResult) -> SelfCheckError:
    """backend='triton' and a failed check: the one-line error."""
    err = SelfCheckError(
        f"model.backend=triton: {failure_message(result)}. Use backend 'auto' (falls back to PyTorch) or "
        f"'torch', or set {ENV_VAR}=0 to skip the check"
    )
    err.result = result
    return err


def warn_fallback(result: CheckResult) -> None:
    """backend='auto' and a failed check: warn once per family, device and dtype."""
    key = (result.family, result.device, result.dtype)
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(
        f"sage-fast: {failure_message(result)}; the {result.family} runs on the PyTorch path for the rest of this "
        f"process (backend 'torch' chooses it from the start; {ENV_VAR}=0 skips the check)",
        SelfCheckWarning, stacklevel=4,
    )


def run_self_checks(device: Union[str, torch.device], dtypes=(torch.float32,),
                    families=FAMILIES) -> List[dict]:
    """Run (or read) the checks of `families` on `device` for each of `dtypes` now, e.g. before a
    `torch.compile` or at start-up; returns their results as plain data (`results` entries)."""
    return [self_check(f, device, dt).as_dict() for f in families for dt in dtypes]


def results() -> List[dict]:
    """Every check this process has run or skipped so far, as plain data: family, device, dtype,
    status ("passed" | "failed" | "skipped"), reason (None when passed) and seconds."""
    with _LOCK:
        return [r.as_dict() for r in _RESULTS.values()]


def reset() -> None:
    """Forget every result and warning (tests; a process that changed its Triton set-up)."""
    with _LOCK:
        _RESULTS.clear()
        _WARNED.clear()
