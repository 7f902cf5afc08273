"""The nn.Module layer of the ops: one `backend` switch between the reference and the kernels.

* `SGAdapterFused`: drop-in for the reference `SGAdapter` (same constructor plus `backend`, same
  sub-modules, parameters and state_dict).
* `AdaptFormerFused`: the same for LIFT's `AdaptFormer`, on the same kernels (the fold's one-branch
  case with a ReLU).
* `CompensatedLALoss` (Eq. 22) and `FITLoss` (Eq. 23, 24), each holding its log-prior (and FIT's s1,
  s2); ``adjustment`` "la" or "ce" swaps the prior for log n_k or zeros (the loss ablation).

`backend` is "auto" | "triton" | "torch", resolved per call by `sage_fast.ops.backend.resolve_backend`.

SGAdapterFused and AdaptFormerFused, dtypes (the reference's rule, the same on every backend): x may be
fp16, bf16, fp32 or fp64 whatever the parameters' dtype, except that the Triton kernels take fp16, bf16
and fp32 only (fp64 raises TypeError with backend="triton"; "auto" takes the folded PyTorch path for it).
The compute dtype is x's, or under `torch.autocast` autocast's dtype for x's device; `forward` returns
it, `forward_block` x's dtype. The fold stays in fp32 and weight gradients come back in the parameters'
dtype. mlp_out may have another float dtype; it is read as is.

SGAdapterFused and AdaptFormerFused, checks: input shapes, dtypes and devices as the reference; the
folded weights, `up` and s must be finite, else ValueError. That check costs one host-device sync
per forward; set `module.check_finite = False` to skip it (the Sage model does, and checks all its
parameters at once). It is skipped while `torch.compile` traces; NaN weights then give NaN outputs,
never finite wrong ones. Non-contiguous x or mlp_out are copied to contiguous memory first (one copy).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from .backend import TRITON_DTYPES, check_backend, resolve_backend
from .checks import check_gamma, check_ignore_index, check_lambdas, check_mu
from .fold import fold_adaptformer_weights, fold_adapter_weights, sg_adapter_torch
from .la_loss import fused_fit_loss, fused_la_loss
from .reference import (
    AdaptFormer,
    SGAdapter,
    check_adapter_inputs,
    check_loss,
    check_token_input,
    fit_combine,
    fit_loss,
    logit_adjusted_loss,
    loss_log_prior,
)
from .sg_adapter import SGAdapterFunction


def _loss_backend(backend: str, *tensors) -> str:
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return "torch"  # the reference raises the clear error
    dtype = torch.float64 if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors) else first.dtype
    return resolve_backend(backend, first.device, dtype, op="loss")


class _PriorLoss(nn.Module):
    """What both loss modules hold: the log-prior buffer (computed once), the backend and the adjustment."""

    def __init__(self, class_counts, mu: float, gamma: float, ignore_index: int, backend: str, adjustment: str):
        super().__init__()
        self.mu, self.gamma, self.ignore_index = check_mu(mu), check_gamma(gamma), check_ignore_index(ignore_index)
        self.backend = check_backend(backend)
        self.adjustment = check_loss(adjustment)
        self.register_buffer("log_prior", loss_log_prior(class_counts, adjustment, mu, gamma), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.log_prior.numel()

    def extra_repr(self) -> str:
        lambdas = f", lambdas={self.lambdas}" if hasattr(self, "lambdas") else ""
        return (
            f"num_classes={self.num_classes}, adjustment={self.adjustment!r}, mu={self.mu}, gamma={self.gamma}"
            f"{lambdas}, backend={self.backend!r}"
        )


class CompensatedLALoss(_PriorLoss):
    """The compensated LA loss (Eq. 22) as a module; the log-prior is computed once and kept as a buffer.

    backend: "auto" (the fused Triton kernel on CUDA, the PyTorch reference elsewhere and for fp64
    logits), "triton" (a RuntimeError at forward where Triton cannot run) or "torch" (the reference).
    See `sage_fast.ops.la_loss` for the fused path's limits.   logits: (B, C); target: (B,).
    adjustment: "compensated" (Eq. 22), "la" (log n_k, no compensation) or "ce" (no prior); see
    `sage_fast.ops.reference.loss_log_prior`. mu and gamma only act with "compensated".
    """

    def __init__(
        self, class_counts, mu: float = 0.5, gamma: float = 0.05, ignore_index: int = -100, backend: str = "auto",
        adjustment: str = "compensated",
    ):
        super().__init__(class_counts, mu, gamma, ignore_index, backend, adjustment)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if _loss_backend(self.backend, logits) == "triton":
            return fused_la_loss(logits, target, self.log_prior, self.ignore_index)
        return logit_adjusted_loss(logits, target, self.log_prior, self.ignore_index)


class FITLoss(_PriorLoss):
    """FIT's loss: L = l(z) + lambda1 l(zv) + lambda2 l(zt) + lambda3 l(z^), l the compensated LA loss.

    Holds the learnable scalars s1, s2 (both start at 0, so z^ = z at the start) of
    z^ = z + s1 * zv + s2 * zt.   z, zv, zt: (B, C); target: (B,).
    forward returns (total loss, z^); predictions are argmax z^.
    backend: "auto" | "triton" | "torch", and adjustment: "compensated" | "la" | "ce" (which loss l
    is), as in `CompensatedLALoss`.
    """

    def __init__(
        self,
        class_counts,
        mu: float = 0.5,
        gamma: float = 0.05,
        lambdas: Sequence[float] = (0.015, 0.015, 0.4),
        ignore_index: int = -100,
        backend: str = "auto",
        adjustment: str = "compensated",
    ):
        lambdas = check_lambdas(lambdas)
        super().__init__(class_counts, mu, gamma, ignore_index, backend, adjustment)
        self.lambdas = lambdas
        self.s1 = nn.Parameter(torch.zeros(()))
        self.s2 = nn.Parameter(torch.zeros(()))

    def combine(self, z: torch.Tensor, zv: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        """z^ = z + s1 * zv + s2 * zt, in z's dtype."""
        return fit_combine(z, zv, zt, self.s1, self.s2)

    def forward(
        self, z: torch.Tensor, zv: torch.Tensor, zt: torch.Tensor, target: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if _loss_backend(self.backend, z, zv, zt) == "triton":
            return fused_fit_loss(z, zv, zt, target, self.log_prior, self.s1, self.s2, self.lambdas, self.ignore_index)
        return fit_loss(z, zv, zt, target, self.log_prior, self.s1, self.s2, self.lambdas, self.ignore_index)


class _FoldedAdapter:
    """What the fused adapters share: the backend switch and the run of a folded adapter.

    A subclass folds its weights into W_cat (d, H), b_cat (H,) and calls `_run_folded`; the Triton
    kernels and `sg_adapter_torch` need nothing else (H and the activation slope are arguments).
    """

    check_finite: bool = True

    def _use_triton(self, x: torch.Tensor) -> bool:
        # The kernels are decided (and self-checked) in the dtype their GEMMs run in: autocast's, or x's.
        dtype = self._compute_dtype(x) if x.dtype in TRITON_DTYPES else x.dtype
        if resolve_backend(self.backend, x.device, dtype, op="adapter") != "triton":
            return False
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports fp32, fp16 and bf16 inputs, got {x.dtype}")
        return True

    def _check_finite(self, *tensors: torch.Tensor) -> None:
        if not self.check_finite or torch.compiler.is_compiling():
            return
        ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        if not bool(ok):
            raise ValueError(
                f"{type(self).__name__}: NaN or Inf in the adapter weights, the guidance (SG-Adapter) or the block scale "
                "(checked on the folded W_cat, b_cat, up and s)"
            )

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    @staticmethod
    def _check_block_inputs(x: torch.Tensor, mlp_out: torch.Tensor, scale) -> torch.Tensor:
        """Check mlp_out and scale of the block form; returns scale as a tensor on x's device."""
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
        return scale

    def _run_folded(self, x, w_cat, b_cat, alpha: float, mlp_out, scale):
        """a = leaky_{1-alpha}(LN(x) @ W_cat + b_cat) @ W_up^T + b_up, or x + mlp_out + scale * a."""
        checked = [w_cat, b_cat, self.up.weight, self.up.bias] + ([scale] if scale is not None else [])
        self._check_finite(*checked)
        if not self._use_triton(x):
            a = sg_adapter_torch(x, w_cat, b_cat, self.up.weight, self.up.bias, alpha, self.eps)
            return a if scale is None else (x + mlp_out + scale * a).to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.dim).contiguous()
        mlp2 = mlp_out.reshape(-1, self.dim).contiguous() if mlp_out is not None else None
        scale32 = scale.float().reshape(()) if scale is not None else None
        out = SGAdapterFunction.apply(
            x2, w_cat, b_cat, self.up.weight.float(), self.up.bias.float(), scale32, mlp2,
            alpha, self.eps, self._compute_dtype(x),
        )
        return out.reshape(*lead, self.dim)


