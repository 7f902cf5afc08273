"""What a benchmark run ran on: the device, the driver, the library versions, the attention kernels.

`collect_env` is the content of a results folder's `env.json` (run_gpu.sh writes it before the first
stage, each pytest session adds its command line; `benchmarks.records.write_json` writes it): the GPU's
name, compute capability, SM count and memory, the driver and the CUDA versions (the runtime torch was
built with and the driver's), cuDNN, torch, Triton, open_clip, xformers, pytest-benchmark and sage-fast
versions, which kernel PyTorch SDPA runs (`sdpa_kernel`), whether xformers runs (`xformers_status`),
the date, the git commit and the command. The versions and the device's name, capability and memory
come from the library's own report (`sage_fast.model.runtime`, behind ``sage-fast info``).
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from .timing import DEVICE, ON_GPU

REPO_ROOT = Path(__file__).resolve().parent.parent


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def device_slug() -> str:
    """File-name form of the device, e.g. nvidia-h100-80gb-hbm3 (cpu-smoke without CUDA)."""
    name = device_name() if ON_GPU else "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def package_version(module: str) -> Optional[str]:
    """`module.__version__`, None when it is not installed (or does not import)."""
    try:
        return importlib.import_module(module).__version__
    except Exception:  # not installed, or broken install: report it as absent
        return None


def _run(cmd: list[str], cwd: Optional[Path] = None) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


# ----------------------------------------------------------------------------------------------
# attention kernels


_SDPA_KERNEL: list[str] = []  # cached probe result


def sdpa_kernel() -> str:
    """Which kernel PyTorch SDPA runs for ViT-B/16 attention: sdpa-flash, sdpa-efficient or sdpa-math.

    "sdpa" alone does not say it: flash needs a supported GPU, dtype and head size, and SDPA falls back
    silently. Probed once on a (128, 12, 197, 64) bf16 problem (the train step's shape, unmasked), each
    backend forced in turn; the first that runs is the one SDPA's dispatcher prefers. CPU: "sdpa (cpu)".
    """
    if _SDPA_KERNEL:
        return _SDPA_KERNEL[0]
    result = "sdpa (cpu)"
    if ON_GPU:
        result = "sdpa-math"
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel as force_kernel

            q = torch.randn(128, 12, 197, 64, device=DEVICE, dtype=torch.bfloat16)
            for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                  ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with force_kernel([backend]):
                        torch.nn.functional.scaled_dot_product_attention(q, q, q)
                    torch.cuda.synchronize()
                    result = name
                    break
                except RuntimeError:  # "No available kernel": try the next one
                    continue
            del q
        except ImportError:  # torch without torch.nn.attention.sdpa_kernel
            result = "sdpa (kernel unknown)"
    _SDPA_KERNEL.append(result)
    return result


def xformers_status() -> tuple[bool, str]:
    """(runs, what was found): whether the model's xformers attention can run on this device, from the
    model's own probe (`sage_fast.model.attention.xformers_unusable_reason`: a tiny forward and backward
    that must agree with SDPA; once per device and process). An installed xformers can still fail (its
    compiled extensions built for another torch, a GPU its kernels do not support): the xformers cases
    then skip with this text as the reason."""
    from sage_fast.model.attention import xformers_unusable_reason, xformers_version

    reason = xformers_unusable_reason(DEVICE)
    if reason is None:
        return True, f"xformers {xformers_version()} runs here (forward and backward agree with SDPA)"
    return False, reason


def attention_backend() -> str:
    """The attention kernel the train-step benchmark uses: the model's "auto" choice on this device
    (SDPA; see sage_fast/model/attention.py)."""
    from sage_fast.model import resolve_attention

    return resolve_attention("auto", DEVICE)


# ----------------------------------------------------------------------------------------------
# the environment file


def git_commit() -> Optional[str]:
    """The commit the code is at: $SAGE_GIT_COMMIT (for a copy without .git), else `git rev-parse HEAD`."""
    return os.environ.get("SAGE_GIT_COMMIT") or _run(["git", "rev-parse", "HEAD"], REPO_ROOT)


def command_line() -> str:
    """This process's command line, as the environment file lists it."""
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


def _cuda_driver_version() -> Optional[str]:
    """The CUDA version the driver supports (e.g. "12.8"), from the driver API through torch."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)  # noqa: SLF001 - torch has no public accessor
    try:
        v = int(get()) if get else 0
    except Exception:  # noqa: BLE001 - no driver
        return None
    return f"{v // 1000}.{v % 1000 // 10}" if v else None


def gpu_fields() -> dict:
    """What the library's device report does not say: SMs, the driver (nvidia-smi) and the CUDA version
    the driver supports (empty without CUDA)."""
    if not ON_GPU:
        return {}
    out = {"gpu_sms": torch.cuda.get_device_properties(0).multi_processor_count,
           "cuda_driver": _cuda_driver_version()}
    smi = _run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"])
    if smi:
        fields = [f.strip() for f in smi.splitlines()[0].split(",")]
        out["driver"] = fields[0]
        out["nvidia_smi"] = dict(zip(("driver_version", "clocks_max_sm", "power_limit"), fields))
    else:
        out["driver"] = None
    return out


def runtime_choices() -> dict:
    """What the library's "auto" runs here for each op (adapter, loss) in the benchmarks' dtypes, and why
    (`sage_fast.ops.backend.explain_backend`), with the kernels' self-check results and cost: on a GPU this
    runs the self-check, so its seconds are the cost a training run pays once per process."""
    import torch

    from sage_fast.ops import selfcheck
    from sage_fast.ops.backend import OPS, explain_backend

    device = DEVICE if ON_GPU else torch.device("cpu")
    dtypes = (torch.bfloat16, torch.float32) if ON_GPU else (torch.float32,)
    return {"auto_backends": [explain_backend(op, "auto", device, dt) for op in OPS for dt in dtypes],
            "self_check": selfcheck.results(), "self_check_enabled": selfcheck.enabled()}


def collect_env(command: Optional[str] = None) -> dict:
    """Device, driver, library versions, attention kernels, date, git commit and the command line of this
    run. The versions and the device's name, capability and memory are the library's own report
    (`sage_fast.model.runtime.versions`, `device_report`), under the keys the summary reads."""
    from sage_fast.model.runtime import device_report, versions

    v = versions()
    dev = device_report(DEVICE if ON_GPU else "cpu")
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "device_type": DEVICE.type,
        "mode": "gpu" if ON_GPU else "cpu-smoke",
        "python": v["python"],
        "platform": platform.platform(),
        "torch": v["torch"],
        "torch_cuda": v["cuda"],
        "cudnn": v["cudnn"],
        "triton": v["triton"],
        "open_clip": v["open_clip"],
        "xformers": v["xformers"],
        "xformers_status": xformers_status()[1],
        "sdpa_kernel": sdpa_kernel(),
        "pytest_benchmark": package_version("pytest_benchmark"),
        "sage_fast": v["sage_fast"],
        "cpu_threads": torch.get_num_threads(),
        "command": command or command_line(),
    }
    if ON_GPU:
        env.update(gpu_capability=dev["capability"], gpu_memory_GiB=dev.get("memory_gib"), **gpu_fields())
    env.update(runtime_choices())
    env["git_commit"] = git_commit() or "unknown"
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO_ROOT)
    env["git_dirty"] = None if status is None else bool(status)
    return env
