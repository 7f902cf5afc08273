"""Launch configurations of the Triton kernels, as typed values: what the glue launches, and why.

| type               | kernels                                               | fields                                                  |
| ------------------ | ----------------------------------------------------- | ------------------------------------------------------- |
| `RowLaunch`        | `sg_adapter_fwd_kernel`, `sg_adapter_bwd_dx_kernel`   | block_m, block_d, num_warps, num_stages                 |
| `WeightGradLaunch` | `sg_adapter_bwd_dw_kernel`                            | block_m, block_d, block_h, split, num_warps, num_stages |
| `LossLaunch`       | `fit_la_loss_fwd_kernel`                              | block_b, block_c, num_warps, num_stages                 |

The row kernels' BLOCK_H is not a choice: each program holds whole hidden rows, so it is H = 2r
padded to a power of two, at least 16 (`row_block_h`). The glue passes every field by name, the
compiler options through `options()` (num_stages None: Triton's default).

Each configuration comes from one function (`row_launch` for the forward and, with kernel="dx", the
dx backward; `weight_grad_launch`; `select_loss_launch`, which falls back on `loss_launch`):

1. under Triton's interpreter (CPU tensors: the tests), the interpreter's own configurations
   (`interpreter_row_launch`, ...): few, large programs, because the interpreter pays per program
   instance (about 5 ms each) and per op, not per element, and has no registers to spill;
2. on a GPU, a tuned entry for the device where there is one: `TUNED_FWD`, `TUNED_DX`,
   `TUNED_WEIGHT_GRAD` keyed by `TuneKey` (device name, d, r, operand dtype) and `TUNED_LOSS` keyed
   by `LossTuneKey` (device name, classes, logits dtype, FIT), loaded when this module is imported
   from `tuned_launch.json` beside it (written by `python -m benchmarks.tuning`, the tuning stage of
   benchmarks/run_gpu.sh; `SAGE_FAST_TUNED_LAUNCH` names another file, or "none" for no table);
3. else the GPU heuristics (`gpu_row_launch`, ...): chosen so that ptxas (sm_90) reports no
   register spills, for bf16, fp16 and fp32 operands. tests/ops/test_kernels_compile.py compiles
   every configuration they give for its shapes, and every tuned entry, for sm_90.

Pure Python: nothing here needs Triton.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from ..utils.files import atomic_write_text
from . import backend

# GPU tl.dot needs every dimension of its tiles to be at least 16.
MIN_DOT_TILE = 16


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


def _check_fields(obj, tiles: Tuple[str, ...], min_tile: int) -> None:
    for name in tiles + ("num_warps",):
        v = getattr(obj, name)
        if not _is_pow2(v):
            raise ValueError(f"{type(obj).__name__}.{name} must be a power of two, got {v!r}")
    small = [n for n in tiles if getattr(obj, n) < min_tile]
    if small:
        raise ValueError(f"{type(obj).__name__}: {', '.join(small)} must be >= {min_tile} (GPU tl.dot tiles)")
    stages = obj.num_stages
    if stages is not None and not (isinstance(stages, int) and not isinstance(stages, bool) and 1 <= stages <= 8):
        raise ValueError(f"{type(obj).__name__}.num_stages must be None (Triton's default) or 1 to 8, got {stages!r}")


def _options(obj) -> Dict[str, int]:
    opts = {"num_warps": obj.num_warps}
    if obj.num_stages is not None:
        opts["num_stages"] = obj.num_stages
    return opts


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
    num_stages: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, ("block_m", "block_d"), MIN_DOT_TILE)

    def programs(self, rows: int) -> int:
        return cdiv(rows, self.block_m)

    def options(self) -> Dict[str, int]:
        """Triton launch options: num_warps, and num_stages when set."""
        return _options(self)


@dataclass(frozen=True)
class WeightGradLaunch:
    """The weight-gradient kernel: a (block_d, block_h) tile of dW_cat and dW_up per program, summed
    over row blocks of block_m; the rows are split `split` ways (split-K, one fp32 partial each)."""

    block_m: int
    block_d: int
    block_h: int
    split: int
    num_warps: int
    num_stages: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, ("block_m", "block_d", "block_h"), MIN_DOT_TILE)
        if not (isinstance(self.split, int) and not isinstance(self.split, bool) and self.split >= 1):
            raise ValueError(f"WeightGradLaunch.split must be a positive integer, got {self.split!r}")

    def grid(self, d: int, h: int) -> Tuple[int, int, int]:
        return (cdiv(h, self.block_h), cdiv(d, self.block_d), self.split)

    def options(self) -> Dict[str, int]:
        return _options(self)


@dataclass(frozen=True)
class LossLaunch:
    """The fused loss: one program per block_b rows, which walks the classes in block_c chunks."""

    block_b: int
    block_c: int
    num_warps: int
    num_stages: Optional[int] = None

    def __post_init__(self):
        _check_fields(self, ("block_b", "block_c"), 1)

    def programs(self, batch: int) -> int:
        return cdiv(batch, self.block_b)

    def options(self) -> Dict[str, int]:
        return _options(self)


LaunchConfig = Union[RowLaunch, WeightGradLaunch, LossLaunch]


# --------------------------------------------------------------------------------------------
# Tuned configurations (GPU), consulted before the heuristics
# --------------------------------------------------------------------------------------------

#: (device name as `torch.cuda.get_device_name` gives it, d, r, GEMM operand dtype)
TuneKey = Tuple[str, int, int, torch.dtype]
#: (device name, number of classes, logits dtype, FIT on)
LossTuneKey = Tuple[str, int, torch.dtype, bool]

#: Tuned forward-kernel configurations (loaded from `TABLE_PATH`; empty until a GPU run wrote some).
TUNED_FWD: Dict[TuneKey, RowLaunch] = {}
#: Tuned dx-backward configurations.
TUNED_DX: Dict[TuneKey, RowLaunch] = {}
#: Tuned weight-gradient configurations. An entry is used as it is, except that its split is capped
#: at the number of row blocks (more would only add programs with nothing to sum).
TUNED_WEIGHT_GRAD: Dict[TuneKey, WeightGradLaunch] = {}
#: Tuned loss-kernel configurations.
TUNED_LOSS: Dict[LossTuneKey, LossLaunch] = {}

#: The table the glue reads: JSON beside this module (shipped as package data).
TABLE_PATH = Path(__file__).with_name("tuned_launch.json")
#: Environment variable naming another table file, or "none" for no tuned entries at all.
TABLE_ENV = "SAGE_FAST_TUNED_LAUNCH"
TABLE_FORMAT = 1

#: kernel name in the table -> (config type, the table it fills)
KERNEL_TABLES = {
    "fwd": (RowLaunch, TUNED_FWD),
    "dx": (RowLaunch, TUNED_DX),
    "dw": (WeightGradLaunch, TUNED_WEIGHT_GRAD),
    "loss": (LossLaunch, TUNED_LOSS),
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float16" or "float32": how the table file writes a dtype."""
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"no tuned configurations for dtype {dtype}")


