"""The one backend switch: which implementation runs, decided in `resolve_backend`.

Every op module (`SGAdapterFused`, `CompensatedLALoss`, `FITLoss`), the Sage model and the run
config take ``backend`` = "auto" | "triton" | "torch":

* "torch": the literal PyTorch reference (`sage_fast.ops.reference`), the oracle of the tests;
* "triton": the fused Triton kernels; a RuntimeError (`TritonUnavailableError`) where they cannot run;
* "auto": the fastest correct path here. The kernels on CUDA (fp16, bf16, fp32); elsewhere, and for
  fp64, PyTorch: for the adapter its folded form (`sage_fast.ops.fold.sg_adapter_torch`, the same
  math as the kernels, several times faster than the literal reference on CPU), for the loss the
  reference. "auto" never picks Triton's CPU interpreter, a test tool orders of magnitude slower.

The kernels' self-check (`sage_fast.ops.selfcheck`) is part of the decision: the first time a
module's call resolves to Triton for an op ("adapter" | "loss") on a device and dtype, the kernels
run once on a tiny problem against PyTorch. Where they fail (wrong numbers, a compile or launch
error), "auto" warns once and takes the PyTorch path for that op for the rest of the process, and
"triton" raises `SelfCheckError` (a one-line user error). SAGE_FAST_SELF_CHECK=0 skips the check.
`explain_backend` says what an op resolves to, and why, as plain data.

Triton runs on CUDA tensors, and on CPU tensors only in Triton's interpreter, which must be switched
on (TRITON_INTERPRET=1) before triton is first imported: Triton decides interpret mode when a
function is decorated, for its own standard library at that first import.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch

from . import selfcheck

try:  # Triton is optional: without it the PyTorch paths still work.
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
#: the dtypes the kernels take; other dtypes take PyTorch under "auto"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpret_enabled() -> bool:
    """True when the Triton kernels run (or will run) in the interpreter, on CPU tensors.

    The one flag is `sage_fast.kernels.utils.INTERPRET`, decided once per process (see there).
    """
    if not HAS_TRITON:  # pragma: no cover - depends on the install
        return False
    from ..kernels import utils  # needs only Triton; imports no kernel

    return utils.INTERPRET


def triton_unavailable_reason(device: Union[str, torch.device]) -> Optional[str]:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    device = torch.device(device)
    if not HAS_TRITON:  # pragma: no cover - Triton is a dependency on Linux
        return "the triton package is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if interpret_enabled():
            return None
        return (
            "the tensors are on the CPU and Triton's interpreter is off "
            "(set TRITON_INTERPRET=1 before triton is first imported)"
        )
    return f"Triton does not run on device type {device.type!r}"


def check_backend(backend: str) -> str:
    """Validate a backend name; backend='triton' also needs Triton to be importable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not HAS_TRITON:  # pragma: no cover
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    return backend


OPS = ("adapter", "loss")
#: what each op runs when the kernels do not: the adapter's folded form or the loss's reference
_TORCH_PATHS = {"adapter": "the folded PyTorch adapter (sage_fast.ops.fold.sg_adapter_torch)",
                "loss": "the PyTorch reference loss"}


def _auto_prefers_triton(device: torch.device) -> bool:
    """Whether "auto" takes the kernels on this device type where they can run: CUDA only, never Triton's
    CPU interpreter (a test tool, orders of magnitude slower). The tests replace it to drive "auto"'s
    self-check fallback through the interpreter."""
    return device.type == "cuda"


