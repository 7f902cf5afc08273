"""The self-check's problems (`sage_fast.ops.selfcheck`): small random adapter and loss problems, their
forward + backward on the Triton kernels or on PyTorch, and the comparison of the two.

* adapter: 20 rows, d = 48, r = 4, block form ``x + mlp + s * a`` and drop-in form; against the
  folded PyTorch adapter (`sage_fast.ops.fold.sg_adapter_torch`): output, dx, dW_cat, db_cat, dW_up,
  db_up, d mlp_out, ds (SG-Adapter and AdaptFormer run the same kernels);
* loss: 6 rows (one ignored), 37 classes, FIT's loss (with a gradient into z^) and the LA loss
  alone; against the reference (`sage_fast.ops.reference`): loss, z^ and every gradient.

PyTorch computes in fp64 from the same inputs rounded to the dtype under test; each tensor must lie
within `selfcheck.TOLERANCES` (relative Frobenius error). The inputs come from generators seeded
here: the global RNG is untouched. The problems and steps are public: the environment report's
speed probe (`sage_fast.model.runtime`) times the same code on both paths.

Importing this module registers the two checks with `selfcheck` (the ops package imports it):
`selfcheck` itself imports no glue, so that `sage_fast.ops.backend` can ask it without an import cycle.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .fold import sg_adapter_torch
from .la_loss import fused_fit_loss, fused_la_loss
from .reference import compensated_log_prior, fit_loss, logit_adjusted_loss
from .selfcheck import TOLERANCES, register_check
from .sg_adapter import SGAdapterFunction


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    scale = max(float(want.norm()), 1e-12)
    return float((got - want).norm()) / scale


def compare(what: str, got: Dict[str, Optional[torch.Tensor]], want: Dict[str, torch.Tensor], tol: float) -> Optional[str]:
    """The first output or gradient out of tolerance (or missing, or not finite), as a reason; None if all agree."""
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            return f"{what}: {name} is missing"
        if not bool(torch.isfinite(g).all()):
            return f"{what}: {name} holds NaN or Inf"
        err = relative_error(g, w)
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
        fn = fused_fit_loss if kernels else fit_loss
        loss, z_hat = fn(t["z"], t["zv"], t["zt"], t["target"], t["log_prior"], t["s1"], t["s2"], _LAMBDAS)
        # dzhat in z^'s dtype: what autograd hands the kernels' backward
        (loss + (z_hat * t["dzhat"].to(z_hat.dtype)).sum()).backward()
        extra = {"z^": z_hat}
    else:
        fn = fused_la_loss if kernels else logit_adjusted_loss
        loss = fn(t["z"], t["target"], t["log_prior"])
        loss.backward()
        extra = {}
    return {"loss": loss, **extra, **{f"d {k}": t[k].grad for k in names}}


def check_adapter(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    p = adapter_problem()
    for block in (True, False):
        got = adapter_step(leaves(p, device, dtype), dtype, block=block)
        want = adapter_step(leaves(p, device, dtype, torch.float64), dtype, block=block, kernels=False)
        bad = compare("block form" if block else "drop-in form", got, want, TOLERANCES[dtype])
        if bad:
            return bad
    return None


def check_loss(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    p = loss_problem()
    for fit in (True, False):
        got = loss_step(leaves(p, device, dtype), fit=fit)
        want = loss_step(leaves(p, device, dtype, torch.float64), fit=fit, kernels=False)
        bad = compare("FIT loss" if fit else "LA loss", got, want, TOLERANCES[dtype])
        if bad:
            return bad
    return None


register_check("adapter", check_adapter)
register_check("loss", check_loss)
