"""Compensated logit-adjusted cross-entropy (Eq. 22) and FIT's four-term loss (Eq. 23, 24).

Plain PyTorch: the reference the fused Triton loss (`sage_fast.fused_loss`) is tested against.
The modules take `backend` = "auto" | "triton" | "torch" and dispatch to the fused kernel; the
functions here are always the PyTorch reference. See SAGE.md section 2.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_class_counts, check_finite, check_float, check_labels, check_same_device
from .fused_loss import check_backend, fused_fit_loss, fused_la_loss, resolve_backend


def compensated_log_prior(class_counts, mu: float = 0.5, gamma: float = 0.05) -> torch.Tensor:
    """log n_k + log Lambda_k, with Lambda_k = mu * n_k^gamma * S_N / (C * n_min).   Shape (C,), fp32.

    mu and S_N / (C n_min) add the same constant to every class and cancel in the softmax;
    they are kept so that the adjusted logits are the paper's, not only their softmax.
    """
    counts = check_class_counts(class_counts)
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")
    num_classes = counts.numel()
    lam = mu * counts.pow(gamma) * counts.sum() / (num_classes * counts.min())
    return (counts.log() + lam.log()).to(torch.float32)


def _check_logits(name: str, logits: torch.Tensor, num_classes: int) -> None:
    check_float(name, logits)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"{name} must have shape (batch, {num_classes}), got {tuple(logits.shape)}")
    check_finite(name, logits)


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 to fp32 for the loss math; fp32 and fp64 stay as they are (gradcheck runs in fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _adjusted_ce(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = _upcast(logits)
    adjusted = logits + log_prior.to(device=logits.device, dtype=logits.dtype)
    return F.cross_entropy(adjusted, target.long(), ignore_index=ignore_index)


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
    log_prior = compensated_log_prior(class_counts, mu, gamma)
    _check_logits("logits", logits, log_prior.numel())
    check_labels(target, log_prior.numel(), logits.shape[0], ignore_index)
    check_same_device(logits=logits, target=target)
    return _adjusted_ce(logits, target, log_prior, ignore_index)


class CompensatedLALoss(nn.Module):
    """`compensated_la_loss` as a module; the log-prior is computed once and kept as a buffer.

    backend: "auto" (the fused Triton kernel on CUDA or under TRITON_INTERPRET=1, PyTorch
    otherwise and for fp64 logits), "triton" (a RuntimeError at forward where Triton cannot run)
    or "torch" (this reference). See `sage_fast.fused_loss` for the fused path's limits.
    """

    def __init__(
        self, class_counts, mu: float = 0.5, gamma: float = 0.05, ignore_index: int = -100, backend: str = "auto"
    ):
        super().__init__()
        self.mu, self.gamma, self.ignore_index = float(mu), float(gamma), int(ignore_index)
        self.backend = check_backend(backend)
        self.register_buffer("log_prior", compensated_log_prior(class_counts, mu, gamma), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.log_prior.numel()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, mu={self.mu}, gamma={self.gamma}, backend={self.backend!r}"

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if resolve_backend(self.backend, logits) == "triton":
            return fused_la_loss(logits, target, self.log_prior, self.ignore_index)
        _check_logits("logits", logits, self.num_classes)
        check_labels(target, self.num_classes, logits.shape[0], self.ignore_index)
        check_same_device(logits=logits, target=target)
        return _adjusted_ce(logits, target, self.log_prior, self.ignore_index)


class FITLoss(nn.Module):
    """FIT's loss: L = l(z) + lambda1 l(zv) + lambda2 l(zt) + lambda3 l(z^), l the compensated LA loss.

    Holds the learnable scalars s1, s2 (both start at 0, so z^ = z at the start) of
    z^ = z + s1 * zv + s2 * zt.   z, zv, zt: (B, C); target: (B,).
    forward returns (total loss, z^); predictions are argmax z^.
    backend: "auto" | "triton" | "torch", as in `CompensatedLALoss`.
    """

    def __init__(
        self,
        class_counts,
        mu: float = 0.5,
        gamma: float = 0.05,
        lambdas: Sequence[float] = (0.015, 0.015, 0.4),
        ignore_index: int = -100,
        backend: str = "auto",
    ):
        super().__init__()
        self.backend = check_backend(backend)
        lambdas = tuple(float(v) for v in lambdas)
        if len(lambdas) != 3:
            raise ValueError(f"lambdas must hold three numbers (lambda1, lambda2, lambda3), got {lambdas}")
        self.mu, self.gamma, self.lambdas, self.ignore_index = float(mu), float(gamma), lambdas, int(ignore_index)
        self.register_buffer("log_prior", compensated_log_prior(class_counts, mu, gamma), persistent=False)
        self.s1 = nn.Parameter(torch.zeros(()))
        self.s2 = nn.Parameter(torch.zeros(()))

    @property
    def num_classes(self) -> int:
        return self.log_prior.numel()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, mu={self.mu}, gamma={self.gamma}, lambdas={self.lambdas}, "
            f"backend={self.backend!r}"
        )

    def combine(self, z: torch.Tensor, zv: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """z^ = z + s1 * zv + s2 * zt, in z's dtype."""
        return z + self.s1.to(z.dtype) * zv + self.s2.to(z.dtype) * zt

    def forward(
        self, z: torch.Tensor, zv: torch.Tensor, zt: torch.Tensor, target: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if resolve_backend(self.backend, z, zv, zt) == "triton":
            return fused_fit_loss(z, zv, zt, target, self.log_prior, self.s1, self.s2, self.lambdas, self.ignore_index)
        for name, t in (("z", z), ("zv", zv), ("zt", zt)):
            _check_logits(name, t, self.num_classes)
        if not (z.shape == zv.shape == zt.shape):
            raise ValueError(f"z, zv, zt must have the same shape, got {tuple(z.shape)}, {tuple(zv.shape)}, {tuple(zt.shape)}")
        check_labels(target, self.num_classes, z.shape[0], self.ignore_index)
        check_same_device(z=z, zv=zv, zt=zt, target=target)
        z_hat = self.combine(_upcast(z), _upcast(zv), _upcast(zt))
        l1, l2, l3 = self.lambdas
        ce = lambda t: _adjusted_ce(t, target, self.log_prior, self.ignore_index)  # noqa: E731
        loss = ce(z) + l1 * ce(zv) + l2 * ce(zt) + l3 * ce(z_hat)
        return loss, z_hat.to(z.dtype)
