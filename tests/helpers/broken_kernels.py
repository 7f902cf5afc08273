"""Kernels made wrong on purpose, for the self-check's tests: the real Triton kernels (interpreted on CPU)
behind a proxy that perturbs one output after the launch, or a launch that raises.

The glue reaches its kernels through `sage_fast.ops.sg_adapter._kernel_module()` and
`sage_fast.ops.la_loss._kernels()`; the helpers replace those with monkeypatch, so the change ends
with the test.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from sage_fast.ops import la_loss as la_glue
from sage_fast.ops import sg_adapter as adapter_glue

#: where each kernel writes what the tests perturb (positional arguments of the glue's launch)
ADAPTER_FWD_OUT = 2   # sg_adapter_fwd_kernel(x, mlp, out, ...)
ADAPTER_DX_OUT = 2    # sg_adapter_bwd_dx_kernel(x, dout, dx, ...)
LOSS_DZ_OUT = 13      # fit_la_loss_fwd_kernel(z, zv, zt, 3 strides, target, log_prior, s, n_valid, loss_rows, ds_rows, status, dz, ...)


class _Launcher:
    """kernel[grid](*args) that runs the real kernel, counts the launch, then calls `after(args)`;
    or raises `error` instead of launching."""

    def __init__(self, kernel, after: Optional[Callable] = None, error: Optional[BaseException] = None):
        self.kernel, self.after, self.error, self.launches = kernel, after, error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            if self.error is not None:
                raise self.error
            self.kernel[grid](*args, **kwargs)
            if self.after is not None:
                self.after(args)
        return launch


class _KernelModule:
    """The real kernel module with some kernels replaced by launchers."""

    def __init__(self, real, launchers: Dict[str, _Launcher]):
        self._real, self._launchers = real, launchers

    def __getattr__(self, name):
        return self._launchers.get(name) or getattr(self._real, name)


def scale_arg(index: int, factor: float) -> Callable:
    """An `after` that multiplies the launch's positional argument `index` (an output) in place."""
    return lambda args: args[index].mul_(factor)


def break_adapter(monkeypatch, kernel: str = "sg_adapter_fwd_kernel", after=None, error=None) -> _Launcher:
    """Replace one adapter kernel ("sg_adapter_fwd_kernel", "sg_adapter_bwd_dx_kernel",
    "sg_adapter_bwd_dw_kernel"); returns its launcher (launch count in `.launches`)."""
    real = adapter_glue._kernel_module()
    launcher = _Launcher(getattr(real, kernel), after, error)
    monkeypatch.setattr(adapter_glue, "_kernel_module", lambda: _KernelModule(real, {kernel: launcher}))
    return launcher


def break_loss(monkeypatch, after=None, error=None) -> _Launcher:
    """Replace the loss kernel `fit_la_loss_fwd_kernel`; returns its launcher."""
    real = la_glue._kernels()
    launcher = _Launcher(real.fit_la_loss_fwd_kernel, after, error)
    monkeypatch.setattr(la_glue, "_kernels", lambda: _KernelModule(real, {"fit_la_loss_fwd_kernel": launcher}))
    return launcher
