"""The fold: the SG-Adapter's weight-only algebra, and the folded adapter in plain PyTorch.

LN_a's affine, the guidance, the text projection and the three down-projections collapse into one
d x 2r map W_cat and a bias b_cat (derivation: docs/method.md, "The fold"), so per token the adapter
is LayerNorm without affine, two small GEMMs and a leaky activation. `sg_adapter_torch` is that
folded form in PyTorch: the path `backend="auto"` takes off CUDA (several times faster than the
literal reference on CPU), and the math the Triton kernels implement.

The ablations fold too. Without W_proj^vt (``text_proj=False``) the text branch's m is f_t itself.
LIFT's AdaptFormer is the fold's one-branch case: W_cat = diag(gamma) W_down (d x r), b_cat =
beta W_down + b_down, slope 0 (ReLU, alpha = 1), so the same kernels run it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def fold_adapter_weights(adapter, guidance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold LN_a's affine, the guidance and the down-projections into one d x 2r map.

    Returns W_cat (d, 2r) and b_cat (2r,), fp32, with h = LN(x, no affine) @ W_cat + b_cat equal to
    the reference's concat(down_v(fv), down_vt(fvt) + s_vt * down_t(ft)). Differentiable: autograd
    takes gradients of W_cat and b_cat back to ln, proj, down_v, down_vt, down_t, s_vt, guidance.
    An adapter without `proj` (text_proj=False) has m = f_t.
    """
    d = adapter.dim
    with torch.autocast(device_type=guidance.device.type, enabled=False):
        gamma = adapter.ln.weight.float()
        beta = adapter.ln.bias.float()
        ft = F.layer_norm(guidance.float(), (d,), gamma, beta, adapter.eps)            # (d,)
        if adapter.proj is not None:
            m = F.linear(ft, adapter.proj.weight.float(), adapter.proj.bias.float())  # (d,)
        else:
            m = ft
        w_dv = adapter.down_v.weight.float()                                          # (r, d)
        w_dvt = adapter.down_vt.weight.float()                                        # (r, d)
        c = adapter.down_vt.bias.float() + adapter.s_vt.float() * F.linear(
            ft, adapter.down_t.weight.float(), adapter.down_t.bias.float()
        )                                                                             # (r,)
        w_cat = torch.cat([w_dv.t() * gamma[:, None], w_dvt.t() * (gamma * m)[:, None]], dim=1)
        b_cat = torch.cat([w_dv @ beta + adapter.down_v.bias.float(), w_dvt @ (beta * m) + c])
    return w_cat, b_cat


def fold_adaptformer_weights(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an `AdaptFormer`'s LayerNorm affine into its down-projection.

    Returns W_cat (d, r) and b_cat (r,), fp32, with LN(x, no affine) @ W_cat + b_cat = down(ln(x)).
    Differentiable back to ln and down.
    """
    with torch.autocast(device_type=adapter.down.weight.device.type, enabled=False):
        gamma = adapter.ln.weight.float()
        beta = adapter.ln.bias.float()
        w = adapter.down.weight.float()                                               # (r, d)
        w_cat = w.t() * gamma[:, None]                                                # (d, r)
        b_cat = w @ beta + adapter.down.bias.float()                                  # (r,)
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

    x: (..., d); w_cat: (d, H); b_cat: (H,); w_up: (d, H) (nn.Linear layout); b_up: (d,); H = 2r for
    the SG-Adapter, r for AdaptFormer (alpha = 1). Runs in x's dtype (or autocast's), like the reference.
    """
    xhat = F.layer_norm(x, (x.shape[-1],), eps=eps)
    dt = xhat.dtype
    h = F.linear(xhat, w_cat.t().to(dt), b_cat.to(dt))
    act = F.leaky_relu(h, negative_slope=1.0 - alpha)
    return F.linear(act, w_up.to(act.dtype), b_up.to(act.dtype))
