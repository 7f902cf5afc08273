"""The problem's inputs and output buffers, and one launch of a kernel at a configuration, with exactly the
arguments the glue passes (sage_fast/ops/sg_adapter.py, sage_fast/ops/la_loss.py) for the same inputs and
configuration: `benchmarks/test_tuning.py` checks it against the glue's own launches.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Dict, Optional

import torch

from sage_fast.ops.launch import row_block_h

from ..harness import long_tailed_counts
from .problems import Problem

ALPHA, EPS, SCALE = 0.3, 1e-5, 0.8
LOSS_LAMBDAS = (0.015, 0.015, 0.4)
LOSS_S = (0.1, -0.05)


def kernel_module(p: Problem):
    """The kernel module of the problem, imported on first use: importing the tuner must not import the
    kernels (Triton fixes interpret mode when a kernel is decorated; `compile_sm90` imports them itself)."""
    if p.kernel == "loss":
        from sage_fast.kernels import la_loss

        return la_loss
    from sage_fast.kernels import sg_adapter

    return sg_adapter


def adapter_data(p: Problem, device, seed: int = 0, placeholder: bool = False, tensors: Optional[dict] = None):
    """The inputs of the adapter kernels for (d, r, rows, dtype), derived as the glue derives them from
    (x, mlp, dout, w_cat, b_cat, w_up, b_up, scale). `tensors` gives those (the consistency test);
    `placeholder`: 16-element CPU tensors of the right dtypes (enough for compiling: the JIT
    specialises on dtypes, alignment and integer values, not on sizes)."""
    from sage_fast.ops.sg_adapter import _dot_precision

    dt, m, d, h = p.torch_dtype, p.rows, p.d, p.h
    if placeholder:
        def mk(shape, dtype):
            return torch.empty(16, dtype=dtype)
        t = {"x": mk(0, dt), "mlp": mk(0, dt), "dout": mk(0, dt), "w_cat": mk(0, torch.float32),
             "b_cat": mk(0, torch.float32), "w_up": mk(0, torch.float32), "b_up": mk(0, torch.float32),
             "scale": torch.empty((), dtype=torch.float32)}
        ns = SimpleNamespace(**t, w_cat_c=mk(0, dt), w_up_t=mk(0, dt), w_cat_t=mk(0, dt), w_up_c=mk(0, dt),
                             wsum=mk(0, torch.float32))
    else:
        if tensors is None:
            gen = torch.Generator(device=device).manual_seed(seed)

            def randn(*shape, std=1.0, mean=0.0):
                return torch.randn(*shape, generator=gen, device=device) * std + mean

            tensors = {
                "x": randn(m, d).to(dt), "mlp": randn(m, d).to(dt), "dout": randn(m, d, mean=1.0).to(dt),
                "w_cat": randn(d, h, std=d ** -0.5), "b_cat": randn(h, std=0.5),
                "w_up": randn(d, h, std=h ** -0.5), "b_up": randn(d, std=0.1),
                "scale": torch.tensor(SCALE, device=device),
            }
        ns = SimpleNamespace(**tensors)
        ns.w_cat_c = ns.w_cat.to(dt).contiguous()
        ns.w_up_t = ns.w_up.t().to(dt).contiguous()
        ns.w_cat_t = ns.w_cat_c.t().contiguous()
        ns.w_up_c = ns.w_up.to(dt).contiguous()
        ns.wsum = ns.w_cat_c.float().sum(0)
        ns.b_cat = ns.b_cat.float().contiguous()
        ns.b_up = ns.b_up.float().contiguous()
        ns.scale = ns.scale.float()
    ns.rows, ns.d, ns.h, ns.slope, ns.eps = m, d, h, 1.0 - ALPHA, EPS
    ns.prec = _dot_precision(dt)
    ns.placeholder, ns.device = placeholder, ("cpu" if placeholder else device)
    return ns


def loss_data(p: Problem, device, seed: int = 0, placeholder: bool = False, tensors: Optional[dict] = None):
    """The loss kernel's inputs (training: every gradient), as `_fit_la_loss_forward` passes them."""
    from sage_fast.ops import compensated_log_prior

    dt, b, c = p.torch_dtype, p.batch, p.classes
    if placeholder:
        ns = SimpleNamespace(z=torch.empty(16, dtype=dt), zv=torch.empty(16, dtype=dt), zt=torch.empty(16, dtype=dt),
                             target=torch.empty(16, dtype=torch.int64), log_prior=torch.empty(16),
                             s=torch.empty(16), n_valid=torch.empty(1, dtype=torch.int64))
    else:
        if tensors is None:
            gen = torch.Generator(device=device).manual_seed(seed)
            target = torch.randint(0, c, (b,), generator=gen, device=device)
            label = torch.nn.functional.one_hot(target, c).float()
            z, zv, zt = ((torch.randn(b, c, generator=gen, device=device) * 5 + 5 * label).to(dt) for _ in range(3))
            tensors = {"z": z, "zv": zv, "zt": zt, "target": target,
                       "log_prior": compensated_log_prior(long_tailed_counts(c)).to(device)}
        ns = SimpleNamespace(**tensors)
        ns.log_prior = ns.log_prior.to(device=device, dtype=torch.float32).contiguous()
        ns.s = torch.tensor(LOSS_S, device=device, dtype=torch.float32)
        ns.n_valid = (ns.target != -100).sum().reshape(1)
    if not p.fit:
        ns.zv = ns.zt = ns.z
        ns.s = ns.log_prior
    ns.batch, ns.classes, ns.stride = b, c, c
    ns.lambdas = LOSS_LAMBDAS if p.fit else (0.0, 0.0, 0.0)
    ns.placeholder, ns.device = placeholder, ("cpu" if placeholder else device)
    return ns