class SGAdapterFused(_FoldedAdapter, SGAdapter):
    """Semantic-guided adapter, fused (drop-in for `SGAdapter`).

    Args:
        dim, bottleneck, alpha, eps, text_proj: as `SGAdapter`.
        backend: "auto" (the Triton kernels on CUDA, the folded PyTorch path elsewhere and for
            fp64), "triton" (the kernels; a RuntimeError where they cannot run) or "torch" (the
            literal reference, `SGAdapter`'s own forward). See `sage_fast.ops.backend`.

    Attributes:
        check_finite: raise ValueError when the folded weights, `up` or s hold NaN/Inf (one
            host-device sync per forward; default True).

    Shapes:
        forward(x (..., d), guidance (d,)) -> a (..., d)
        forward_block(x (..., d), guidance (d,), mlp_out (..., d), scale 0-dim) -> (..., d)
    """

    def __init__(
        self, dim: int, bottleneck: int, alpha: float = 0.1, eps: float = 1e-5, backend: str = "auto",
        text_proj: bool = True,
    ):
        super().__init__(dim, bottleneck, alpha=alpha, eps=eps, text_proj=text_proj)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def _run(self, x, guidance, mlp_out, scale):
        w_cat, b_cat = fold_adapter_weights(self, guidance)
        return self._run_folded(x, w_cat, b_cat, self.alpha, mlp_out, scale)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            return SGAdapter.forward(self, x, guidance)
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
        if self.backend == "torch":
            return SGAdapter.forward_block(self, x, guidance, mlp_out, scale)
        check_adapter_inputs(x, guidance, self.dim)
        scale = self._check_block_inputs(x, mlp_out, scale)
        return self._run(x, guidance, mlp_out, scale)