@dataclass(frozen=True)
class TunedEntry:
    """One row of the tuned table: which kernel, for which key, which configuration, and the
    measurement that earned it its place (`evidence`: times, speedup, noise, versions; informative)."""

    kernel: str
    key: tuple
    config: LaunchConfig
    evidence: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.kernel not in KERNEL_TABLES:
            raise ValueError(f"unknown kernel {self.kernel!r} (one of {sorted(KERNEL_TABLES)})")
        cls = KERNEL_TABLES[self.kernel][0]
        if not isinstance(self.config, cls):
            raise ValueError(f"a {self.kernel} entry needs a {cls.__name__}, got {type(self.config).__name__}")
        n = 4
        if not (isinstance(self.key, tuple) and len(self.key) == n):
            raise ValueError(f"key of a {self.kernel} entry must be a {n}-tuple, got {self.key!r}")

    def to_json(self) -> dict:
        if self.kernel == "loss":
            device, classes, dtype, fit = self.key
            head = {"kernel": self.kernel, "device": device, "classes": int(classes), "dtype": dtype_name(dtype),
                    "fit": bool(fit)}
        else:
            device, d, r, dtype = self.key
            head = {"kernel": self.kernel, "device": device, "d": int(d), "r": int(r), "dtype": dtype_name(dtype)}
        return {**head, "config": dataclasses.asdict(self.config), "evidence": dict(self.evidence)}

    @classmethod
    def from_json(cls, obj: dict) -> "TunedEntry":
        """Parse one entry; ValueError (naming the problem) on anything malformed."""
        try:
            kernel = obj["kernel"]
            config_cls = KERNEL_TABLES[kernel][0]
            dtype = _DTYPES[obj["dtype"]]
            device = obj["device"]
            if not isinstance(device, str) or not device:
                raise ValueError("device must be a non-empty string")
            if kernel == "loss":
                if not isinstance(obj["fit"], bool):
                    raise ValueError("fit must be true or false")
                key = (device, _positive_int(obj["classes"], "classes"), dtype, obj["fit"])
            else:
                key = (device, _positive_int(obj["d"], "d"), _positive_int(obj["r"], "r"), dtype)
            fields = {f.name for f in dataclasses.fields(config_cls)}
            config = dict(obj["config"])
            if set(config) - fields:
                raise ValueError(f"unknown config fields {sorted(set(config) - fields)}")
            return cls(kernel, key, config_cls(**config), dict(obj.get("evidence") or {}))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed tuned entry {obj!r}: {type(exc).__name__}: {exc}") from None


