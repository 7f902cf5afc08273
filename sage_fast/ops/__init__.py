"""The ops layer: the method's math, the Triton glue and the one backend switch. Imports nothing above it.

| module        | what                                                                        |
| ------------- | --------------------------------------------------------------------------- |
| `reference`   | the literal PyTorch math: SG-Adapter (Eq. 7, 8), AdaptFormer, the losses    |
| `fold`        | the fold of the adapters' weights, and the folded adapter in PyTorch        |
| `sg_adapter`  | autograd glue and custom ops over `sage_fast.kernels.sg_adapter`            |
| `la_loss`     | autograd glue over `sage_fast.kernels.la_loss`                              |
| `launch`      | the kernels' launch configurations (GPU, tuned, interpreter)                |
| `modules`     | `SGAdapterFused`, `AdaptFormerFused`, the two losses: the backend switch    |
| `backend`     | "auto" / "triton" / "torch": `resolve_backend`, where Triton can run        |
| `selfcheck`   | the kernels' first-use check against PyTorch, which `resolve_backend` asks  |
| `parity`      | the check's problems: kernels vs PyTorch, forward and every gradient        |
| `checks`      | input validation and its error messages                                     |
"""
from . import parity  # noqa: F401  (registers the kernels' self-checks with selfcheck)
from .backend import BACKENDS, resolve_backend
from .fold import fold_adaptformer_weights, fold_adapter_weights, sg_adapter_torch
from .la_loss import fused_fit_loss, fused_la_loss
from .modules import AdaptFormerFused, CompensatedLALoss, FITLoss, SGAdapterFused
from .reference import (
    LOSSES,
    AdaptFormer,
    SGAdapter,
    compensated_la_loss,
    compensated_log_prior,
    fit_loss,
    logit_adjusted_loss,
    lift_bottleneck,
    loss_log_prior,
)

__all__ = [
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
    "LOSSES",
    "loss_log_prior",
    "fit_loss",
    "logit_adjusted_loss",
    "fused_fit_loss",
    "fused_la_loss",
]