class AdaptFormerFused(_FoldedAdapter, AdaptFormer):
    """LIFT's AdaptFormer, fused (drop-in for `AdaptFormer`): the SG-Adapter's kernels with one
    branch (W_cat = diag(gamma) W_down, H = r) and slope 0 (ReLU).

    Args:
        dim, bottleneck, eps: as `AdaptFormer`. backend: "auto" | "triton" | "torch" as `SGAdapterFused`
            ("torch" is `AdaptFormer`'s own forward).

    Shapes:
        forward(x (..., d)) -> a (..., d)
        forward_block(x (..., d), mlp_out (..., d), scale 0-dim) -> (..., d)
    """

    #: alpha = 1 in the kernels' leaky activation: negative slope 1 - alpha = 0, a ReLU
    alpha: float = 1.0

    def __init__(self, dim: int, bottleneck: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__(dim, bottleneck, eps=eps)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"

    def _run(self, x, mlp_out, scale):
        w_cat, b_cat = fold_adaptformer_weights(self)
        return self._run_folded(x, w_cat, b_cat, self.alpha, mlp_out, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            return AdaptFormer.forward(self, x)
        check_token_input(x, self.dim)
        return self._run(x, None, None)

    def forward_block(self, x: torch.Tensor, mlp_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Fused end of a block with AdaptFormer: ``x + mlp_out + scale * adapter(x)`` in one pass.

        x, mlp_out: (..., d); scale: the block's scalar s. Returns x's dtype.
        """
        if self.backend == "torch":
            return AdaptFormer.forward_block(self, x, mlp_out, scale)
        check_token_input(x, self.dim)
        scale = self._check_block_inputs(x, mlp_out, scale)
        return self._run(x, mlp_out, scale)
