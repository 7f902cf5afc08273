"""The literal PyTorch reference of the method's math: the oracle every fused path is tested against.

* `SGAdapter`: the SG-Adapter of Eq. 7 and 8 (docs/method.md, "The SG-Adapter"), written for clarity,
  not speed: the text-guided projection runs once per token, the three down-projections separately.
  ``text_proj=False`` is the ablation without W_proj^vt (f_vt = f_t * f_v).
* `AdaptFormer`: LIFT's adapter, the baseline of the ablations (LayerNorm, down, ReLU, up).
* `compensated_log_prior`, `compensated_la_loss` (Eq. 22) and `fit_loss` (Eq. 23, 24);
  `loss_log_prior` also gives the ablations' plain LA and CE priors.

Nothing here imports fused code; `sage_fast.ops.modules` chooses between this and the kernels.

Dtypes, the same for every backend (`sage_fast.ops.modules` and the kernels follow them):

* adapters: x may be fp16, bf16, fp32 or fp64, whatever the parameters' dtype; the adapter computes in x's
  dtype (or autocast's, under `torch.autocast`) with its weights cast to it, as the fused path does.
  `forward` returns that compute dtype, `forward_block` x's dtype; parameter gradients come back in the
  parameters' dtype;
* losses: logits fp16, bf16, fp32 or fp64; fp16 / bf16 are upcast to fp32, so the loss is fp32, or fp64 when
  a logits tensor is fp64 (`loss_dtype`); FIT's z^ is in z's dtype.

Hyperparameters are checked where a module or function takes them, with the ranges of `sage_fast.ops.checks`
(alpha in [0, 1], eps > 0, mu > 0, gamma in [0, 10], lambdas >= 0, all finite; an integer ignore_index).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import (
    check_alpha,
    check_class_counts,
    check_eps,
    check_finite,
    check_float,
    check_gamma,
    check_ignore_index,
    check_labels,
    check_lambdas,
    check_last_dim,
    check_mu,
    check_same_device,
)


def lift_bottleneck(num_classes: int, num_layers: int = 12) -> int:
    """LIFT's bottleneck rule: r = 2^floor(log2(C / (2L))), at least 1."""
    if num_classes < 1 or num_layers < 1:
        raise ValueError(f"num_classes and num_layers must be positive, got {num_classes}, {num_layers}")
    ratio = num_classes / (2 * num_layers)
    if ratio < 2:
        return 1
    return 2 ** int(math.floor(math.log2(ratio)))


def check_token_input(x: torch.Tensor, dim: int) -> None:
    """x must be a float tensor (..., dim)."""
    check_float("x", x)
    check_last_dim("x", x, dim)


def check_adapter_inputs(x: torch.Tensor, guidance: torch.Tensor, dim: int) -> None:
    """Shape, dtype and device checks shared by the reference and the fused adapter."""
    check_token_input(x, dim)
    check_float("guidance", guidance)
    if guidance.shape != (dim,):
        raise ValueError(f"guidance must have shape ({dim},), got {tuple(guidance.shape)}")
    check_same_device(x=x, guidance=guidance)


def _linear(layer: nn.Linear, t: torch.Tensor) -> torch.Tensor:
    """layer(t) in t's dtype whatever the weights' (nn.Linear would refuse fp16 input to fp32 weights);
    under autocast F.linear still casts both to autocast's dtype."""
    return F.linear(t, layer.weight.to(t.dtype), layer.bias.to(t.dtype))


