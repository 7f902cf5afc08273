"""Fused SG-Adapter: the algebra of SAGE.md section 1.2, with Triton kernels per token.

`SGAdapterFused` is a drop-in replacement for the reference `SGAdapter` (same constructor plus
`backend`, same sub-modules, parameters and state_dict). Per forward:

1. `fold_adapter_weights` (PyTorch, fp32, differentiable, weight-only work):
   W_cat (d, 2r) and b_cat (2r,) absorb LN_a's affine, the text projection, the guidance and the
   three down-projections.
2. Per token, one Triton kernel (`sage_fast.kernels.sg_adapter`): LayerNorm statistics and
   normalisation, h = xhat @ W_cat + b_cat, leaky activation (slope 1 - alpha), a = act @ W_up^T +
   b_up, and either `a` (drop-in `forward`) or the Sage block epilogue `x + mlp_out + s * a`
   (`forward_block`), so the block makes one pass over its activations.
3. Backward (`SGAdapterFunction`, Triton): dx (LayerNorm backward included), dW_cat, db_cat, dW_up,
   db_up, ds, and d mlp_out = dout; autograd carries dW_cat and db_cat back through the fold into
   ln, proj, down_v, down_vt, down_t, s_vt and the guidance.

Saved for backward: x itself (the caller holds it anyway, so no extra memory), the folded
weights (d x 2r, small) and two fp32 numbers per token row, mean and rstd: 8 bytes per row in
all. h (2r values per row) is not saved: the backward must read x again for the LayerNorm
backward anyway, and recomputing h = xhat @ W_cat in that same sweep costs a small GEMM instead of
holding 2r values per row between forward and backward. mlp_out and the adapter output a are not
saved either: d mlp_out = dout, and ds = sum(dout * a) is rebuilt as sum(act * (dout @ W_up)) +
b_up . colsum(dout). The backward writes act and dh (M, 2r) as transients for the weight-gradient
kernel, plus split-K partials of dW_cat and dW_up (split x d x 2r fp32); all are freed when
backward returns.

Dtypes: x may be fp32, fp16 or bf16 (fp64 runs the PyTorch path). GEMM operands use the compute
dtype, x's dtype, with fp32 accumulation (fp32 operands without TF32); LayerNorm statistics, the
activation and the epilogue run in fp32. mlp_out may have another float dtype; it is read as is.
Outputs: `forward` returns the compute dtype (like the reference's last Linear), `forward_block`
x's dtype. Under `torch.autocast` (the Sage model trains under bf16 autocast on CUDA) the compute
dtype is autocast's dtype for x's device whatever x's dtype, as the reference's Linear layers would
run; the fold stays in fp32 (autocast is disabled around it) and weight gradients come back fp32.
Under the Triton interpreter (CPU), whose bf16 dot products are wrong, bf16 GEMM operands are kept
in fp32 (outputs still bf16).

Registered as the custom ops `sage_fast::sg_adapter_fwd` and `sage_fast::sg_adapter_bwd`, so
`torch.compile(fullgraph=True)` traces a model that uses the adapter without a graph break.

Checks: input shapes, dtypes and devices as the reference (`check_adapter_inputs`); the folded
weights, `up` and s must be finite, else ValueError. That check costs one host-device sync per
forward (a few small reductions); set `module.check_finite = False` to skip it. It is skipped
while `torch.compile` traces (a data-dependent branch would break the graph); NaN weights then
give NaN outputs, never finite wrong ones. Non-contiguous x or mlp_out are copied to contiguous
memory first (documented fallback, costs one copy).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from ._triton_runtime import BACKENDS, HAS_TRITON, cannot_run_error, check_backend, device_ctx, triton_unavailable_reason  # noqa: F401
from .adapter import SGAdapter, check_adapter_inputs

if HAS_TRITON:  # the launch configurations below use triton's integer helpers
    import triton

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_kernels = None


def _kernel_module():
    """Import the kernels on first use (Triton is only needed once a Triton path runs)."""
    global _kernels
    if _kernels is None:
        _kernels = importlib.import_module("sage_fast.kernels.sg_adapter")
    return _kernels


# --------------------------------------------------------------------------------------------
# The fold (PyTorch, fp32, differentiable)
# --------------------------------------------------------------------------------------------


def fold_adapter_weights(adapter: SGAdapter, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold LN_a's affine, the guidance and the down-projections into one d x 2r map.

    Returns W_cat (d, 2r) and b_cat (2r,), fp32, with h = LN(x, no affine) @ W_cat + b_cat equal to
    the reference's concat(down_v(fv), down_vt(fvt) + s_vt * down_t(ft)). Differentiable: autograd
    takes gradients of W_cat and b_cat back to ln, proj, down_v, down_vt, down_t, s_vt, guidance.
    """
    d = adapter.dim
    with torch.autocast(device_type=guidance.device.type, enabled=False):
        gamma = adapter.ln.weight.float()
        beta = adapter.ln.bias.float()
        ft = F.layer_norm(guidance.float(), (d,), gamma, beta, adapter.eps)            # (d,)
        m = F.linear(ft, adapter.proj.weight.float(), adapter.proj.bias.float())      # (d,)
        w_dv = adapter.down_v.weight.float()                                          # (r, d)
        w_dvt = adapter.down_vt.weight.float()                                        # (r, d)
        c = adapter.down_vt.bias.float() + adapter.s_vt.float() * F.linear(
            ft, adapter.down_t.weight.float(), adapter.down_t.bias.float()
        )                                                                             # (r,)
        w_cat = torch.cat([w_dv.t() * gamma[:, None], w_dvt.t() * (gamma * m)[:, None]], dim=1)
        b_cat = torch.cat([w_dv @ beta + adapter.down_v.bias.float(), w_dvt @ (beta * m) + c])
    return w_cat, b_cat


