"""sage-fast: Sage (semantic-guided fine-tuning of CLIP for long-tailed recognition), fast and faithful."""
from .adapter import SGAdapter, lift_bottleneck
from .fused_adapter import SGAdapterFused, fold_adapter_weights, sg_adapter_torch
from .fused_loss import fused_fit_loss, fused_la_loss
from .losses import CompensatedLALoss, FITLoss, compensated_la_loss, compensated_log_prior

__version__ = "0.1.0"

__all__ = [
    "SGAdapter",
    "SGAdapterFused",
    "fold_adapter_weights",
    "sg_adapter_torch",
    "lift_bottleneck",
    "CompensatedLALoss",
    "FITLoss",
    "compensated_la_loss",
    "compensated_log_prior",
    "fused_fit_loss",
    "fused_la_loss",
]