def alloc_outputs(p: Problem, data, cfg) -> SimpleNamespace:
    """The output buffers of one launch of `cfg` (their sizes may depend on it: partial sums)."""
    dev = data.device

    def mk(shape, dtype, zeros=False):
        if data.placeholder:
            return torch.empty(16, dtype=dtype)
        return (torch.zeros if zeros else torch.empty)(shape, dtype=dtype, device=dev)

    f32 = torch.float32
    if p.kernel == "fwd":
        return SimpleNamespace(out=mk((data.rows, data.d), data.x.dtype), mean=mk((data.rows,), f32),
                               rstd=mk((data.rows,), f32))
    if p.kernel == "dx":
        n = cfg.programs(data.rows)
        dt = data.w_cat_c.dtype
        return SimpleNamespace(dx=mk((data.rows, data.d), data.x.dtype), act=mk((data.rows, data.h), dt),
                               dh=mk((data.rows, data.h), dt), ds_part=mk((n,), f32), dbcat_part=mk((n, data.h), f32))
    if p.kernel == "dw":
        return SimpleNamespace(dwcat_part=mk((cfg.split, data.d, data.h), f32),
                               dwup_part=mk((cfg.split, data.d, data.h), f32), dbup_part=mk((cfg.split, data.d), f32))
    shape, dt = (data.batch, data.classes), data.z.dtype
    return SimpleNamespace(loss_rows=mk((data.batch,), f32), ds_rows=mk((data.batch, 2), f32, zeros=True),
                           status=mk((data.batch,), torch.int32, zeros=True), dz=mk(shape, dt),
                           dzv=mk(shape, dt) if p.fit else None, dzt=mk(shape, dt) if p.fit else None,
                           z_hat=mk(shape, dt) if p.fit else None)