def _decide(backend: str, device, dtype: Optional[torch.dtype], op: Optional[str]) -> Tuple[str, str, object]:
    """(choice, why, self-check result or None): the one decision behind `resolve_backend` and `explain_backend`."""
    check_backend(backend)
    if op is not None and op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend == "torch":
        return "torch", "backend 'torch' asks for the PyTorch reference", None
    device = torch.device(device)
    reason = triton_unavailable_reason(device)
    if backend == "triton":
        if reason is not None:
            raise cannot_run_error(reason)
        why = "backend 'triton' asks for the kernels"
    elif not _auto_prefers_triton(device):
        return "torch", f"'auto' runs the kernels on CUDA only, not on {device.type}", None
    elif reason is not None:
        return "torch", f"the kernels cannot run here: {reason}", None
    elif dtype is not None and dtype not in TRITON_DTYPES:
        return "torch", f"the kernels take fp32, fp16 and bf16, not {dtype}", None
    else:
        why = f"'auto' runs the kernels on {device.type}"
    if op is None or dtype not in TRITON_DTYPES:
        return "triton", why, None
    # A torch.compile trace reads the kept result and warns nothing: the check runs eagerly (a first
    # eager call, or `selfcheck.run_self_checks`), never inside a graph.
    compiling = torch.compiler.is_compiling()
    result = selfcheck.cached_result(op, device, dtype) if compiling else selfcheck.self_check(op, device, dtype)
    if result is None or not result.failed:
        return "triton", why, result
    if backend == "triton":
        raise selfcheck.error(result)
    if not compiling:
        selfcheck.warn_fallback(result)
    return "torch", f"the kernels failed their self-check: {result.reason}", result


def resolve_backend(
    backend: str, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None, op: Optional[str] = None
) -> str:
    """"triton" or "torch": whether the kernels run for inputs on `device` of `dtype` (see the module doc).

    "auto" -> "triton" on CUDA for fp16 / bf16 / fp32 (dtype None: any of them), else "torch";
    "triton" -> "triton", or RuntimeError where Triton cannot run; "torch" -> "torch".
    op ("adapter" | "loss"; the modules pass it) with a kernel dtype: the first "triton" answer for that
    op, device and dtype runs the kernels' self-check (`sage_fast.ops.selfcheck`); where it failed,
    "auto" -> "torch" (with one warning) and "triton" -> `SelfCheckError`.
    """
    return _decide(backend, device, dtype, op)[0]


def decide_backends(backend: str, device: Union[str, torch.device], dtypes=(torch.float32,)) -> list:
    """Decide every op for `backend` on `device` in each of `dtypes` now, before any work: runs the
    self-checks, so 'triton' raises `SelfCheckError` (or the error of a device Triton cannot run on)
    and 'auto' warns about a fallback here rather than in the first step. Returns the
    `explain_backend` entries, op by op and dtype by dtype."""
    for op in OPS:
        for dtype in dtypes:
            resolve_backend(backend, device, dtype, op=op)
    return [explain_backend(op, backend, device, dtype) for op in OPS for dtype in dtypes]


def explain_backend(op: str, backend: str = "auto", device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict:
    """What `op` ("adapter" | "loss") runs for `backend` on `device` in `dtype`, and why, as plain data.

    Runs the self-check where the answer depends on it (a GPU). Keys: op, requested, dtype, device,
    resolved ("triton" | "torch"), path (what runs), reason, fallback (True where "auto" took PyTorch
    because the kernels failed their self-check), self_check (the check's result as a dict, or None
    where none applies). backend 'triton' where it cannot run: resolved None and the error as
    the reason, instead of raising.
    """
    entry = {"op": op, "requested": backend, "device": str(device), "dtype": selfcheck.dtype_name(dtype)}
    try:
        choice, why, result = _decide(backend, device, dtype, op)
    except (TritonUnavailableError, selfcheck.SelfCheckError) as err:  # backend 'triton' that cannot run: say so
        found = getattr(err, "result", None)
        return {**entry, "resolved": None, "path": None, "reason": str(err), "fallback": False,
                "self_check": found.as_dict() if found is not None else None}
    if choice == "triton":
        path = "the Triton kernels"
    elif backend == "torch":
        path = "the PyTorch reference"
    else:
        path = _TORCH_PATHS[op]
    fallback = choice == "torch" and result is not None and result.failed
    return {**entry, "resolved": choice, "path": path, "reason": why, "fallback": fallback,
            "self_check": result.as_dict() if result is not None else None}


class TritonUnavailableError(RuntimeError):
    """backend='triton' where Triton cannot run (no CUDA, CPU tensors without the interpreter)."""


def cannot_run_error(reason: str) -> TritonUnavailableError:
    return TritonUnavailableError(f"backend='triton' cannot run here: {reason}. Use backend='auto' or 'torch'.")


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (multi-GPU without set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
