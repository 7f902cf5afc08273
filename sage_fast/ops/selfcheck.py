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
* the problems are tiny (adapter: 20 rows, d = 48, r = 4, drop-in and block form; loss: 6 rows, one
  of them ignored, 37 classes, FIT and plain), so the cost is the kernels' compilation for that
  specialisation plus a few launches; on CPU, under Triton's interpreter, 0.1 to 1 s per family
  and dtype (not measured on a GPU yet).

The problems and their forward + backward runs (`adapter_problem`, `loss_problem`, `leaves`,
`adapter_step`, `loss_step`) are public: the environment report's speed probe
(`sage_fast.model.runtime`) times the same code on both paths.

`sage_fast.ops.backend.resolve_backend` asks for the check (the one place a backend is decided), the
first time it resolves to Triton for a family on a device and dtype; the result is kept for the
rest of the process. A failure (a mismatch, a compile error, a launch error) makes "auto" warn once
(`SelfCheckWarning`) and take the PyTorch path for that family, and "triton" raise
`SelfCheckError`. ``SAGE_FAST_SELF_CHECK=0`` skips the check (recorded as "skipped").

The check draws its inputs from its own seeded generator (the global RNG is untouched) and runs
with autocast off and gradients on, whatever the caller's context.
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

from .fold import sg_adapter_torch
from .reference import compensated_log_prior, fit_loss, logit_adjusted_loss

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


# --------------------------------------------------------------------------------------------
# The problems and their comparison
# --------------------------------------------------------------------------------------------


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    scale = max(float(want.norm()), 1e-12)
    return float((got - want).norm()) / scale


def _compare(what: str, got: Dict[str, Optional[torch.Tensor]], want: Dict[str, torch.Tensor], tol: float) -> Optional[str]:
    """The first output or gradient out of tolerance (or missing, or not finite), as a reason; None if all agree."""
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            return f"{what}: {name} is missing"
        if not bool(torch.isfinite(g).all()):
            return f"{what}: {name} holds NaN or Inf"
        err = _relative_error(g, w)
        if not err <= tol:
            return f"{what}: {name} differs from PyTorch by {err:.2e} (relative; tolerance {tol:.0e})"
    return None


