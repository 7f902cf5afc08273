"""What is tuned: one kernel at one shape (`Problem`), the GPU run's problems and the interpreter's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List

import torch

from sage_fast.ops.launch import LossLaunch, RowLaunch, WeightGradLaunch

KERNELS = ("fwd", "dx", "dw", "loss")
CONFIG_TYPES = {"fwd": RowLaunch, "dx": RowLaunch, "dw": WeightGradLaunch, "loss": LossLaunch}
#: SMs assumed where no GPU says otherwise (H100 / H200 SXM: 132)
DEFAULT_SMS = 132


@dataclass(frozen=True)
class Problem:
    """One tuning target: a kernel at one shape. `dtype` is the GEMM operand (and activation) dtype of
    the adapter kernels, the logits dtype of the loss; both are torch dtype names."""

    kernel: str
    dtype: str
    d: int = 0
    r: int = 0
    rows: int = 0
    classes: int = 0
    batch: int = 0
    fit: bool = True

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    @property
    def name(self) -> str:
        if self.kernel == "loss":
            return f"loss C={self.classes} {'fit' if self.fit else 'la'} {self.dtype}"
        return f"{self.kernel} d={self.d} r={self.r} {self.dtype}"

    @property
    def h(self) -> int:
        return 2 * self.r

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key(self, device_name: str) -> tuple:
        """The tuned-table key of this problem on `device_name`."""
        if self.kernel == "loss":
            return (device_name, self.classes, self.torch_dtype, self.fit)
        return (device_name, self.d, self.r, self.torch_dtype)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Problem":
        return cls(**obj)


GPU_RANKS = (32, 256, 4, 8)  # ImageNet-LT (the end-to-end benchmark's r) first, then iNaturalist, CIFAR, Places
GPU_ROWS = 128 * 197
GPU_D = 768


def gpu_problems() -> List[Problem]:
    """The GPU run's problems, most useful first."""
    out = [Problem(k, "bfloat16", d=GPU_D, r=r, rows=GPU_ROWS) for r in GPU_RANKS for k in ("fwd", "dx", "dw")]
    out += [Problem("loss", "float32", classes=8142, batch=512, fit=True),
            Problem("loss", "float32", classes=1000, batch=512, fit=True),
            Problem("loss", "float32", classes=8142, batch=512, fit=False)]
    return out


def smoke_problems() -> List[Problem]:
    """Tiny problems for Triton's interpreter (CPU tests): fp32 operands (the interpreter's bf16 dots are wrong)."""
    return [Problem(k, "float32", d=64, r=4, rows=96) for k in ("fwd", "dx", "dw")] + [
        Problem("loss", "float32", classes=100, batch=8, fit=True)]


def config_to_json(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_json(kernel: str, obj: dict):
    return CONFIG_TYPES[kernel](**obj)
