"""sage-fast: Sage (semantic-guided fine-tuning of CLIP for long-tailed recognition), fast and faithful.

Layers, each importing only those above it in this list:
`sage_fast.ops` (reference math, fold, Triton glue, backend switch; kernels in `sage_fast.kernels`),
`sage_fast.model` (Sage on a frozen open_clip ViT), `sage_fast.training` (config, data, trainer, CLI).
"""
from ._version import __version__
from .ops import (
    BACKENDS,
    AdaptFormer,
    AdaptFormerFused,
    CompensatedLALoss,
    FITLoss,
    SGAdapter,
    SGAdapterFused,
    compensated_la_loss,
    compensated_log_prior,
    fold_adaptformer_weights,
    fold_adapter_weights,
    fused_fit_loss,
    fused_la_loss,
    lift_bottleneck,
    loss_log_prior,
    resolve_backend,
    sg_adapter_torch,
)


__all__ = [
    "__version__",
    "BACKENDS",
    "resolve_backend",
    "SGAdapter",
    "SGAdapterFused",
    "AdaptFormer",
    "AdaptFormerFused",
    "fold_adapter_weights",
    "fold_adaptformer_weights",
    "sg_adapter_torch",
    "lift_bottleneck",
    "CompensatedLALoss",
    "FITLoss",
    "compensated_la_loss",
    "compensated_log_prior",
    "loss_log_prior",
    "fused_fit_loss",
    "fused_la_loss",
]