def adapter_problem(m: int = 20, d: int = 48, r: int = 4, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random folded adapter and its inputs, fp32 on the CPU, from a generator seeded with `seed`.

    x, mlp, dout: (m, d); w_cat, w_up: (d, 2r); b_cat: (2r,); b_up: (d,); scale: 0-dim.
    """
    gen = torch.Generator().manual_seed(seed)
    h = 2 * r
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    # dout and b_up lean positive so that d scale = sum(dout * a) does not cancel: a sum that cancels
    # would magnify the operands' legitimate rounding (bf16: 2^-8) past the tolerance.
    return {
        "x": rand(m, d) * 2.0 + 0.5, "mlp": rand(m, d), "dout": rand(m, d) * 0.5 + 1.0,
        "w_cat": rand(d, h) / d**0.5, "b_cat": rand(h) * 0.5,
        "w_up": rand(d, h) / h**0.5, "b_up": rand(d) * 0.5 + 1.0, "scale": torch.tensor(0.7),
    }


def loss_problem(batch: int = 6, num_classes: int = 37, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random logits z, zv, zt (B, C) and an upstream gradient dzhat of z^ (B, C), targets (B,) with row 1
    ignored (-100), a compensated log-prior (C,) and s1, s2: fp32 on the CPU, seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * 3.0  # noqa: E731
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    if batch > 1:
        target[1] = -100
    counts = torch.randint(1, 500, (num_classes,), generator=gen)
    return {
        "z": rand(batch, num_classes), "zv": rand(batch, num_classes), "zt": rand(batch, num_classes),
        # small next to the loss's own gradients ((p - e_y) / B), which it must not drown
        "dzhat": rand(batch, num_classes) * 0.002, "target": target,
        "log_prior": compensated_log_prior(counts.tolist(), 0.5, 0.05).float(),
        "s1": torch.tensor(0.4), "s2": torch.tensor(-0.3),
    }


_ALPHA, _EPS = 0.3, 1e-5  # alpha: leaky slope 0.7; AdaptFormer's ReLU (alpha 1) is the same code
_LAMBDAS = (0.1, 0.2, 0.4)


_ROUNDED = ("x", "mlp", "dout", "z", "zv", "zt", "dzhat")  # activations, logits, upstream grads: the dtype under test


def leaves(p: Dict[str, torch.Tensor], device, dtype: torch.dtype,
           compute_dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """A problem's tensors on `device`, fresh: activations, logits and upstream gradients rounded to
    `dtype`, the rest fp32; then all floats cast to `compute_dtype` if given (the check's fp64 twin).
    The inputs of the ops require grad; "dout", "dzhat" and "target" do not."""
    out = {}
    for k, v in p.items():
        if not v.is_floating_point():
            out[k] = v.to(device)
            continue
        t = v.to(device=device, dtype=dtype if k in _ROUNDED else torch.float32, copy=True)
        t = t.to(compute_dtype) if compute_dtype is not None else t
        out[k] = t if k in ("dout", "dzhat", "log_prior") else t.requires_grad_()
    return out


def adapter_step(t: Dict[str, torch.Tensor], dtype: torch.dtype, block: bool = True,
                 kernels: bool = True) -> Dict[str, torch.Tensor]:
    """Forward and backward of the adapter on `leaves` `t` of an `adapter_problem`:
    {"output", "d x", "d w_cat", "d b_cat", "d w_up", "d b_up"} plus "d mlp_out", "d scale" in the
    block form ``x + mlp + scale * a``. kernels=True: the Triton kernels computing in `dtype`;
    kernels=False: PyTorch's folded adapter in the leaves' dtype. Gradients are set, not accumulated."""
    names = ("x", "w_cat", "b_cat", "w_up", "b_up") + (("mlp", "scale") if block else ())
    for k in names:
        t[k].grad = None
    if kernels:
        from .sg_adapter import SGAdapterFunction

        out = SGAdapterFunction.apply(t["x"], t["w_cat"], t["b_cat"], t["w_up"], t["b_up"],
                                      t["scale"] if block else None, t["mlp"] if block else None, _ALPHA, _EPS, dtype)
    else:
        out = sg_adapter_torch(t["x"], t["w_cat"], t["b_cat"], t["w_up"], t["b_up"], _ALPHA, _EPS)
        if block:
            out = t["x"] + t["mlp"] + t["scale"] * out
    out.backward(t["dout"].to(out.dtype))
    return {"output": out, **{f"d {'mlp_out' if k == 'mlp' else k}": t[k].grad for k in names}}


def loss_step(t: Dict[str, torch.Tensor], fit: bool = True, kernels: bool = True) -> Dict[str, torch.Tensor]:
    """Forward and backward of the loss on `leaves` `t` of a `loss_problem`: FIT's loss (fit=True:
    "loss", "z^" and the gradients of z, zv, zt, s1, s2, with dzhat flowing into z^ as well) or the LA
    loss of z alone ("loss", "d z"). kernels=True: the fused kernel; kernels=False: the PyTorch reference
    in the leaves' dtype (fp16 / bf16 logits upcast to fp32, as the reference does)."""
    names = ("z", "zv", "zt", "s1", "s2") if fit else ("z",)
    for k in names:
        t[k].grad = None
    if fit:
        if kernels:
            from .la_loss import fused_fit_loss as fn
        else:
            fn = fit_loss
        loss, z_hat = fn(t["z"], t["zv"], t["zt"], t["target"], t["log_prior"], t["s1"], t["s2"], _LAMBDAS)
        # dzhat in z^'s dtype: what autograd hands the kernels' backward
        (loss + (z_hat * t["dzhat"].to(z_hat.dtype)).sum()).backward()
        extra = {"z^": z_hat}
    else:
        if kernels:
            from .la_loss import fused_la_loss as fn
        else:
            fn = logit_adjusted_loss
        loss = fn(t["z"], t["target"], t["log_prior"])
        loss.backward()
        extra = {}
    return {"loss": loss, **extra, **{f"d {k}": t[k].grad for k in names}}


def _check_adapter(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    p = adapter_problem()
    for block in (True, False):
        got = adapter_step(leaves(p, device, dtype), dtype, block=block)
        want = adapter_step(leaves(p, device, dtype, torch.float64), dtype, block=block, kernels=False)
        bad = _compare("block form" if block else "drop-in form", got, want, TOLERANCES[dtype])
        if bad:
            return bad
    return None


def _check_loss(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    p = loss_problem()
    for fit in (True, False):
        got = loss_step(leaves(p, device, dtype), fit=fit)
        want = loss_step(leaves(p, device, dtype, torch.float64), fit=fit, kernels=False)
        bad = _compare("FIT loss" if fit else "LA loss", got, want, TOLERANCES[dtype])
        if bad:
            return bad
    return None


_CHECKS: Dict[str, Callable[[torch.device, torch.dtype], Optional[str]]] = {
    "adapter": _check_adapter, "loss": _check_loss,
}


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
    if family not in _CHECKS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
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
