"""Fused compensated LA loss and FIT loss (Sage, Eq. 22 to 24): autograd glue for the Triton kernel.

`fused_fit_loss` and `fused_la_loss` compute the same values as `FITLoss` / `compensated_la_loss`
in `sage_fast.ops.reference` (the PyTorch reference), in one kernel launch: the loss *and* the gradients
to z, zv, zt, s1, s2 come out of the forward pass (as in Liger's fused cross-entropy), and the
backward pass only multiplies the stored gradients by grad_output, in place.

Memory: the gradient buffers (one per logits tensor that requires grad, in its dtype) are the
ones autograd hands upstream anyway; besides them the forward writes z^ (returned, z's dtype) and
a few per-row fp32 vectors. No (B, C) fp32 tensor is materialised, except when a gradient flows
into the returned z^ (rare: the loss is what is differentiated), whose backward works in fp32.

Input validation happens inside the kernel's first pass (no extra pass over the logits): one
device-to-host sync per call reads the per-row status, and on a problem the error is raised
with the messages of `sage_fast.ops.checks` (labels out of range, NaN/Inf logits). Because of that
sync the call cannot be captured in a CUDA graph.

Limitations, by design:
* the gradients are computed in the forward pass, so one backward per forward: a second backward
  (retain_graph=True) raises; use backend="torch" for that or for double backward;
* fp64 inputs are computed in fp32 (the reference computes them in fp64; backend="auto" therefore
  picks PyTorch for fp64); the loss is still returned as fp64 then, the reference's dtype (`loss_dtype`);
* all rows ignored: the loss is NaN (0 / 0, as F.cross_entropy and the reference) and every
  gradient is 0.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from . import launch
from .backend import device_ctx, resolve_backend
from .checks import NonFiniteError, check_finite, check_float, check_ignore_index, check_labels, check_lambdas, check_same_device
from .reference import loss_dtype

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _kernels():
    # Imported lazily: `import sage_fast` must not need Triton, and Triton fixes interpret mode
    # when the kernel module is imported.
    from ..kernels import la_loss

    return la_loss


def _raise_input_error(status: int, z, zv, zt, target, log_prior, s, ignore_index: int) -> None:
    k = _kernels()
    num_classes = log_prior.numel()
    if status & k.STATUS_NONFINITE.value:
        for name, t in (("z", z), ("zv", zv), ("zt", zt)):
            if t is not None:
                check_finite("logits" if zv is None else name, t)
        check_finite("log_prior", log_prior)
    if status & k.STATUS_BAD_LABEL.value:
        check_labels(target, num_classes, z.shape[0], ignore_index)
    if status & k.STATUS_NONFINITE_ZHAT.value:
        s1, s2 = s.tolist()
        raise NonFiniteError(f"z^ = z + s1 * zv + s2 * zt is not finite (s1={s1}, s2={s2})")
    raise NonFiniteError(
        f"the adjusted logits (logits + log_prior) are not finite (kernel status {status}): they overflow fp32"
    )


def _fit_la_loss_forward(z, zv, zt, s, target, log_prior, lambdas, ignore_index, need, write_zhat):
    """Run the kernel. Returns (loss, ds (2,) fp32 or None, dz, dzv, dzt, z_hat); loss is fp32."""
    k = _kernels()
    fit = zv is not None
    batch, num_classes = z.shape
    device = z.device
    need_dz, need_dzv, need_dzt = need
    z_hat = torch.empty((batch, num_classes), dtype=z.dtype, device=device) if write_zhat else None
    dz = torch.empty((batch, num_classes), dtype=z.dtype, device=device) if need_dz else None
    dzv = torch.empty((batch, num_classes), dtype=zv.dtype, device=device) if need_dzv else None
    dzt = torch.empty((batch, num_classes), dtype=zt.dtype, device=device) if need_dzt else None
    loss_rows = torch.empty(batch, dtype=torch.float32, device=device)
    ds_rows = torch.zeros((batch, 2), dtype=torch.float32, device=device)
    status = torch.zeros(batch, dtype=torch.int32, device=device)
    n_valid = (target != ignore_index).sum().reshape(1)
    if batch:
        cfg = launch.select_loss_launch(batch, num_classes, z.dtype, fit, device)
        zv_, zt_ = (zv, zt) if fit else (z, z)
        grid = (cfg.programs(batch),)
        lam1, lam2, lam3 = lambdas
        with device_ctx(z):
            k.fit_la_loss_fwd_kernel[grid](
                z, zv_, zt_, z.stride(0), zv_.stride(0), zt_.stride(0),
                target, log_prior, s, n_valid,
                loss_rows, ds_rows, status,
                # Unused output pointers get a valid tensor; the constexpr flags keep them untouched.
                dz if need_dz else loss_rows,
                dzv if need_dzv else loss_rows,
                dzt if need_dzt else loss_rows,
                z_hat if write_zhat else loss_rows,
                batch, num_classes, ignore_index,
                float(lam1), float(lam2), float(lam3),
                FIT=fit, NEED_DZ=need_dz, NEED_DZV=need_dzv, NEED_DZT=need_dzt, WRITE_ZHAT=write_zhat,
                BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, **cfg.options(),
            )
        bad = int(status.max())  # the one host sync: validation
        if bad:
            _raise_input_error(bad, z, zv, zt, target, log_prior, s, ignore_index)
    loss = loss_rows.sum() / n_valid[0].to(torch.float32)  # all rows ignored: 0 / 0 = NaN, as the reference
    ds = ds_rows.sum(0) if fit else None
    return loss, ds, dz, dzv, dzt, z_hat


class FusedFITLALossFunction(torch.autograd.Function):
    """Autograd Function around `fit_la_loss_fwd_kernel`.

    forward(z, zv, zt, s1, s2, target, log_prior, lambdas, ignore_index, need_grad)
        z, zv, zt: (B, C), unit column stride; zv = zt = s1 = s2 = None for the plain LA loss.
        s1, s2: 0-dim tensors. target: (B,) int64. log_prior: (C,) fp32 contiguous, same device.
        Returns (loss, z^) with FIT, loss without; loss is a 0-dim fp32 tensor.
    """

    @staticmethod
    def forward(ctx, z, zv, zt, s1, s2, target, log_prior, lambdas, ignore_index, need_grad):
        fit = zv is not None
        needs = ctx.needs_input_grad
        need = (
            bool(need_grad and needs[0]),
            bool(fit and need_grad and needs[1]),
            bool(fit and need_grad and needs[2]),
        )
        if fit:
            s = torch.stack([s1.detach().reshape(()), s2.detach().reshape(())]).to(device=z.device, dtype=torch.float32)
        else:
            s = log_prior  # never read (FIT=False)
        loss, ds, dz, dzv, dzt, z_hat = _fit_la_loss_forward(
            z, zv, zt, s, target, log_prior, lambdas, ignore_index, need, fit
        )
        ctx.fit = fit
        ctx.grads = (dz, dzv, dzt)
        ctx.ds = ds if fit and need_grad and (needs[3] or needs[4]) else None
        ctx.s_meta = ((s1.dtype, s1.shape), (s2.dtype, s2.shape)) if fit else None
        if fit:
            ctx.save_for_backward(zv, zt, s)
            ctx.set_materialize_grads(False)
            return loss, z_hat
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *grad_rest):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss computes its gradients in the forward pass and they are used up by the "
                "first backward; a second backward through it (retain_graph=True) is not supported. "
                "Use backend='torch' for that."
            )
        dz, dzv, dzt = ctx.grads
        ctx.grads = None  # hand the buffers to autograd; nothing of size B x C stays on ctx
        ds = ctx.ds
        ctx.ds = None
        for g in (dz, dzv, dzt):
            if g is not None:
                if grad_loss is None:
                    g.zero_()
                else:
                    g.mul_(grad_loss)  # in place: no second B x C buffer
        if ds is not None:
            ds = ds * grad_loss if grad_loss is not None else torch.zeros_like(ds)
        grad_s1 = grad_s2 = None
        if ctx.fit:
            grad_zhat = grad_rest[0] if grad_rest else None
            if grad_zhat is not None:
                # z^ = z + s1 zv + s2 zt, computed in fp32 like the reference.
                zv, zt, s = ctx.saved_tensors
                gh = grad_zhat.float()
                if dz is not None:
                    dz.add_(gh)
                if dzv is not None:
                    dzv.add_(gh * s[0])
                if dzt is not None:
                    dzt.add_(gh * s[1])
                if ds is not None:
                    ds = ds + torch.stack([(gh * zv.float()).sum(), (gh * zt.float()).sum()])
            if ds is not None:
                (d1, sh1), (d2, sh2) = ctx.s_meta
                grad_s1 = ds[0].to(d1).reshape(sh1) if ctx.needs_input_grad[3] else None
                grad_s2 = ds[1].to(d2).reshape(sh2) if ctx.needs_input_grad[4] else None
        return dz, dzv, dzt, grad_s1, grad_s2, None, None, None, None, None


def _prepare_logits(name: str, t: torch.Tensor, num_classes: int) -> torch.Tensor:
    check_float(name, t)
    if t.ndim != 2 or t.shape[1] != num_classes:
        raise ValueError(f"{name} must have shape (batch, {num_classes}), got {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def _prepare_target(target: torch.Tensor, batch: int) -> torch.Tensor:
    # Dtype and shape only; the range is checked inside the kernel (no host sync here).
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.ndim != 1 or target.shape[0] != batch:
        raise ValueError(f"target must have shape ({batch},), got {tuple(target.shape)}")
    return target.to(torch.int64).contiguous()


def _check_log_prior(log_prior: torch.Tensor) -> int:
    check_float("log_prior", log_prior)
    if log_prior.ndim != 1 or log_prior.numel() == 0:
        raise ValueError(f"log_prior must have shape (C,), C >= 1, got {tuple(log_prior.shape)} (see compensated_log_prior)")
    return log_prior.numel()


def _prepare_log_prior(log_prior: torch.Tensor, device: torch.device) -> torch.Tensor:
    return log_prior.to(device=device, dtype=torch.float32).contiguous()


def _as_scalar_tensor(name: str, v, device: torch.device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point scalar, got {v.dtype}")
        return v
    return torch.tensor(float(v), device=device)


def fused_fit_loss(
    z: torch.Tensor,
    zv: torch.Tensor,
    zt: torch.Tensor,
    target: torch.Tensor,
    log_prior: torch.Tensor,
    s1: Union[torch.Tensor, float],
    s2: Union[torch.Tensor, float],
    lambdas: Sequence[float],
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FIT's loss l(z) + lam1 l(zv) + lam2 l(zt) + lam3 l(z^), z^ = z + s1 zv + s2 zt, fused.

    z, zv, zt: (B, C) float (fp16, bf16, fp32; fp64 is computed in fp32), same device.
    target: (B,) integer in [0, C) or `ignore_index`. log_prior: (C,), `compensated_log_prior`.
    s1, s2: scalar tensors (gradients flow to them) or floats. lambdas: (lam1, lam2, lam3).
    Returns (loss, z^): loss 0-dim, mean over the non-ignored rows, fp32 (fp64 when a logits tensor is
    fp64, as the reference); z^ (B, C) in z's dtype, differentiable (a gradient into z^ is added to the
    stored ones in backward).
    """
    lambdas = check_lambdas(lambdas)
    ignore_index = check_ignore_index(ignore_index)
    num_classes = _check_log_prior(log_prior)
    z = _prepare_logits("z", z, num_classes)
    zv = _prepare_logits("zv", zv, num_classes)
    zt = _prepare_logits("zt", zt, num_classes)
    if not (z.shape == zv.shape == zt.shape):
        raise ValueError(f"z, zv, zt must have the same shape, got {tuple(z.shape)}, {tuple(zv.shape)}, {tuple(zt.shape)}")
    check_same_device(z=z, zv=zv, zt=zt, target=target)
    resolve_backend("triton", z.device)  # a clear error where Triton cannot run
    target = _prepare_target(target, z.shape[0])
    log_prior = _prepare_log_prior(log_prior, z.device)
    s1 = _as_scalar_tensor("s1", s1, z.device)
    s2 = _as_scalar_tensor("s2", s2, z.device)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (z, zv, zt, s1, s2))
    loss, z_hat = FusedFITLALossFunction.apply(
        z, zv, zt, s1, s2, target, log_prior, lambdas, ignore_index, need_grad
    )
    return loss.to(loss_dtype(z, zv, zt)), z_hat


def fused_la_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    log_prior: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Compensated LA cross-entropy (Eq. 22), fused: the FIT kernel with FIT off (one stream).

    logits: (B, C) float; target: (B,) integer in [0, C) or `ignore_index`; log_prior: (C,).
    Returns the 0-dim mean over the non-ignored rows (NaN when every row is ignored), fp32 (fp64 for fp64
    logits, as the reference).
    """
    ignore_index = check_ignore_index(ignore_index)
    num_classes = _check_log_prior(log_prior)
    logits = _prepare_logits("logits", logits, num_classes)
    check_same_device(logits=logits, target=target)
    resolve_backend("triton", logits.device)  # a clear error where Triton cannot run
    target = _prepare_target(target, logits.shape[0])
    log_prior = _prepare_log_prior(log_prior, logits.device)
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    loss = FusedFITLALossFunction.apply(
        logits, None, None, None, None, target, log_prior, (0.0, 0.0, 0.0), ignore_index, need_grad
    )
    return loss.to(loss_dtype(logits))
