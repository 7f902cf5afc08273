"""Autograd glue of the fused SG-Adapter over the Triton kernels of `sage_fast.kernels.sg_adapter`.

Per call, after `sage_fast.ops.fold.fold_adapter_weights` has folded the adapter into W_cat, b_cat:

* forward (one kernel): LayerNorm statistics and normalisation, h = xhat @ W_cat + b_cat, leaky
  activation (slope 1 - alpha), a = act @ W_up^T + b_up, and either `a` (drop-in form) or the Sage
  block epilogue `x + mlp_out + s * a` (block form), so the block makes one pass over its activations;
* backward (a dx kernel with the LayerNorm backward, then a weight-gradient kernel): dx, dW_cat,
  db_cat, dW_up, db_up, ds, and d mlp_out = dout; autograd carries dW_cat and db_cat back through
  the fold into the adapter's parameters and the guidance.

Saved for backward: x itself (the caller holds it anyway), the folded weights (d x 2r, small) and
two fp32 numbers per token row, mean and rstd: 8 bytes per row. h (2r values per row) is not saved:
the backward reads x again for the LayerNorm backward anyway, and recomputing h in that sweep costs a
small GEMM instead of holding 2r values per row between forward and backward. mlp_out and a are not
saved either: d mlp_out = dout, and ds = sum(dout * a) is rebuilt as sum(act * (dout @ W_up)) +
b_up . colsum(dout). The backward writes act and dh (M, 2r) as transients for the weight-gradient
kernel, plus split-K partials of dW_cat and dW_up (split x d x 2r fp32), freed when backward returns.

Dtypes: GEMM operands use the compute dtype with fp32 accumulation (fp32 operands without TF32);
LayerNorm statistics, the activation and the epilogue run in fp32. Under the Triton interpreter
(CPU), whose bf16 dot products are wrong, bf16 GEMM operands are kept in fp32 (outputs still bf16).

Registered as the custom ops `sage_fast::sg_adapter_fwd` and `sage_fast::sg_adapter_bwd`, so
`torch.compile(fullgraph=True)` traces a model that uses the adapter without a graph break.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import backend, launch
from .backend import device_ctx

_kernels = None


def _kernel_module():
    """Import the kernels on first use (Triton is only needed once a Triton path runs)."""
    global _kernels
    if _kernels is None:
        _kernels = importlib.import_module("sage_fast.kernels.sg_adapter")
    return _kernels


# --------------------------------------------------------------------------------------------
# Operands (the launch configurations are in `sage_fast.ops.launch`)
# --------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _operand_dtype(compute_dtype: torch.dtype, interpret: bool) -> torch.dtype:
    # The Triton interpreter computes bf16 dots wrongly (loads, casts and stores are right), so
    # there the GEMM operands stay fp32; outputs keep the requested dtype.
    return torch.float32 if interpret and compute_dtype == torch.bfloat16 else compute_dtype


def _check_op_operand(name: str, t: torch.Tensor, shape=None) -> None:
    # The kernels index rows as row * d: they need 2-D tensors with contiguous rows.
    if t.ndim != 2 or (shape is not None and t.shape != shape):
        raise ValueError(f"{name} must be 2-D{'' if shape is None else ' of shape ' + str(tuple(shape))}, got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the module makes it so; direct op callers must too)")


# --------------------------------------------------------------------------------------------
# Custom ops (opaque to torch.compile; shapes come from the fake implementations)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("sage_fast::sg_adapter_fwd", mutates_args=())
def sg_adapter_fwd(
    x: torch.Tensor,
    w_cat: torch.Tensor,
    b_cat: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scale: Optional[torch.Tensor],
    mlp: Optional[torch.Tensor],
    alpha: float,
    eps: float,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward. x, mlp: (M, d) contiguous; w_cat, w_up: (d, H) fp32; b_cat: (H,); b_up: (d,);
    scale: 0-dim fp32. With scale and mlp given, out = x + mlp + scale * a (x's dtype), else out = a
    (compute dtype). Returns (out (M, d), mean (M,) fp32, rstd (M,) fp32)."""
    k = _kernel_module()
    _check_op_operand("x", x)
    if mlp is not None:
        _check_op_operand("mlp", mlp, x.shape)
    m_rows, d = x.shape
    h = w_cat.shape[1]
    block_epilogue = scale is not None
    if block_epilogue != (mlp is not None):
        raise ValueError("sg_adapter_fwd: scale and mlp go together (block epilogue) or are both None")
    out = torch.empty((m_rows, d), device=x.device, dtype=x.dtype if block_epilogue else compute_dtype)
    mean = torch.empty((m_rows,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((m_rows,), device=x.device, dtype=torch.float32)
    if m_rows == 0:
        return out, mean, rstd
    op_dtype = _operand_dtype(compute_dtype, backend.interpret_enabled())
    w_cat_c = w_cat.to(op_dtype).contiguous()
    w_up_t = w_up.t().to(op_dtype).contiguous()                           # (H, d): coalesced rows of W_up^T
    row = launch.row_launch(d, h, op_dtype, x.device, kernel="fwd")
    with device_ctx(x):
        k.sg_adapter_fwd_kernel[(row.programs(m_rows),)](
            x, mlp if block_epilogue else x, out, mean, rstd, w_cat_c, b_cat.float().contiguous(), w_up_t,
            b_up.float().contiguous(), scale.float() if block_epilogue else b_cat,
            m_rows, d, h, 1.0 - alpha, eps,
            BLOCK_M=row.block_m, BLOCK_D=row.block_d, BLOCK_H=launch.row_block_h(h),
            BLOCK_EPILOGUE=block_epilogue, DOT_PRECISION=_dot_precision(op_dtype), **row.options(),
        )
    return out, mean, rstd


@sg_adapter_fwd.register_fake
def _(x, w_cat, b_cat, w_up, b_up, scale, mlp, alpha, eps, compute_dtype):
    m_rows, d = x.shape
    out = x.new_empty((m_rows, d), dtype=x.dtype if scale is not None else compute_dtype)
    return out, x.new_empty((m_rows,), dtype=torch.float32), x.new_empty((m_rows,), dtype=torch.float32)


@torch.library.custom_op("sage_fast::sg_adapter_bwd", mutates_args=())
def sg_adapter_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    w_cat: torch.Tensor,
    b_cat: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scale: Optional[torch.Tensor],
    alpha: float,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward. dout: (M, d), the gradient of the forward's out. Returns
    (dx (M, d) x's dtype, dw_cat (d, H), db_cat (H,), dw_up (d, H), db_up (d,), ds 0-dim), all but
    dx fp32; ds is 0 without scale. In the block form d mlp = dout (the caller passes it on)."""
    k = _kernel_module()
    _check_op_operand("x", x)
    _check_op_operand("dout", dout, x.shape)
    m_rows, d = x.shape
    h = w_cat.shape[1]
    dev = x.device
    dx = torch.empty_like(x)
    if m_rows == 0:
        z = lambda *s: torch.zeros(s, device=dev, dtype=torch.float32)  # noqa: E731
        return dx, z(d, h), z(h), z(d, h), z(d), z()
    block_epilogue = scale is not None
    op_dtype = _operand_dtype(compute_dtype, backend.interpret_enabled())
    w_cat_c = w_cat.to(op_dtype).contiguous()
    w_up_c = w_up.to(op_dtype).contiguous()
    scale32 = scale.float() if block_epilogue else None
    row = launch.row_launch(d, h, op_dtype, dev, kernel="dx")
    n_prog = row.programs(m_rows)
    act = torch.empty((m_rows, h), device=dev, dtype=op_dtype)
    dh = torch.empty((m_rows, h), device=dev, dtype=op_dtype)
    ds_part = torch.empty((n_prog,), device=dev, dtype=torch.float32)
    dbcat_part = torch.empty((n_prog, h), device=dev, dtype=torch.float32)
    prec = _dot_precision(op_dtype)
    with device_ctx(x):
        k.sg_adapter_bwd_dx_kernel[(n_prog,)](
            x, dout, dx, mean, rstd, w_cat_c, w_cat_c.t().contiguous(), b_cat.float().contiguous(),
            w_cat_c.float().sum(0), w_up_c, scale32 if block_epilogue else b_cat,
            act, dh, ds_part, dbcat_part,
            m_rows, d, h, 1.0 - alpha,
            BLOCK_M=row.block_m, BLOCK_D=row.block_d, BLOCK_H=launch.row_block_h(h),
            BLOCK_EPILOGUE=block_epilogue, DOT_PRECISION=prec, **row.options(),
        )
    dw = launch.weight_grad_launch(d, h, m_rows, op_dtype, dev)
    dwcat_part = torch.empty((dw.split, d, h), device=dev, dtype=torch.float32)
    dwup_part = torch.empty((dw.split, d, h), device=dev, dtype=torch.float32)
    dbup_part = torch.empty((dw.split, d), device=dev, dtype=torch.float32)
    with device_ctx(x):
        k.sg_adapter_bwd_dw_kernel[dw.grid(d, h)](
            x, dout, mean, rstd, act, dh, dwcat_part, dwup_part, dbup_part,
            m_rows, d, h, SPLIT=dw.split,
            BLOCK_M=dw.block_m, BLOCK_D=dw.block_d, BLOCK_H=dw.block_h, DOT_PRECISION=prec,
            **dw.options(),
        )
    colsum = dbup_part.sum(0)                                           # sum over rows of dout
    dw_cat = dwcat_part.sum(0)
    db_cat = dbcat_part.sum(0)
    dw_up = dwup_part.sum(0)
    db_up = colsum
    ds = ds_part.sum() + torch.dot(b_up.float(), colsum)
    if block_epilogue:
        dw_up = dw_up * scale32
        db_up = db_up * scale32
    else:
        ds = torch.zeros_like(ds)
    return dx, dw_cat, db_cat, dw_up, db_up, ds


@sg_adapter_bwd.register_fake
def _(dout, x, mean, rstd, w_cat, b_cat, w_up, b_up, scale, alpha, compute_dtype):
    d, h = w_cat.shape
    f32 = torch.float32
    return (
        torch.empty_like(x),
        x.new_empty((d, h), dtype=f32),
        x.new_empty((h,), dtype=f32),
        x.new_empty((d, h), dtype=f32),
        x.new_empty((d,), dtype=f32),
        x.new_empty((), dtype=f32),
    )


class SGAdapterFunction(torch.autograd.Function):
    """Autograd glue over the two custom ops.

    forward(x2d, w_cat, b_cat, w_up, b_up, scale, mlp, alpha, eps, compute_dtype) -> out (M, d).
    scale and mlp are both None (drop-in: out = a) or both tensors (block: out = x + mlp + s * a).
    Saves x, mean, rstd (fp32 per row) and the small weights; see the module docstring for why h is
    recomputed rather than saved.
    """

    @staticmethod
    def forward(ctx, x, w_cat, b_cat, w_up, b_up, scale, mlp, alpha, eps, compute_dtype):
        out, mean, rstd = torch.ops.sage_fast.sg_adapter_fwd(
            x, w_cat, b_cat, w_up, b_up, scale, mlp, alpha, eps, compute_dtype
        )
        ctx.save_for_backward(x, mean, rstd, w_cat, b_cat, w_up, b_up, scale)
        ctx.alpha = alpha
        ctx.compute_dtype = compute_dtype
        ctx.mlp_dtype = mlp.dtype if mlp is not None else None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, mean, rstd, w_cat, b_cat, w_up, b_up, scale = ctx.saved_tensors
        dout = dout.contiguous()  # e.g. out.sum().backward() hands in an expanded (stride 0) tensor
        dx, dw_cat, db_cat, dw_up, db_up, ds = torch.ops.sage_fast.sg_adapter_bwd(
            dout, x, mean, rstd, w_cat, b_cat, w_up, b_up, scale, ctx.alpha, ctx.compute_dtype
        )
        dmlp = dout.to(ctx.mlp_dtype) if ctx.mlp_dtype is not None else None
        dscale = ds if scale is not None else None
        return dx, dw_cat, db_cat, dw_up, db_up, dscale, dmlp, None, None, None