def _positive_int(v, name: str) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def _sort_key(e: TunedEntry):
    return (e.key[0], e.kernel, tuple(dtype_name(k) if isinstance(k, torch.dtype) else k for k in e.key[1:]))


def table_to_json(entries: Iterable[TunedEntry], note: str = "") -> dict:
    """The file's content: format, a note, entries sorted by (device, kernel, key); one key once."""
    entries = sorted(entries, key=_sort_key)
    seen = set()
    for e in entries:
        if (e.kernel, e.key) in seen:
            raise ValueError(f"two {e.kernel} entries for {e.key}")
        seen.add((e.kernel, e.key))
    return {"format": TABLE_FORMAT, "note": note, "entries": [e.to_json() for e in entries]}


def write_table(path: Union[str, Path], entries: Iterable[TunedEntry], note: str = "") -> Path:
    """Write a table file (atomically, `sage_fast.utils.files`)."""
    path = Path(path)
    text = json.dumps(table_to_json(entries, note), indent=1) + "\n"
    return atomic_write_text(path, text)


def read_table(path: Union[str, Path]) -> List[TunedEntry]:
    """Entries of a table file; ValueError on a malformed file (a missing file is an empty table)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: not a tuned launch table of format {TABLE_FORMAT}")
    entries = [TunedEntry.from_json(obj) for obj in data["entries"]]
    table_to_json(entries)  # rejects duplicate keys
    return entries


def install_table(entries: Iterable[TunedEntry]) -> None:
    """Make `entries` the tuned tables (every table is cleared first)."""
    entries = list(entries)
    for _, table in KERNEL_TABLES.values():
        table.clear()
    for e in entries:
        KERNEL_TABLES[e.kernel][1][e.key] = e.config


def installed_entries() -> List[TunedEntry]:
    """The tuned tables as entries (without evidence)."""
    return sorted((TunedEntry(k, key, cfg) for k, (_, table) in KERNEL_TABLES.items() for key, cfg in table.items()),
                  key=_sort_key)


def table_path() -> Optional[Path]:
    """The table file in effect: $SAGE_FAST_TUNED_LAUNCH when set ("none": no table), else TABLE_PATH."""
    given = os.environ.get(TABLE_ENV, "").strip()
    if given.lower() in ("none", "off", "0"):
        return None
    return Path(given) if given else TABLE_PATH


def load_tuned_tables(path: Union[str, Path, None] = "default") -> List[TunedEntry]:
    """Read the table file (default: `table_path()`) into the TUNED_* tables and return its entries.
    A malformed file warns and leaves the tables empty: the heuristics then run, never a bad entry."""
    path = table_path() if path == "default" else path
    try:
        entries = read_table(path) if path is not None else []
    except ValueError as exc:
        warnings.warn(f"sage-fast: ignoring the tuned launch table: {exc}", stacklevel=2)
        entries = []
    install_table(entries)
    return entries


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


ROW_KERNELS = ("fwd", "dx")


def row_launch(d: int, h: int, op_dtype: torch.dtype, device: Union[str, torch.device], kernel: str = "fwd") -> RowLaunch:
    """The configuration of row kernel `kernel` ("fwd": the forward, "dx": the dx backward) for
    (d, H = 2r, GEMM operand dtype) on `device`. The two kernels share the heuristic, not the tuned table."""
    if kernel not in ROW_KERNELS:
        raise ValueError(f"kernel must be one of {ROW_KERNELS}, got {kernel!r}")
    if backend.interpret_enabled():
        return interpreter_row_launch(d, h)
    table = TUNED_FWD if kernel == "fwd" else TUNED_DX
    return _tuned(table, device, d, h, op_dtype) or gpu_row_launch(d, h, op_dtype)


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
    """The fused loss kernel's untuned configuration for a (batch, num_classes) problem (tests replace
    this function to force small tiles)."""
    if backend.interpret_enabled():
        return interpreter_loss_launch(batch, num_classes)
    return gpu_loss_launch(batch, num_classes)


def select_loss_launch(batch: int, num_classes: int, dtype: torch.dtype, fit: bool,
                       device: Union[str, torch.device]) -> LossLaunch:
    """What the loss glue launches: the tuned entry for (device, num_classes, logits dtype, FIT) when
    there is one (GPU only), else `loss_launch`."""
    if TUNED_LOSS and not backend.interpret_enabled():
        hit = TUNED_LOSS.get((device_info(device)[0], int(num_classes), dtype, bool(fit)))
        if hit is not None:
            return hit
    return loss_launch(batch, num_classes)


# The table shipped beside this module (or the one $SAGE_FAST_TUNED_LAUNCH names), read once at import.
load_tuned_tables()
