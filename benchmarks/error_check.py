"""Error of a benchmark case against the eager reference: measured, recorded, then asserted.

Every case compares its output (and gradients) with the eager reference run in fp32 on the same,
already rounded, inputs and weights (`check_error`), writes the verdict into its record
(`ErrorCheck.record_fields`) and then fails when a tensor is over its limit (`assert_error_ok`), so a
fast but wrong implementation fails the benchmark instead of only showing up as a number in a table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

#: The precisions a case runs in, by the names records and TOLERANCES use.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
#: Largest relative error a case may have against the eager reference, by the precision it runs
#: in ("bf16" covers the bf16-autocast cases too). The one place these limits are set.
TOLERANCES = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 2e-2}
#: In fp16 / bf16 a tensor may also be off by up to this many times the error that the eager
#: reference itself makes at that precision on the same tensor (PyTorch's own low-precision
#: reductions can be far worse than TOLERANCES; an implementation is not failed for matching them).
EAGER_FACTOR = 2.0


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius norm, float64); inf for a shape mismatch or a NaN / Inf
    in got; the absolute error ||got|| when want is all zero."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    diff, scale = (got - want).norm().item(), want.norm().item()
    return diff / scale if scale > 0 else diff


@dataclass(frozen=True)
class ErrorCheck:
    """Per-tensor relative errors of one case against the eager reference run in fp32 on the same
    inputs and weights (already rounded to the case's dtype), and the limit of each tensor.

    errors: tensor name -> relative error of the implementation under test.
    eager_errors: tensor name -> relative error of the eager reference run at the case's own
    precision (empty for fp32, where it is the reference itself).
    A tensor's limit is max(TOLERANCES[precision], EAGER_FACTOR * its eager error).
    """

    precision: str
    errors: Mapping[str, float]
    eager_errors: Mapping[str, float] = field(default_factory=dict)

    def limit(self, name: str) -> float:
        return max(TOLERANCES[self.precision], EAGER_FACTOR * self.eager_errors.get(name, 0.0))

    @property
    def worst(self) -> str:
        """The tensor closest to (or furthest over) its limit."""
        return max(self.errors, key=lambda n: self.errors[n] / self.limit(n))

    @property
    def ok(self) -> bool:
        return all(self.errors[n] <= self.limit(n) for n in self.errors)

    def record_fields(self) -> dict:
        """What a record keeps: the deciding tensor's error and limit, and the verdict."""
        worst = self.worst
        return {
            "rel_err_vs_eager": self.errors[worst],
            "rel_err_tensor": worst,
            "rel_err_limit": self.limit(worst),
            "rel_err_ok": self.ok,
            "rel_err_precision": self.precision,
        }

    def failures(self) -> list[str]:
        return [f"{n}: {self.errors[n]:.3g} > {self.limit(n):.3g}" for n in self.errors
                if not self.errors[n] <= self.limit(n)]


def check_error(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], precision: str,
                eager: Optional[Mapping[str, torch.Tensor]] = None) -> ErrorCheck:
    """Compare the named tensors of an implementation (`got`) with the fp32 eager reference (`want`).

    eager: the same tensors from the eager reference run at the case's precision (fp16 / bf16 only),
    which sets how much error that precision allows on each tensor (see EAGER_FACTOR).
    """
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {sorted(TOLERANCES)}, got {precision!r}")
    if set(got) != set(want) or (eager is not None and set(eager) != set(want)):
        raise ValueError(f"compared tensors differ: {sorted(got)} vs {sorted(want)}")
    errors = {n: relative_error(got[n], want[n]) for n in want}
    eager_errors = {} if (eager is None or precision == "fp32") else {n: relative_error(eager[n], want[n]) for n in want}
    return ErrorCheck(precision, errors, eager_errors)


def assert_error_ok(check: ErrorCheck, what: str) -> None:
    """Fail the case when a tensor is over its limit (call it after the record is written)."""
    if not check.ok:
        raise AssertionError(
            f"{what}: error against the eager reference over the {check.precision} limit "
            f"(tolerance {TOLERANCES[check.precision]:g}, or {EAGER_FACTOR:g}x the eager reference's own "
            f"error at that precision): " + "; ".join(check.failures())
        )
