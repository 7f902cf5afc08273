"""sage-fast: Sage (semantic-guided fine-tuning of CLIP for long-tailed recognition), fast and faithful."""
from .adapter import SGAdapter, lift_bottleneck
from .losses import CompensatedLALoss, FITLoss, compensated_la_loss, compensated_log_prior

__version__ = "0.1.0"

__all__ = [
    "SGAdapter",
    "lift_bottleneck",
    "CompensatedLALoss",
    "FITLoss",
    "compensated_la_loss",
    "compensated_log_prior",
]