def launch_spec(k, p: Problem, data, cfg, out) -> tuple:
    """(kernel, grid, args, kwargs) of one launch of `cfg`: exactly what the glue passes
    (sage_fast/ops/sg_adapter.py, sage_fast/ops/la_loss.py) for the same inputs and configuration."""
    if p.kernel == "fwd":
        fn = k.sg_adapter_fwd_kernel
        args = (data.x, data.mlp, out.out, out.mean, out.rstd, data.w_cat_c, data.b_cat, data.w_up_t, data.b_up,
                data.scale, data.rows, data.d, data.h, data.slope, data.eps)
        kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_H=row_block_h(data.h), BLOCK_EPILOGUE=True,
                      DOT_PRECISION=data.prec, **cfg.options())
        return fn, (cfg.programs(data.rows),), args, kwargs
    if p.kernel == "dx":
        fn = k.sg_adapter_bwd_dx_kernel
        args = (data.x, data.dout, out.dx, data.mean, data.rstd, data.w_cat_c, data.w_cat_t, data.b_cat, data.wsum,
                data.w_up_c, data.scale, out.act, out.dh, out.ds_part, out.dbcat_part,
                data.rows, data.d, data.h, data.slope)
        kwargs = dict(BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_H=row_block_h(data.h), BLOCK_EPILOGUE=True,
                      DOT_PRECISION=data.prec, **cfg.options())
        return fn, (cfg.programs(data.rows),), args, kwargs
    if p.kernel == "dw":
        fn = k.sg_adapter_bwd_dw_kernel
        args = (data.x, data.dout, data.mean, data.rstd, data.act, data.dh, out.dwcat_part, out.dwup_part,
                out.dbup_part, data.rows, data.d, data.h)
        kwargs = dict(SPLIT=cfg.split, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, BLOCK_H=cfg.block_h,
                      DOT_PRECISION=data.prec, **cfg.options())
        return fn, cfg.grid(data.d, data.h), args, kwargs
    fn = k.fit_la_loss_fwd_kernel
    lam1, lam2, lam3 = data.lambdas
    args = (data.z, data.zv, data.zt, data.stride, data.stride, data.stride, data.target, data.log_prior, data.s,
            data.n_valid, out.loss_rows, out.ds_rows, out.status, out.dz,
            out.dzv if p.fit else out.loss_rows, out.dzt if p.fit else out.loss_rows,
            out.z_hat if p.fit else out.loss_rows, data.batch, data.classes, -100,
            float(lam1), float(lam2), float(lam3))
    kwargs = dict(FIT=p.fit, NEED_DZ=True, NEED_DZV=p.fit, NEED_DZT=p.fit, WRITE_ZHAT=p.fit,
                  BLOCK_B=cfg.block_b, BLOCK_C=cfg.block_c, **cfg.options())
    return fn, (cfg.programs(data.batch),), args, kwargs


def outputs_of(p: Problem, out) -> Dict[str, torch.Tensor]:
    """The outputs the gate compares, partial sums reduced (their count depends on the configuration)."""
    if p.kernel == "fwd":
        return {"out": out.out, "mean": out.mean, "rstd": out.rstd}
    if p.kernel == "dx":
        return {"dx": out.dx, "act": out.act, "dh": out.dh, "ds": out.ds_part.sum(), "db_cat": out.dbcat_part.sum(0)}
    if p.kernel == "dw":
        return {"dw_cat": out.dwcat_part.sum(0), "dw_up": out.dwup_part.sum(0), "db_up": out.dbup_part.sum(0)}
    got = {"loss": out.loss_rows, "status": out.status, "dz": out.dz}
    if p.fit:
        got.update({"ds": out.ds_rows, "dzv": out.dzv, "dzt": out.dzt, "z_hat": out.z_hat})
    return got


def poison(p: Problem, out) -> None:
    """NaN into every output the kernel must write (integers: -7), so that an unwritten element fails the gate."""
    for name, t in vars(out).items():
        if t is None or (p.kernel == "loss" and name == "ds_rows" and not p.fit):
            continue  # the LA loss does not write ds (the glue zero-fills it)
        t.fill_(float("nan") if t.is_floating_point() else -7)
