"""Input validation shared by the modules: one place for the error messages users see.

Tensors: `check_float`, `check_last_dim`, `check_same_device`, `check_labels`, `check_finite`,
`check_class_counts`. Hyperparameters: one function per range (`check_alpha`, `check_gamma`, `check_mu`,
`check_eps`, `check_lambdas`, `check_ignore_index`) and the generic ones they use (`check_positive`,
`check_non_negative`, `check_interval`). Each takes the name to show, so the run config
(`sage_fast.training.config`) checks its keys with the same functions and ranges as the API
(``name="model.gamma"``). A bad value raises ValueError (TypeError for something that is not a number).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Tuple

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The largest compensation exponent gamma accepted. Per class the loss adds log n_k + log Lambda_k =
#: (1 + gamma) log n_k + a constant to the logits (docs/method.md, "Why mu and S_N / (C n_min) do not
#: matter"): logit adjustment with the log prior scaled by 1 + gamma. The cosine logits span at most
#: 2 tau = 50 (tau = 25, `ModelConfig.logit_scale`), so once the adjustment's spread between the most and
#: the least frequent class, (1 + gamma) log(n_max / n_min), exceeds 50, no classifier can overcome it and
#: training only pushes every tail logit to its maximum. At gamma = 10 that happens for every imbalance of
#: 100:1 or more (11 ln 100 = 50.7), i.e. every data set of the paper, whose values are 0.05 to 0.085, 100x
#: smaller. Within [0, 10] the log-prior stays finite and exact in fp32 for any finite counts (it is
#: computed in log space, `compensated_log_prior`), so the loss is finite for finite logits.
GAMMA_MAX = 10.0


# --------------------------------------------------------------------------------------------------
# Numbers


def _number(name: str, v) -> float:
    """`v` as a float; TypeError for a bool, a string or anything else that is not a real number."""
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool:
        return float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
    return float(v)


def check_finite_number(name: str, v) -> float:
    """A finite real number (not NaN, not +-Inf); returns it as a float."""
    x = _number(name, v)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {x}")
    return x


def check_positive(name: str, v) -> float:
    """Finite and > 0."""
    x = check_finite_number(name, v)
    if not x > 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return x


def check_non_negative(name: str, v) -> float:
    """Finite and >= 0."""
    x = check_finite_number(name, v)
    if not x >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return x


def check_interval(name: str, v, low: float, high: float, high_open: bool = False, why: str = "") -> float:
    """Finite and in [low, high] ([low, high) with `high_open`); `why` is added to the message."""
    x = check_finite_number(name, v)
    if not (low <= x < high if high_open else low <= x <= high):
        interval = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}{why}, got {v}")
    return x


def check_alpha(alpha, name: str = "alpha") -> float:
    """The adapter's activation mix alpha * relu(h) + (1 - alpha) * h: [0, 1] (1: ReLU, 0: identity)."""
    return check_interval(name, alpha, 0.0, 1.0)


def check_gamma(gamma, name: str = "gamma") -> float:
    """The compensation exponent: [0, GAMMA_MAX] (see `GAMMA_MAX` for why)."""
    return check_interval(name, gamma, 0.0, GAMMA_MAX,
                          why=" (the loss adds (1 + gamma) log n_k; the paper uses 0.05 to 0.085)")


def check_mu(mu, name: str = "mu") -> float:
    """The compensation factor's scale mu: finite and > 0 (its log enters the prior)."""
    return check_positive(name, mu)


def check_eps(eps, name: str = "eps") -> float:
    """A LayerNorm epsilon: finite and > 0 (else a constant row divides by zero)."""
    return check_positive(name, eps)


def check_lambdas(lambdas, name: str = "lambdas") -> Tuple[float, float, float]:
    """FIT's three loss weights (lambda1, lambda2, lambda3), each finite and >= 0."""
    try:
        values = list(lambdas) if not isinstance(lambdas, (str, bytes)) else None
    except TypeError:
        values = None
    if values is None or len(values) != 3:
        raise ValueError(f"{name} must hold three numbers (lambda1, lambda2, lambda3), got {lambdas!r}")
    return tuple(check_non_negative(f"{name}[{i}]", v) for i, v in enumerate(values))


def check_ignore_index(ignore_index, name: str = "ignore_index") -> int:
    """The label of rows the loss skips: an integer (a float such as 1.7 would be truncated)."""
    if isinstance(ignore_index, bool):
        raise TypeError(f"{name} must be an integer, got {ignore_index!r}")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {ignore_index!r} ({type(ignore_index).__name__})") from None


# --------------------------------------------------------------------------------------------------
# Tensors


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")


def check_last_dim(name: str, t: torch.Tensor, dim: int) -> None:
    if t.ndim < 1 or t.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (..., {dim}), got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on the same device: {listed}")


def check_labels(target: torch.Tensor, num_classes: int, batch: int, ignore_index: int | None = None) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.ndim != 1 or target.shape[0] != batch:
        raise ValueError(f"target must have shape ({batch},), got {tuple(target.shape)}")
    valid = target if ignore_index is None else target[target != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got min {int(valid.min())}, max {int(valid.max())}"
            + (f" (ignore_index={ignore_index} excepted)" if ignore_index is not None else "")
        )


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or Inf: for a trainer, a sign that training diverged."""


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{name} contains NaN or Inf")


def check_class_counts(class_counts) -> torch.Tensor:
    """C training counts, each positive and finite -> a (C,) fp64 tensor (on the CPU)."""
    if isinstance(class_counts, (str, bytes)):
        raise TypeError(f"class_counts must be a sequence of numbers, got {class_counts!r}")
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64, device="cpu")
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"class_counts must be a sequence of numbers ({e})") from None
    if counts.ndim != 1:
        raise ValueError(f"class_counts must be one count per class (1-D), got shape {tuple(counts.shape)}")
    if counts.numel() == 0:
        raise ValueError("class_counts is empty")
    if not bool(torch.isfinite(counts).all()) or bool((counts <= 0).any()):
        bad = [i for i, c in enumerate(counts.tolist()) if not (math.isfinite(c) and c > 0)][:5]
        raise ValueError(f"class counts must be positive and finite; classes {bad} are not "
                         f"({[counts[i].item() for i in bad]})")
    return counts
