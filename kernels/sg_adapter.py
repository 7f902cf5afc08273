"""Triton kernels of the fused SG-Adapter (docs/kernels.md, "The adapter kernels").

The weights are folded once per forward in PyTorch (`sage_fast.ops.fold.fold_adapter_weights`),
so per token row x (width D) the adapter is

    xhat = (x - mean(x)) * rstd                     # LayerNorm without affine (folded into W_cat)
    h    = xhat @ W_cat + b_cat                     # (H,) with H = 2r
    act  = leaky(h)                                 # slope 1 on h > 0, (1 - alpha) elsewhere
    a    = act @ W_up^T + b_up                      # (D,)
    out  = a                        (drop-in)   or   x + mlp_out + s * a      (block epilogue)

Three kernels, all over row-major 2-D tensors whose rows are contiguous:

- `sg_adapter_fwd_kernel`: one program per BLOCK_M rows; writes out and the per-row mean and rstd
  (fp32), the only activations saved for backward.
- `sg_adapter_bwd_dx_kernel`: one program per BLOCK_M rows; recomputes h (cheaper than storing it:
  x has to be read again for the LayerNorm backward anyway, and h would cost 2r values per row
  between forward and backward), computes dh, dx (LayerNorm backward included), and writes act and
  dh (M, H) as transient inputs of the weight-gradient kernel, plus per-program partial sums of
  db_cat and of ds.
- `sg_adapter_bwd_dw_kernel`: dW_cat = xhat^T @ dh and dW_up = dout^T @ act as split-K GEMMs over
  the rows (xhat recomputed on the fly from x, mean, rstd), plus colsum(dout); it writes one fp32
  partial per split, summed by the caller (deterministic, no atomics).

Precision: every reduction and every elementwise step runs in fp32. GEMM operands are cast to the
weights' dtype (the caller passes the weights already in the compute dtype) and accumulate in fp32;
with fp32 operands DOT_PRECISION must be "ieee" (no TF32) for fp32 parity. D is walked in BLOCK_D
chunks, so any width works; H is padded to BLOCK_H (a power of two, at least 16, as GPU tl.dot
needs) with zero weights, so the padded hidden units are exactly zero.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import utils  # noqa: F401  (decides interpret mode before the kernels below are decorated)


@triton.jit
def _row_stats(X, rows64, row_mask, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mean and rstd of each row, in fp32.

    The sums are shifted by the row's first element, so that E[x^2] - E[x]^2 does not cancel
    catastrophically when a row's mean is large next to its spread.
    """
    shift = tl.load(X + rows64 * D, mask=row_mask, other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x = tl.load(X + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(mask, x - shift[:, None], 0.0)
        s1 += tl.sum(xs, axis=1)
        s2 += tl.sum(xs * xs, axis=1)
    mean_s = s1 / D
    var = tl.maximum(s2 / D - mean_s * mean_s, 0.0)
    return shift + mean_s, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _hidden(X, WCAT, BCAT, rows64, row_mask, mean, rstd, D, H,
            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """h = xhat @ W_cat + b_cat for BLOCK_M rows, (BLOCK_M, BLOCK_H) fp32 (padded columns are 0)."""
    cols_h = tl.arange(0, BLOCK_H)
    h_mask = cols_h < H
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        mask = row_mask[:, None] & c_mask[None, :]
        x = tl.load(X + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(WCAT + cols[:, None] * H + cols_h[None, :], mask=c_mask[:, None] & h_mask[None, :], other=0.0)
        acc = tl.dot(xhat.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    b = tl.load(BCAT + cols_h, mask=h_mask, other=0.0).to(tl.float32)
    return acc + b[None, :]


@triton.jit
def sg_adapter_fwd_kernel(
    X, MLP, OUT, MEAN, RSTD, WCAT, BCAT, WUPT, BUP, SCALE,
    M, D, H, slope, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Forward of BLOCK_M rows.

    X, MLP, OUT: (M, D); MEAN, RSTD: (M,) fp32 outputs; WCAT: (D, H) and WUPT: (H, D) in the
    compute dtype; BCAT: (H,), BUP: (D,) fp32; SCALE: 0-dim fp32 (read only with BLOCK_EPILOGUE).
    OUT = a, or X + MLP + SCALE * a with BLOCK_EPILOGUE (MLP may have another float dtype than X).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)  # M * D can pass 2^31 at large batch sizes

    mean, rstd = _row_stats(X, rows64, row_mask, D, eps, BLOCK_M, BLOCK_D)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)

    h = _hidden(X, WCAT, BCAT, rows64, row_mask, mean, rstd, D, H, BLOCK_M, BLOCK_D, BLOCK_H, DOT_PRECISION)
    act = tl.where(h > 0, h, h * slope).to(WUPT.dtype.element_ty)

    cols_h = tl.arange(0, BLOCK_H)
    h_mask = cols_h < H
    if BLOCK_EPILOGUE:
        s = tl.load(SCALE).to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        mask = row_mask[:, None] & c_mask[None, :]
        wt = tl.load(WUPT + cols_h[:, None] * D + cols[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
        a = tl.dot(act, wt, input_precision=DOT_PRECISION)
        a += tl.load(BUP + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        if BLOCK_EPILOGUE:
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            mlp = tl.load(MLP + offs, mask=mask, other=0.0).to(tl.float32)
            a = x + mlp + s * a
        tl.store(OUT + offs, a.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def sg_adapter_bwd_dx_kernel(
    X, DOUT, DX, MEAN, RSTD, WCAT, WCATT, BCAT, WSUM, WUP, SCALE,
    ACT, DH, DS_PART, DBCAT_PART,
    M, D, H, slope,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_EPILOGUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Backward of BLOCK_M rows, everything but the weight GEMMs.

    X, DOUT, DX: (M, D); WCAT, WUP: (D, H) and WCATT: (H, D) in the compute dtype; BCAT, WSUM
    (column sums of the compute-dtype W_cat): (H,) fp32. Outputs: DX; ACT, DH: (M, H) in the
    compute dtype; DS_PART: (programs,) fp32, sum(act * (dout @ W_up)); DBCAT_PART: (programs, H).
    With BLOCK_EPILOGUE, dout is the gradient of x + mlp + s * a, so the adapter sees s * dout and
    x also gets dout straight through the residual.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows64 = rows.to(tl.int64)
    cols_h = tl.arange(0, BLOCK_H)
    h_mask = cols_h < H
    mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)

    # One sweep over D for both row-block GEMMs: h (recomputed) and gu = dout @ W_up.
    acc_h = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    gu = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        mask = row_mask[:, None] & c_mask[None, :]
        w_mask = c_mask[:, None] & h_mask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(WCAT + cols[:, None] * H + cols_h[None, :], mask=w_mask, other=0.0)
        acc_h = tl.dot(xhat.to(w.dtype), w, acc_h, input_precision=DOT_PRECISION)
        g = tl.load(DOUT + offs, mask=mask, other=0.0)
        wu = tl.load(WUP + cols[:, None] * H + cols_h[None, :], mask=w_mask, other=0.0)
        gu = tl.dot(g.to(wu.dtype), wu, gu, input_precision=DOT_PRECISION)
    b = tl.load(BCAT + cols_h, mask=h_mask, other=0.0).to(tl.float32)
    h = acc_h + b[None, :]
    act = tl.where(h > 0, h, h * slope)

    # ds = sum(dout * a) = sum(act * gu) + b_up . colsum(dout); the second term is added by the
    # caller from the colsum the weight kernel produces, so a is never recomputed.
    tl.store(DS_PART + pid, tl.sum(tl.sum(act * gu, axis=1), axis=0))
    if BLOCK_EPILOGUE:
        gu = gu * tl.load(SCALE).to(tl.float32)
    dh = gu * tl.where(h > 0, 1.0, slope)
    tl.store(DBCAT_PART + pid * H + cols_h, tl.sum(dh, axis=0), mask=h_mask)

    cdt = WCAT.dtype.element_ty
    dh_c = dh.to(cdt)
    mh = row_mask[:, None] & h_mask[None, :]
    offs_h = rows64[:, None] * H + cols_h[None, :]
    tl.store(ACT + offs_h, act.to(cdt), mask=mh)
    tl.store(DH + offs_h, dh_c, mask=mh)

    # LayerNorm backward needs mean(dxhat) and mean(dxhat * xhat) over the row before any dx can
    # be written; both follow from (M, H) quantities, so D is swept only once more:
    #   sum_d dxhat_d          = dh . colsum(W_cat)
    #   sum_d dxhat_d * xhat_d = dh . (xhat @ W_cat) = dh . (h - b_cat)
    dh_r = dh_c.to(tl.float32)  # the values the dx GEMM below actually uses
    wsum = tl.load(WSUM + cols_h, mask=h_mask, other=0.0)
    c1 = tl.sum(dh_r * wsum[None, :], axis=1) / D
    c2 = tl.sum(dh_r * (h - b[None, :]), axis=1) / D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        mask = row_mask[:, None] & c_mask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        wt = tl.load(WCATT + cols_h[:, None] * D + cols[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)
        dxhat = tl.dot(dh_c, wt, input_precision=DOT_PRECISION)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
        if BLOCK_EPILOGUE:
            dx += tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def sg_adapter_bwd_dw_kernel(
    X, DOUT, MEAN, RSTD, ACT, DH, DWCAT_PART, DWUP_PART, DBUP_PART,
    M, D, H, SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Split-K weight gradients. Grid (cdiv(H, BLOCK_H), cdiv(D, BLOCK_D), SPLIT).

    Program (j, i, s) sums the row blocks s, s + SPLIT, ... into
    DWCAT_PART[s, i-tile, j-tile] = xhat^T @ dh and DWUP_PART[s, i-tile, j-tile] = dout^T @ act,
    both (SPLIT, D, H) fp32, and (for j = 0) DBUP_PART[s, i-tile] = colsum(dout), (SPLIT, D) fp32.
    The H tiles vary fastest in the grid, so programs that read the same x and dout rows run
    side by side and share them through L2.
    """
    pid_h = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_mask = cols < D
    cols_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = cols_h < H
    acc_w = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    dbu = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_row_blocks = tl.cdiv(M, BLOCK_M)
    for rb in range(pid_s, n_row_blocks, SPLIT):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        mask = row_mask[:, None] & c_mask[None, :]
        mh = row_mask[:, None] & h_mask[None, :]
        offs = rows64[:, None] * D + cols[None, :]
        offs_h = rows64[:, None] * H + cols_h[None, :]
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dh = tl.load(DH + offs_h, mask=mh, other=0.0)
        acc_w = tl.dot(tl.trans(xhat.to(dh.dtype)), dh, acc_w, input_precision=DOT_PRECISION)
        g = tl.load(DOUT + offs, mask=mask, other=0.0)
        act = tl.load(ACT + offs_h, mask=mh, other=0.0)
        acc_u = tl.dot(tl.trans(g.to(act.dtype)), act, acc_u, input_precision=DOT_PRECISION)
        dbu += tl.sum(g.to(tl.float32), axis=0)
    w_offs = pid_s.to(tl.int64) * D * H + cols[:, None] * H + cols_h[None, :]
    w_mask = c_mask[:, None] & h_mask[None, :]
    tl.store(DWCAT_PART + w_offs, acc_w, mask=w_mask)
    tl.store(DWUP_PART + w_offs, acc_u, mask=w_mask)
    if pid_h == 0:
        tl.store(DBUP_PART + pid_s * D + cols, dbu, mask=c_mask)
