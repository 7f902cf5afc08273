"""The one backend switch: which implementation runs, decided in `resolve_backend`.

Every op module (`SGAdapterFused`, `CompensatedLALoss`, `FITLoss`), the Sage model and the run
config take ``backend`` = "auto" | "triton" | "torch":

* "torch": the literal PyTorch reference (`sage_fast.ops.reference`), the oracle of the tests;
* "triton": the fused Triton kernels; a RuntimeError where they cannot run;
* "auto": the fastest correct path here. The kernels on CUDA (fp16, bf16, fp32); elsewhere, and for
  fp64, PyTorch: for the adapter its folded form (`sage_fast.ops.fold.sg_adapter_torch`, the same
  math as the kernels, several times faster than the literal reference on CPU), for the loss the
  reference. "auto" never picks Triton's CPU interpreter, a test tool orders of magnitude slower.

Triton runs on CUDA tensors, and on CPU tensors only in Triton's interpreter, which must be switched
on (TRITON_INTERPRET=1) before triton is first imported: Triton decides interpret mode when a
function is decorated, for its own standard library at that first import.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

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


def resolve_backend(backend: str, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None) -> str:
    """"triton" or "torch": whether the kernels run for inputs on `device` of `dtype` (see the module doc).

    "auto" -> "triton" on CUDA for fp16 / bf16 / fp32 (dtype None: any of them), else "torch";
    "triton" -> "triton", or RuntimeError where Triton cannot run; "torch" -> "torch".
    """
    check_backend(backend)
    if backend == "torch":
        return "torch"
    device = torch.device(device)
    reason = triton_unavailable_reason(device)
    if backend == "triton":
        if reason is not None:
            raise cannot_run_error(reason)
        return "triton"
    usable = device.type == "cuda" and reason is None
    return "triton" if usable and (dtype is None or dtype in TRITON_DTYPES) else "torch"


def cannot_run_error(reason: str) -> RuntimeError:
    return RuntimeError(f"backend='triton' cannot run here: {reason}. Use backend='auto' or 'torch'.")


def device_ctx(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (multi-GPU without set_device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
