"""What runs on this machine, as plain data: the report behind ``sage-fast info``.

`environment_report` gathers the versions (sage_fast, Python, torch, Triton, open_clip, xformers,
CUDA), the device and its compute capability, what each op (adapter, loss) and the attention
resolve to here under a backend setting and why (`sage_fast.ops.backend.explain_backend`,
`sage_fast.model.attention.explain_attention`; on a GPU this runs the kernels' self-check), the
self-check results so far, and on CUDA a quick speed ratio of the fused kernels against the PyTorch
path at one small shape (`speed_ratios`, a few seconds; skipped elsewhere). `format_environment`
renders it as text. Everything is JSON-ready (str, int, float, bool, None, lists, dicts).
"""
from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from .._version import __version__
from ..ops import parity, selfcheck
from ..ops.backend import HAS_TRITON, OPS, explain_backend
from .attention import explain_attention, xformers_version

#: the shapes of the speed probe: ViT-B/16 width with LIFT's r = 32 over 32 images of 197 tokens, and a
#: 1000-class FIT loss over 256 rows, in bf16 (the training dtype on CUDA)
SPEED_ADAPTER = {"m": 32 * 197, "d": 768, "r": 32}
SPEED_LOSS = {"batch": 256, "num_classes": 1000}


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> Dict[str, Optional[str]]:
    """sage_fast, python, torch, triton, open_clip, xformers (None: not installed), cuda (the CUDA
    torch was built with; None for a CPU build) and cudnn."""
    if HAS_TRITON:
        import triton

        triton_version = triton.__version__
    else:  # pragma: no cover - Triton is a dependency on Linux
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "sage_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "open_clip": _dist_version("open_clip_torch"),
        "xformers": xformers_version(),
        "cuda": torch.version.cuda,
        "cudnn": str(cudnn) if cudnn is not None else None,
    }


def default_device() -> torch.device:
    """The current CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_report(device: Union[str, torch.device, None] = None) -> dict:
    """device ("cuda:0" / "cpu"), name, capability ("9.0"; None off CUDA), cuda_devices (count), and
    for CUDA the total memory in GiB."""
    device = torch.device(device) if device is not None else default_device()
    out = {"device": selfcheck.device_key(device), "name": device.type, "capability": None,
           "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1))
    else:
        out["name"] = platform.processor() or platform.machine() or device.type
    return out


def _default_dtypes(device: torch.device) -> Sequence[torch.dtype]:
    """fp32, and bf16 (the adapters' dtype under the trainer's autocast) on CUDA."""
    return (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)


# --------------------------------------------------------------------------------------------
# The speed probe
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn: Callable[[], object], device: torch.device, iters: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of `iters` calls, after two warm-up calls (compilation)."""
    fn()
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def _ratio(fused: Callable[[], object], reference: Callable[[], object], device: torch.device,
           iters: int, repeats: int) -> dict:
    t_fused = _seconds_per_call(fused, device, iters, repeats)
    t_ref = _seconds_per_call(reference, device, iters, repeats)
    return {"fused_ms": round(t_fused * 1e3, 4), "pytorch_ms": round(t_ref * 1e3, 4),
            "speedup": round(t_ref / t_fused, 3) if t_fused > 0 else None}


def measure_speed_ratios(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16,
                         adapter_shape: Optional[dict] = None, loss_shape: Optional[dict] = None,
                         iters: int = 20, repeats: int = 5) -> dict:
    """Time forward + backward of the fused adapter (block form) against PyTorch's folded adapter, and
    of the fused FIT loss against the PyTorch reference, on `device` in `dtype`, same inputs, same run.

    Runs wherever the kernels run (on CPU only under Triton's interpreter, where the ratio means
    nothing: the tests use it so). Returns {"dtype", "adapter": {shape, fused_ms, pytorch_ms, speedup},
    "loss": {...}}.
    """
    device = torch.device(device)
    adapter_shape = dict(adapter_shape or SPEED_ADAPTER)
    loss_shape = dict(loss_shape or SPEED_LOSS)
    # the same leaves for both paths, made once: the timings hold forward + backward only
    ta = parity.leaves(parity.adapter_problem(**adapter_shape), device, dtype)
    tl = parity.leaves(parity.loss_problem(**loss_shape), device, dtype)
    out = {"dtype": selfcheck.dtype_name(dtype)}
    out["adapter"] = {"shape": adapter_shape, **_ratio(
        lambda: parity.adapter_step(ta, dtype), lambda: parity.adapter_step(ta, dtype, kernels=False),
        device, iters, repeats)}
    out["loss"] = {"shape": loss_shape, **_ratio(
        lambda: parity.loss_step(tl), lambda: parity.loss_step(tl, kernels=False), device, iters, repeats)}
    return out


