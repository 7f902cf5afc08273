"""Launch configurations of the Triton kernels, as typed values: what the glue launches, and why.

| type               | kernels                                               | fields                                      |
| ------------------ | ----------------------------------------------------- | ------------------------------------------- |
| `RowLaunch`        | `sg_adapter_fwd_kernel`, `sg_adapter_bwd_dx_kernel`   | block_m, block_d, num_warps                 |
| `WeightGradLaunch` | `sg_adapter_bwd_dw_kernel`                            | block_m, block_d, block_h, split, num_warps |
| `LossLaunch`       | `fit_la_loss_fwd_kernel`                              | block_b, block_c, num_warps                 |

The row kernels' BLOCK_H is not a choice: each program holds whole hidden rows, so it is H = 2r
padded to a power of two, at least 16 (`row_block_h`). The glue passes every field by name.

Each configuration comes from one function (`row_launch`, `weight_grad_launch`, `loss_launch`):

1. under Triton's interpreter (CPU tensors: the tests), the interpreter's own configurations
   (`interpreter_row_launch`, ...): few, large programs, because the interpreter pays per program
   instance (about 5 ms each) and per op, not per element, and has no registers to spill;
2. on a GPU, a tuned entry for the device where there is one (`TUNED_ROW`, `TUNED_WEIGHT_GRAD`,
   keyed by `TuneKey`): empty, as no configuration has been timed on hardware yet;
3. else the GPU heuristics (`gpu_row_launch`, ...): chosen so that ptxas (sm_90) reports no
   register spills, for bf16, fp16 and fp32 operands. tests/ops/test_kernels_compile.py compiles
   every configuration they give for its shapes, and every tuned entry, for sm_90.

Pure Python: nothing here needs Triton.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from . import backend

# GPU tl.dot needs every dimension of its tiles to be at least 16.
MIN_DOT_TILE = 16


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_pow2(v) -> bool:
    return isinstance(v, int) and v >= 1 and v & (v - 1) == 0


def _check_fields(obj, tiles: Tuple[str, ...], min_tile: int) -> None:
    for name in tiles + ("num_warps",):
        v = getattr(obj, name)
        if not _is_pow2(v):
            raise ValueError(f"{type(obj).__name__}.{name} must be a power of two, got {v!r}")
    small = [n for n in tiles if getattr(obj, n) < min_tile]
    if small:
        raise ValueError(f"{type(obj).__name__}: {', '.join(small)} must be >= {min_tile} (GPU tl.dot tiles)")


# --------------------------------------------------------------------------------------------
# The types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowLaunch:
    """The row kernels (adapter forward, backward dx): one program per block_m token rows, which
    walks d in block_d chunks."""

    block_m: int
    block_d: int
    num_warps: int

    def __post_init__(self):
        _check_fields(self, ("block_m", "block_d"), MIN_DOT_TILE)

    def programs(self, rows: int) -> int:
        return cdiv(rows, self.block_m)


@dataclass(frozen=True)
class WeightGradLaunch:
    """The weight-gradient kernel: a (block_d, block_h) tile of dW_cat and dW_up per program, summed
    over row blocks of block_m; the rows are split `split` ways (split-K, one fp32 partial each)."""

    block_m: int
    block_d: int
    block_h: int
    split: int
    num_warps: int

    def __post_init__(self):
        _check_fields(self, ("block_m", "block_d", "block_h"), MIN_DOT_TILE)
        if not (isinstance(self.split, int) and self.split >= 1):
            raise ValueError(f"WeightGradLaunch.split must be a positive integer, got {self.split!r}")

    def grid(self, d: int, h: int) -> Tuple[int, int, int]:
        return (cdiv(h, self.block_h), cdiv(d, self.block_d), self.split)


@dataclass(frozen=True)
class LossLaunch:
    """The fused loss: one program per block_b rows, which walks the classes in block_c chunks."""

    block_b: int
    block_c: int
    num_warps: int

    def __post_init__(self):
        _check_fields(self, ("block_b", "block_c"), 1)

    def programs(self, batch: int) -> int:
        return cdiv(batch, self.block_b)


# --------------------------------------------------------------------------------------------
# Tuned configurations (GPU), consulted before the heuristics
# --------------------------------------------------------------------------------------------

#: (device name as `torch.cuda.get_device_name` gives it, d, r, GEMM operand dtype)
TuneKey = Tuple[str, int, int, torch.dtype]

#: Tuned row-kernel configurations. Empty: nothing has been timed on hardware yet.
TUNED_ROW: Dict[TuneKey, RowLaunch] = {}
#: Tuned weight-gradient configurations. Empty. An entry is used as it is, except that its split
#: is capped at the number of row blocks (more would only add programs with nothing to sum).
TUNED_WEIGHT_GRAD: Dict[TuneKey, WeightGradLaunch] = {}


def device_info(device: Union[str, torch.device]) -> Tuple[str, int]:
    """(name, multiprocessor count) of a CUDA device; ("", 1) for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return "", 1
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _tuned(table: dict, device, d: int, h: int, op_dtype: torch.dtype):
    if not table or h % 2:
        return None
    return table.get((device_info(device)[0], d, h // 2, op_dtype))


# --------------------------------------------------------------------------------------------
# The SG-Adapter's kernels
# --------------------------------------------------------------------------------------------


def row_block_h(h: int) -> int:
    """BLOCK_H of the row kernels: H padded to a power of two, at least 16 (padded units are 0)."""
    return max(MIN_DOT_TILE, next_pow2(h))


def gpu_row_launch(d: int, h: int, op_dtype: torch.dtype) -> RowLaunch:
    """Spill-free on sm_90 for both row kernels and every operand dtype; not timed on hardware."""
    block_h = row_block_h(h)
    block_d = max(MIN_DOT_TILE, next_pow2(d))
    if block_h <= 64:
        # fp32 operands take twice the registers per tile: 64 rows spill there, 32 do not.
        return RowLaunch(block_m=32 if op_dtype == torch.float32 else 64, block_d=min(64, block_d), num_warps=8)
    if block_h <= 128:
        return RowLaunch(block_m=32, block_d=min(64, block_d), num_warps=8)
    if block_h <= 256:
        return RowLaunch(block_m=32, block_d=min(32, block_d), num_warps=8)
    return RowLaunch(block_m=16, block_d=16, num_warps=8)


def _weight_grad_tile(d: int, h: int) -> Tuple[int, int, int]:
    """(block_m, block_d, block_h) of the weight-gradient kernel: spill-free on sm_90."""
    block_h = min(row_block_h(h), 128)
    block_d = min(64 if block_h <= 64 else 32, max(MIN_DOT_TILE, next_pow2(d)))
    return 64, block_d, block_h


def gpu_weight_grad_launch(d: int, h: int, m: int, sms: int) -> WeightGradLaunch:
    """Spill-free tiles on sm_90; the rows split so that about two waves of programs fill the
    device's `sms` multiprocessors (partials: split x d x H fp32)."""
    block_m, block_d, block_h = _weight_grad_tile(d, h)
    tiles = cdiv(d, block_d) * cdiv(row_block_h(h), block_h)
    split = max(1, min(cdiv(m, block_m), cdiv(2 * sms, tiles)))
    return WeightGradLaunch(block_m=block_m, block_d=block_d, block_h=block_h, split=split, num_warps=8)


def interpreter_row_launch(d: int, h: int) -> RowLaunch:
    """Under the interpreter: 64 rows and up to 128 columns per program, to run few programs."""
    return RowLaunch(block_m=64, block_d=min(128, max(MIN_DOT_TILE, next_pow2(d))), num_warps=4)


def interpreter_weight_grad_launch(d: int, h: int, m: int) -> WeightGradLaunch:
    """Under the interpreter: the GPU's tiles, the rows split at most two ways (few programs, yet
    the split-K sum is exercised)."""
    block_m, block_d, block_h = _weight_grad_tile(d, h)
    return WeightGradLaunch(
        block_m=block_m, block_d=block_d, block_h=block_h, split=min(2, cdiv(m, block_m)), num_warps=4
    )


def row_launch(d: int, h: int, op_dtype: torch.dtype, device: Union[str, torch.device]) -> RowLaunch:
    """The row kernels' configuration for (d, H = 2r, GEMM operand dtype) on `device`."""
    if backend.interpret_enabled():
        return interpreter_row_launch(d, h)
    return _tuned(TUNED_ROW, device, d, h, op_dtype) or gpu_row_launch(d, h, op_dtype)


def weight_grad_launch(
    d: int, h: int, m: int, op_dtype: torch.dtype, device: Union[str, torch.device]
) -> WeightGradLaunch:
    """The weight-gradient kernel's configuration for (d, H = 2r, M rows, operand dtype) on `device`."""
    if backend.interpret_enabled():
        return interpreter_weight_grad_launch(d, h, m)
    tuned: Optional[WeightGradLaunch] = _tuned(TUNED_WEIGHT_GRAD, device, d, h, op_dtype)
    if tuned is not None:
        return dataclasses.replace(tuned, split=max(1, min(tuned.split, cdiv(m, tuned.block_m))))
    return gpu_weight_grad_launch(d, h, m, device_info(device)[1])


# --------------------------------------------------------------------------------------------
# The loss kernel
# --------------------------------------------------------------------------------------------


def loss_num_warps(block_b: int, block_c: int) -> int:
    """About 8 values per thread and stream, 1 to 8 warps."""
    return max(1, min(8, block_b * block_c // 256))


def gpu_loss_launch(batch: int, num_classes: int) -> LossLaunch:
    """One row per program, chunks of <= 2048 classes, ~8 values per thread and stream: no register
    spills on sm_90 (ptxas: 124 registers at 2048 / 8 warps with FIT). Tiles of several rows spill
    (255 registers at 16 x 128), so small C also gets one row per program."""
    block_c = min(max(16, next_pow2(num_classes)), 2048)
    return LossLaunch(block_b=1, block_c=block_c, num_warps=loss_num_warps(1, block_c))


def interpreter_loss_launch(batch: int, num_classes: int) -> LossLaunch:
    """Under the interpreter: tiles of up to 8192 values, as many rows as fit."""
    tile = 8192
    block_c = min(max(16, next_pow2(num_classes)), tile)
    block_b = max(1, min(tile // block_c, next_pow2(batch)))
    return LossLaunch(block_b=block_b, block_c=block_c, num_warps=loss_num_warps(block_b, block_c))


def loss_launch(batch: int, num_classes: int) -> LossLaunch:
    """The fused loss kernel's configuration for a (batch, num_classes) problem."""
    if backend.interpret_enabled():
        return interpreter_loss_launch(batch, num_classes)
    return gpu_loss_launch(batch, num_classes)
