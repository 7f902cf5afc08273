"""SG-Adapter: the literal PyTorch reference of Eq. 7 and 8 (see SAGE.md section 1).

This module is the oracle the fused implementation (`sage_fast.fused_adapter.SGAdapterFused`)
is tested against. It is written for clarity, not speed: the text-guided projection runs once
per token, and the three down-projections run separately.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_float, check_last_dim, check_same_device


def lift_bottleneck(num_classes: int, num_layers: int = 12) -> int:
    """LIFT's bottleneck rule: r = 2^floor(log2(C / (2L))), at least 1."""
    if num_classes < 1 or num_layers < 1:
        raise ValueError(f"num_classes and num_layers must be positive, got {num_classes}, {num_layers}")
    ratio = num_classes / (2 * num_layers)
    if ratio < 2:
        return 1
    return 2 ** int(math.floor(math.log2(ratio)))


def check_adapter_inputs(x: torch.Tensor, guidance: torch.Tensor, dim: int) -> None:
    """Shape, dtype and device checks shared by the reference and the fused adapter."""
    check_float("x", x)
    check_float("guidance", guidance)
    check_last_dim("x", x, dim)
    if guidance.shape != (dim,):
        raise ValueError(f"guidance must have shape ({dim},), got {tuple(guidance.shape)}")
    check_same_device(x=x, guidance=guidance)


class SGAdapter(nn.Module):
    """Semantic-guided adapter (reference implementation).

    Args:
        dim: token width d (768 for ViT-B/16).
        bottleneck: r, the width of each down-projection; the hidden width is 2r.
        alpha: mix of relu and identity; ``alpha*relu(h) + (1-alpha)*h`` (1.0 is a plain ReLU).
        eps: LayerNorm epsilon of LN_a.

    Shapes:
        x: (..., d) token rows of f~; guidance: (d,), the guidance vector g.
        returns: (..., d), the adapter output a (before the block's scale s).
    """

    def __init__(self, dim: int, bottleneck: int, alpha: float = 0.1, eps: float = 1e-5):
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"dim and bottleneck must be positive, got dim={dim}, bottleneck={bottleneck}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.dim = dim
        self.bottleneck = bottleneck
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim)
        self.down_v = nn.Linear(dim, bottleneck)
        self.down_vt = nn.Linear(dim, bottleneck)
        self.down_t = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(2 * bottleneck, dim)
        # Starts at 1 so that the text branch contributes from the first step (the paper gives no value).
        self.s_vt = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LIFT's init: down-projections kaiming-normal (a = sqrt 5), biases zero, `up` all zero.

        With `up` at zero the adapter outputs zero, so a fresh Sage model is zero-shot CLIP.
        `ln` and `proj` keep PyTorch's defaults (identity LayerNorm, kaiming-uniform Linear).
        """
        for lin in (self.down_v, self.down_vt, self.down_t):
            nn.init.kaiming_normal_(lin.weight, a=math.sqrt(5))
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.ln.reset_parameters()
        self.proj.reset_parameters()
        with torch.no_grad():
            self.s_vt.fill_(1.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, alpha={self.alpha}, eps={self.eps}"

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        check_adapter_inputs(x, guidance, self.dim)
        guidance = guidance.to(x.dtype)
        fv = self.ln(x)                                   # (..., d)
        ft = self.ln(guidance)                            # (d,)
        ft_tokens = ft.expand_as(fv)                      # literal Eq. 7: text input per token
        fvt = self.proj(ft_tokens) * fv                   # (..., d)
        h = torch.cat(
            [self.down_v(fv), self.down_vt(fvt) + self.s_vt * self.down_t(ft_tokens)], dim=-1
        )                                                 # (..., 2r)
        act = self.alpha * F.relu(h) + (1.0 - self.alpha) * h
        return self.up(act)                               # (..., d)

    def forward_block(
        self, x: torch.Tensor, guidance: torch.Tensor, mlp_out: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """The end of a Sage block (Eq. 9): ``x + mlp_out + scale * adapter(x, guidance)``.

        x: (..., d) is f~, both the adapter's input and the residual; mlp_out: (..., d), the frozen
        MLP branch mlp(ln_2(f~)); scale: the block's learnable scalar s. Unfused here; the fused
        module does it in one pass over the activations.
        """
        if mlp_out.shape != x.shape:
            raise ValueError(f"mlp_out must have the shape of x {tuple(x.shape)}, got {tuple(mlp_out.shape)}")
        return x + mlp_out + scale * self(x, guidance)