def speed_ratios(device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """`measure_speed_ratios` at the default shapes on a CUDA device whose kernels passed their self-check;
    {"skipped": reason} elsewhere. A few seconds (mostly the kernels' compilation on a first run)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return {"skipped": f"the speed probe runs on CUDA only, not on {device.type}"}
    failed = [r for r in (selfcheck.self_check(f, device, dtype) for f in OPS) if r.failed]
    if failed:
        return {"skipped": f"the {failed[0].family} kernels failed their self-check"}
    try:
        return measure_speed_ratios(device, dtype)
    except Exception as err:  # e.g. out of memory on a busy GPU: the report goes on
        return {"skipped": f"the speed probe failed: {selfcheck.one_line(err)}"}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def environment_report(device: Union[str, torch.device, None] = None, backend: str = "auto",
                       attention: str = "auto", dtypes: Optional[Sequence[torch.dtype]] = None,
                       speed: bool = True) -> dict:
    """Everything `format_environment` prints, as plain data.

    device: default the current CUDA device, else the CPU. backend / attention: the settings to explain
    (the model's ``backend`` and ``attention``). dtypes: the dtypes each op is explained in (default
    fp32, plus bf16 on CUDA). speed: run the speed probe (CUDA only).
    Keys: versions, device, backends (one `explain_backend` entry per op and dtype), attention
    (`explain_attention`), self_check (`sage_fast.ops.selfcheck.results`), speed.
    """
    device = torch.device(device) if device is not None else default_device()
    dtypes = tuple(dtypes) if dtypes is not None else _default_dtypes(device)
    backends = [explain_backend(op, backend, device, dt) for op in OPS for dt in dtypes]
    return {
        "versions": versions(),
        "device": device_report(device),
        "backends": backends,
        "attention": explain_attention(attention, device),
        "self_check": selfcheck.results(),
        "self_check_enabled": selfcheck.enabled(),
        "speed": speed_ratios(device) if speed else {"skipped": "not asked for"},
    }


def format_environment(report: dict) -> str:
    """`environment_report` as text, one fact per line."""
    v, dev = report["versions"], report["device"]
    lines = ["versions:"]
    lines += [f"  {k:<10} {val if val is not None else 'not installed' if k != 'cuda' else 'none (CPU build)'}"
              for k, val in v.items()]
    cap = f", compute capability {dev['capability']}" if dev.get("capability") else ""
    lines.append(f"device: {dev['device']} ({dev['name']}{cap})")
    lines.append("backends:")
    for b in report["backends"]:
        what = b["path"] if b["resolved"] is not None else "cannot run"
        lines.append(f"  {b['op']:<8} {b['dtype']:<9} {b['requested']} -> {what}: {b['reason']}")
    att = report["attention"]
    lines.append(f"attention: {att['requested']} -> {att['resolved'] or 'cannot run'}: {att['reason']}")
    xf = att["xformers"]
    usable = {True: "usable", None: str(xf["reason"])}.get(xf["usable"], f"not usable: {xf['reason']}")
    lines.append(f"  xformers {xf['version'] or 'not installed'}: {usable}")
    checks = report["self_check"]
    state = "on" if report.get("self_check_enabled", True) else f"off ({selfcheck.ENV_VAR}=0)"
    lines.append(f"kernel self-check ({state}):" + ("" if checks else " none ran (no kernel path here)"))
    for c in checks:
        tail = f": {c['reason']}" if c["reason"] else ""
        lines.append(f"  {c['family']:<8} {c['device']:<7} {c['dtype']:<9} {c['status']} ({c['seconds']:.2f} s){tail}")
    sp = report["speed"]
    if "skipped" in sp:
        lines.append(f"speed: skipped ({sp['skipped']})")
    else:
        lines.append(f"speed (fused vs PyTorch, forward + backward, {sp['dtype']}):")
        for op in ("adapter", "loss"):
            e = sp[op]
            shape = ", ".join(f"{k}={val}" for k, val in e["shape"].items())
            lines.append(f"  {op:<8} {shape}: {e['fused_ms']:.3f} ms vs {e['pytorch_ms']:.3f} ms, "
                         f"{e['speedup']}x")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# What a run used
# --------------------------------------------------------------------------------------------


def run_record(model) -> dict:
    """What `model` (a `SageModel`) actually ran, for a run folder's ``runtime.json``: versions, device,
    `SageModel.runtime` (each op's backend and any fallback with its reason, the attention and xformers
    op the last forward used) and the kernels' self-checks so far. Plain data."""
    runtime = model.runtime()
    return {
        "versions": versions(),
        "device": device_report(runtime["device"]),
        "model": runtime,
        "self_check": selfcheck.results(),
        "self_check_enabled": selfcheck.enabled(),
    }


def summary_line(record: dict) -> str:
    """One line of a `run_record`: ``adapter: triton (bf16), loss: torch, attention: sdpa`` plus any
    fallback and its reason."""
    m = record["model"]
    parts = []
    for op in ("adapter", "loss"):
        e = m[op]
        what = f"{op} {e['resolved'] or 'cannot run'} ({e['dtype']})"
        if e.get("fallback"):
            what += f" [fell back: {e['reason']}]"
        parts.append(what)
    att = m["attention"]
    ran = att.get("ran") or att.get("resolved")
    ops = att.get("xformers_ops") or []
    parts.append(f"attention {ran}" + (f" ({', '.join(ops)})" if ops else ""))
    return ", ".join(parts)