def sg_adapter_torch(
    x: torch.Tensor,
    w_cat: torch.Tensor,
    b_cat: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    alpha: float,
    eps: float,
) -> torch.Tensor:
    """The folded adapter in plain PyTorch (the CPU / fp64 fallback): a = leaky(xhat @ W_cat + b) @ W_up^T + b_up.

    x: (..., d); w_cat: (d, 2r); b_cat: (2r,); w_up: (d, 2r) (nn.Linear layout); b_up: (d,).
    Runs in x's dtype (or autocast's), like the reference.
    """
    xhat = F.layer_norm(x, (x.shape[-1],), eps=eps)
    dt = xhat.dtype
    h = F.linear(xhat, w_cat.t().to(dt), b_cat.to(dt))
    act = F.leaky_relu(h, negative_slope=1.0 - alpha)
    return F.linear(act, w_up.to(act.dtype), b_up.to(act.dtype))


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


def _block_h(h: int) -> int:
    # GPU tl.dot needs every tile dim >= 16.
    return max(16, triton.next_power_of_2(h))


def _row_config(d: int, block_h: int, interpret: bool, op_dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) of the row kernels.

    Picked so that ptxas (sm_90) reports no register spills for both row kernels, for bf16, fp16
    and fp32 operands (tests/test_kernels_compile.py checks it); not timed on hardware yet, so a
    GPU autotune may do better.
    """
    cap_d = max(16, triton.next_power_of_2(d))
    if interpret:  # fewer, larger programs: the interpreter pays per program and per op
        return 64, min(128, cap_d), 4
    if block_h <= 64:
        # fp32 operands take twice the registers per tile: 64 rows spill there, 32 do not.
        return (32 if op_dtype == torch.float32 else 64), min(64, cap_d), 8
    if block_h <= 128:
        return 32, min(64, cap_d), 8
    if block_h <= 256:
        return 32, min(32, cap_d), 8
    return 16, 16, 8


def _dw_config(d: int, block_h: int, m: int, interpret: bool, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_D, BLOCK_H, SPLIT, num_warps) of the weight-gradient kernel (spill-free on sm_90).

    sms: the device's multiprocessor count; the row split fills about two waves of programs."""
    bh = min(block_h, 128)
    block_d = min(64 if bh <= 64 else 32, max(16, triton.next_power_of_2(d)))
    block_m = 64
    n_row_blocks = triton.cdiv(m, block_m)
    if interpret:
        return block_m, block_d, bh, min(2, n_row_blocks), 4
    tiles = triton.cdiv(d, block_d) * triton.cdiv(block_h, bh)
    split = max(1, min(n_row_blocks, triton.cdiv(2 * sms, tiles)))  # partials: split x d x H fp32
    return block_m, block_d, bh, split, 8


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
    op_dtype = _operand_dtype(compute_dtype, k.INTERPRET)
    w_cat_c = w_cat.to(op_dtype).contiguous()
    w_up_t = w_up.t().to(op_dtype).contiguous()                           # (H, d): coalesced rows of W_up^T
    block_h = _block_h(h)
    block_m, block_d, num_warps = _row_config(d, block_h, k.INTERPRET, op_dtype)
    with device_ctx(x):
        k.sg_adapter_fwd_kernel[(triton.cdiv(m_rows, block_m),)](
            x, mlp if block_epilogue else x, out, mean, rstd, w_cat_c, b_cat.float().contiguous(), w_up_t,
            b_up.float().contiguous(), scale.float() if block_epilogue else b_cat,
            m_rows, d, h, 1.0 - alpha, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_EPILOGUE=block_epilogue,
            DOT_PRECISION=_dot_precision(op_dtype), num_warps=num_warps,
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
    op_dtype = _operand_dtype(compute_dtype, k.INTERPRET)
    w_cat_c = w_cat.to(op_dtype).contiguous()
    w_up_c = w_up.to(op_dtype).contiguous()
    scale32 = scale.float() if block_epilogue else None
    block_h = _block_h(h)
    block_m, block_d, num_warps = _row_config(d, block_h, k.INTERPRET, op_dtype)
    n_prog = triton.cdiv(m_rows, block_m)
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
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_EPILOGUE=block_epilogue,
            DOT_PRECISION=prec, num_warps=num_warps,
        )
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
    bm, bd, bh, split, dw_warps = _dw_config(d, block_h, m_rows, k.INTERPRET, sms)
    dwcat_part = torch.empty((split, d, h), device=dev, dtype=torch.float32)
    dwup_part = torch.empty((split, d, h), device=dev, dtype=torch.float32)
    dbup_part = torch.empty((split, d), device=dev, dtype=torch.float32)
    with device_ctx(x):
        k.sg_adapter_bwd_dw_kernel[(triton.cdiv(h, bh), triton.cdiv(d, bd), split)](
            x, dout, mean, rstd, act, dh, dwcat_part, dwup_part, dbup_part,
            m_rows, d, h, split,
            BLOCK_M=bm, BLOCK_D=bd, BLOCK_H=bh, DOT_PRECISION=prec, num_warps=dw_warps,
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


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------


class SGAdapterFused(SGAdapter):
    """Semantic-guided adapter, fused (drop-in for `SGAdapter`).

    Args:
        dim, bottleneck, alpha, eps: as `SGAdapter`.
        backend: "auto" (Triton on CUDA tensors or under TRITON_INTERPRET=1, else the folded
            PyTorch path), "triton" (RuntimeError where Triton cannot run) or "torch" (folded
            PyTorch path always).

    Attributes:
        check_finite: raise ValueError when the folded weights, `up` or s hold NaN/Inf (one
            host-device sync per forward; default True).

    Shapes:
        forward(x (..., d), guidance (d,)) -> a (..., d)
        forward_block(x (..., d), guidance (d,), mlp_out (..., d), scale 0-dim) -> (..., d)
    """

    check_finite: bool = True

    def __init__(self, dim: int, bottleneck: int, alpha: float = 0.1, eps: float = 1e-5, backend: str = "auto"):
        super().__init__(dim, bottleneck, alpha=alpha, eps=eps)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        reason = triton_unavailable_reason(x.device)
        if self.backend == "triton":
            if reason is not None:
                raise cannot_run_error(reason)
            if x.dtype not in _TRITON_DTYPES:
                raise TypeError(f"backend='triton' supports fp32, fp16 and bf16 inputs, got {x.dtype}")
            return True
        return reason is None and x.dtype in _TRITON_DTYPES  # "auto": fp64 takes the PyTorch path

    def _check_finite(self, *tensors: torch.Tensor) -> None:
        if not self.check_finite or torch.compiler.is_compiling():
            return
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        if not bool(ok):
            raise ValueError(
                "SGAdapterFused: NaN or Inf in the adapter weights, the guidance or the block scale "
                "(checked on the folded W_cat, b_cat, up and s)"
            )

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def _run(self, x, guidance, mlp_out, scale):
        w_cat, b_cat = fold_adapter_weights(self, guidance)
        checked = [w_cat, b_cat, self.up.weight, self.up.bias] + ([scale] if scale is not None else [])
        self._check_finite(*checked)
        if not self._use_triton(x):
            a = sg_adapter_torch(x, w_cat, b_cat, self.up.weight, self.up.bias, self.alpha, self.eps)
            return a if scale is None else x + mlp_out + scale * a
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.dim).contiguous()
        mlp2 = mlp_out.reshape(-1, self.dim).contiguous() if mlp_out is not None else None
        scale32 = scale.float().reshape(()) if scale is not None else None
        out = SGAdapterFunction.apply(
            x2, w_cat, b_cat, self.up.weight.float(), self.up.bias.float(), scale32, mlp2,
            self.alpha, self.eps, self._compute_dtype(x),
        )
        return out.reshape(*lead, self.dim)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        check_adapter_inputs(x, guidance, self.dim)
        return self._run(x, guidance, None, None)

    def forward_block(
        self, x: torch.Tensor, guidance: torch.Tensor, mlp_out: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """Fused end of a Sage block: ``x + mlp_out + scale * adapter(x, guidance)`` in one pass.

        x: (..., d), f~ (adapter input and residual); mlp_out: (..., d), any float dtype, same
        device; scale: the block's scalar s (0-dim or 1-element tensor, or a Python number).
        Returns x's dtype.
        """
        check_adapter_inputs(x, guidance, self.dim)
        if not isinstance(mlp_out, torch.Tensor) or mlp_out.shape != x.shape:
            got = tuple(mlp_out.shape) if isinstance(mlp_out, torch.Tensor) else type(mlp_out).__name__
            raise ValueError(f"mlp_out must have the shape of x {tuple(x.shape)}, got {got}")
        if not mlp_out.is_floating_point() or mlp_out.device != x.device:
            raise ValueError(f"mlp_out must be a float tensor on {x.device}, got {mlp_out.dtype} on {mlp_out.device}")
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scale), device=x.device)
        if scale.numel() != 1:
            raise ValueError(f"scale must hold one number, got shape {tuple(scale.shape)}")
        if scale.device != x.device:
            raise ValueError(f"scale must be on {x.device}, got {scale.device}")
        return self._run(x, guidance, mlp_out, scale)