def _layer_norm(ln: nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
    """ln(t) in t's dtype whatever the affine parameters' dtype."""
    return F.layer_norm(t, ln.normalized_shape, ln.weight.to(t.dtype), ln.bias.to(t.dtype), ln.eps)


class SGAdapter(nn.Module):
    """Semantic-guided adapter (reference implementation).

    Args:
        dim: token width d (768 for ViT-B/16).
        bottleneck: r, the width of each down-projection; the hidden width is 2r.
        alpha: mix of relu and identity; ``alpha*relu(h) + (1-alpha)*h`` (1.0 is a plain ReLU).
        eps: LayerNorm epsilon of LN_a.
        text_proj: with False, no W_proj^vt (`proj` is None): f_vt = f_t * f_v (the paper's ablation,
            Tables 10 to 12); d^2 + d parameters fewer per adapter.

    Shapes:
        x: (..., d) token rows of f~; guidance: (d,), the guidance vector g.
        returns: (..., d), the adapter output a (before the block's scale s).
    """

    def __init__(self, dim: int, bottleneck: int, alpha: float = 0.1, eps: float = 1e-5, text_proj: bool = True):
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"dim and bottleneck must be positive, got dim={dim}, bottleneck={bottleneck}")
        self.dim = dim
        self.bottleneck = bottleneck
        self.alpha = check_alpha(alpha)
        self.eps = check_eps(eps)
        self.text_proj = bool(text_proj)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, dim) if self.text_proj else None
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
        if self.proj is not None:
            self.proj.reset_parameters()
        with torch.no_grad():
            self.s_vt.fill_(1.0)

    def extra_repr(self) -> str:
        extra = "" if self.text_proj else ", text_proj=False"
        return f"dim={self.dim}, bottleneck={self.bottleneck}, alpha={self.alpha}, eps={self.eps}{extra}"

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        check_adapter_inputs(x, guidance, self.dim)
        guidance = guidance.to(x.dtype)
        fv = _layer_norm(self.ln, x)                      # (..., d)
        ft = _layer_norm(self.ln, guidance)               # (d,)
        ft_tokens = ft.expand_as(fv)                      # literal Eq. 7: text input per token
        text = _linear(self.proj, ft_tokens) if self.proj is not None else ft_tokens
        fvt = text * fv                                   # (..., d)
        h = torch.cat(
            [_linear(self.down_v, fv), _linear(self.down_vt, fvt) + self.s_vt * _linear(self.down_t, ft_tokens)], dim=-1
        )                                                 # (..., 2r)
        act = self.alpha * F.relu(h) + (1.0 - self.alpha) * h
        return _linear(self.up, act)                      # (..., d)

    def forward_block(
        self, x: torch.Tensor, guidance: torch.Tensor, mlp_out: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """The end of a Sage block (Eq. 9): ``x + mlp_out + scale * adapter(x, guidance)``.

        x: (..., d) is f~, both the adapter's input and the residual; mlp_out: (..., d), the frozen
        MLP branch mlp(ln_2(f~)); scale: the block's learnable scalar s. Unfused here; the fused
        module does it in one pass over the activations. Returns x's dtype.
        """
        if mlp_out.shape != x.shape:
            raise ValueError(f"mlp_out must have the shape of x {tuple(x.shape)}, got {tuple(mlp_out.shape)}")
        return (x + mlp_out + scale * self(x, guidance)).to(x.dtype)


class AdaptFormer(nn.Module):
    """LIFT's AdaptFormer (reference implementation): the baseline adapter of the paper's ablations.

    a = up(relu(down(LN(x)))), a LayerNorm with affine parameters, a d -> r down-projection, ReLU and
    an r -> d up-projection. In a Sage block it sits where the SG-Adapter sits (parallel to the MLP,
    scaled by the block's s); it takes no guidance.

    Args:
        dim: token width d. bottleneck: r, the hidden width. eps: the LayerNorm's epsilon.

    Shapes:
        x: (..., d); returns a: (..., d) (before the block's scale s).
    """

    def __init__(self, dim: int, bottleneck: int, eps: float = 1e-5):
        super().__init__()
        if dim < 1 or bottleneck < 1:
            raise ValueError(f"dim and bottleneck must be positive, got dim={dim}, bottleneck={bottleneck}")
        self.dim = dim
        self.bottleneck = bottleneck
        self.eps = check_eps(eps)
        self.ln = nn.LayerNorm(dim, eps=eps)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LIFT's init: `down` kaiming-normal (a = sqrt 5), `up` and both biases zero, so a fresh
        adapter outputs zero; `ln` is the identity LayerNorm."""
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.ln.reset_parameters()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_token_input(x, self.dim)
        return _linear(self.up, F.relu(_linear(self.down, _layer_norm(self.ln, x))))

    def forward_block(self, x: torch.Tensor, mlp_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The end of a block with AdaptFormer: ``x + mlp_out + scale * adapter(x)``; x, mlp_out: (..., d).
        Returns x's dtype."""
        if mlp_out.shape != x.shape:
            raise ValueError(f"mlp_out must have the shape of x {tuple(x.shape)}, got {tuple(mlp_out.shape)}")
        return (x + mlp_out + scale * self(x)).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Losses


def compensated_log_prior(class_counts, mu: float = 0.5, gamma: float = 0.05) -> torch.Tensor:
    """log n_k + log Lambda_k, with Lambda_k = mu * n_k^gamma * S_N / (C * n_min).   Shape (C,), fp32.

    mu and S_N / (C n_min) add the same constant to every class and cancel in the softmax;
    they are kept so that the adjusted logits are the paper's, not only their softmax.
    class_counts: C positive finite numbers; mu finite > 0; gamma in [0, 10] (`sage_fast.ops.checks.GAMMA_MAX`).
    """
    counts = check_class_counts(class_counts)
    mu, gamma = check_mu(mu), check_gamma(gamma)
    log_n = counts.log()
    # In log space, fp64: n_k^gamma and S_N overflow for large counts (1e308 + 1e308 = inf) where their logs
    # do not. log Lambda_k = log mu + gamma log n_k + log S_N - log C - log n_min.
    log_lam = math.log(mu) + gamma * log_n + torch.logsumexp(log_n, 0) - math.log(counts.numel()) - log_n.min()
    return (log_n + log_lam).to(torch.float32)


#: What the loss adds to the logits: "compensated" (Eq. 22), "la" (log n_k: logit adjustment with
#: tau = 1, no compensation factor) or "ce" (nothing: plain cross-entropy). Table 7's rows.
LOSSES = ("compensated", "la", "ce")


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def loss_log_prior(class_counts, loss: str = "compensated", mu: float = 0.5, gamma: float = 0.05) -> torch.Tensor:
    """The vector (C,) fp32 added to the logits before the cross-entropy, for each of `LOSSES`.

    "compensated": `compensated_log_prior` (mu, gamma used); "la": log n_k; "ce": zeros. Every
    choice goes through the same adjusted cross-entropy, so the fused loss kernel serves all three.
    """
    check_loss(loss)
    check_mu(mu), check_gamma(gamma)  # unused by "la" and "ce", but a module keeps them: no NaN stored
    if loss == "compensated":
        return compensated_log_prior(class_counts, mu, gamma)
    counts = check_class_counts(class_counts)
    prior = counts.log() if loss == "la" else torch.zeros_like(counts)
    return prior.to(torch.float32)


def _check_logits(name: str, logits: torch.Tensor, num_classes: int) -> None:
    check_float(name, logits)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"{name} must have shape (batch, {num_classes}), got {tuple(logits.shape)}")
    check_finite(name, logits)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 to fp32 for the loss math; fp32 and fp64 stay as they are (gradcheck runs in fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def loss_dtype(*logits: torch.Tensor) -> torch.dtype:
    """The loss's dtype for these logits: fp32, or fp64 when one of them is fp64 (every backend)."""
    out = torch.float32
    for t in logits:
        out = torch.promote_types(out, t.dtype)
    return out


def _adjusted_ce(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = _upcast(logits)
    adjusted = logits + log_prior.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(adjusted, target.long(), ignore_index=ignore_index)


def logit_adjusted_loss(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Logit-adjusted cross-entropy with a given log-prior (C,): mean over rows whose label is not `ignore_index`.

    With `compensated_log_prior` this is Eq. 22; logits: (B, C) float; target: (B,) integer in [0, C).
    """
    ignore_index = check_ignore_index(ignore_index)
    _check_logits("logits", logits, log_prior.numel())
    check_labels(target, log_prior.numel(), logits.shape[0], ignore_index)
    check_same_device(logits=logits, target=target)
    return _adjusted_ce(logits, target, log_prior, ignore_index)


def fit_combine(z: torch.Tensor, zv: torch.Tensor, zt: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """z^ = z + s1 * zv + s2 * zt (Eq. 23), in z's dtype."""
    return z + s1.to(z.dtype) * zv + s2.to(z.dtype) * zt


def fit_loss(
    z: torch.Tensor,
    zv: torch.Tensor,
    zt: torch.Tensor,
    target: torch.Tensor,
    log_prior: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    lambdas: Sequence[float],
    ignore_index: int = -100,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FIT's loss (Eq. 24): l(z) + lambda1 l(zv) + lambda2 l(zt) + lambda3 l(z^), l the adjusted CE.

    z, zv, zt: (B, C); s1, s2: 0-dim. Returns (loss, z^ in z's dtype); fp16 / bf16 logits are upcast.
    """
    ignore_index = check_ignore_index(ignore_index)
    l1, l2, l3 = check_lambdas(lambdas)
    num_classes = log_prior.numel()
    for name, t in (("z", z), ("zv", zv), ("zt", zt)):
        _check_logits(name, t, num_classes)
    if not (z.shape == zv.shape == zt.shape):
        raise ValueError(f"z, zv, zt must have the same shape, got {tuple(z.shape)}, {tuple(zv.shape)}, {tuple(zt.shape)}")
    check_labels(target, num_classes, z.shape[0], ignore_index)
    check_same_device(z=z, zv=zv, zt=zt, target=target)
    z_hat = fit_combine(_upcast(z), _upcast(zv), _upcast(zt), s1, s2)
    ce = lambda t: _adjusted_ce(t, target, log_prior, ignore_index)  # noqa: E731
    loss = ce(z) + l1 * ce(zv) + l2 * ce(zt) + l3 * ce(z_hat)
    return loss, z_hat.to(z.dtype)


def compensated_la_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_counts,
    mu: float = 0.5,
    gamma: float = 0.05,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Compensated LA cross-entropy, mean over the rows whose label is not `ignore_index`.

    logits: (B, C) float; target: (B,) integer in [0, C); class_counts: C positive training counts.
    """
    ignore_index = check_ignore_index(ignore_index)
    return logit_adjusted_loss(logits, target, compensated_log_prior(class_counts, mu, gamma), ignore_index)
