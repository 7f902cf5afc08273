"""Attention in the frozen backbone: which kernel runs, decided where the model is built, never substituted.

``model.attention`` is one of `ATTENTION_BACKENDS`:

* "sdpa": PyTorch's `scaled_dot_product_attention` (on CUDA it picks FlashAttention, the
  memory-efficient kernel or the math one per call; on CPU its CPU kernels);
* "xformers": `xformers.ops.memory_efficient_attention`. Usable only where a tiny forward and
  backward of it succeeds on that device and agrees with SDPA (`xformers_unusable_reason`, probed
  once per device and process): never on CPU, never with an xformers whose compiled extensions do
  not load for this torch unless its remaining ops still run. Asked for where it cannot run, it is
  an `AttentionUnavailableError` when the model is built (and at a forward on another device),
  never a silent SDPA;
* "open_clip": open_clip's own `nn.MultiheadAttention` (the literal path; the attention-map tool's);
* "auto": SDPA. Why not xformers when it is usable: the xformers 0.0.35 wheel (built for torch 2.10)
  loads without its own compiled extensions under other torch builds (e.g. torch 2.14), and the ops
  it then dispatches to (``fa2F@...-pt``, ``cutlassF-pt``) call the same aten kernels as SDPA
  (``_flash_attention_forward``, ``_efficient_attention_forward``); no GPU measurement of this
  project shows xformers faster. Change this choice only with such a measurement.

`explain_attention` says what a setting resolves to on a device and why, as plain data;
`xformers_ops_used` names the xformers operators this process dispatched to.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.selfcheck import TOLERANCES, one_line

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "open_clip")
#: what "auto" takes, everywhere (see the module docstring for why)
AUTO_ATTENTION = "sdpa"


class AttentionUnavailableError(RuntimeError):
    """model.attention names a kernel that cannot run on the device: a user-facing one-line error."""

    #: the `sage-fast` command prints it as ``sage-fast: error: ...`` and exits with status 2
    user_error = True


def xformers_version() -> Optional[str]:
    """The installed xformers' version (read from its metadata, without importing it), or None."""
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        return importlib.metadata.version("xformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a source checkout on the path
        return "unknown"


def _probe_dtypes(device: torch.device) -> Tuple[torch.dtype, ...]:
    """fp32, and bf16 (the trainer's autocast dtype) or, on a GPU without bf16, fp16."""
    bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
    return torch.float32, torch.bfloat16 if bf16 else torch.float16


def _probe_xformers(device: torch.device) -> Optional[str]:
    """Run a tiny memory_efficient_attention forward and backward on `device` in fp32 and a half
    dtype and compare it with SDPA; the reason it cannot be used, or None."""
    try:
        import xformers.ops as xops
    except Exception as err:  # a broken install fails in many ways
        return f"xformers does not import: {one_line(err)}"
    gen = torch.Generator().manual_seed(0)
    for dtype in _probe_dtypes(device):
        q, k, v = (torch.randn(2, 9, 2, 16, generator=gen).to(device=device, dtype=dtype).requires_grad_()
                   for _ in range(3))
        try:
            with torch.inference_mode(False), torch.enable_grad():
                out = xops.memory_efficient_attention(q, k, v)
                out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as err:
            return f"xformers' memory_efficient_attention fails on {device} in {dtype}: {one_line(err)}"
        with torch.no_grad():
            want = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            err = float((out.double() - want).norm() / want.norm())
        if not err <= TOLERANCES[dtype]:
            return (f"xformers' memory_efficient_attention disagrees with SDPA on {device} in {dtype} "
                    f"(relative error {err:.1e})")
    return None


@functools.lru_cache(maxsize=None)
def _unusable_reason(device: torch.device) -> Optional[str]:
    if xformers_version() is None:
        return "xformers is not installed (pip install 'sage-fast[xformers]')"
    if device.type != "cuda":
        return f"xformers' attention runs on CUDA devices only, not on {device.type}"
    return _probe_xformers(device)


def xformers_unusable_reason(device: Union[str, torch.device]) -> Optional[str]:
    """Why xformers' attention cannot run on `device`, or None when a tiny call of it succeeded there.

    Probed once per device and process (a few milliseconds on a GPU, plus xformers' import).
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if not torch.cuda.is_available():
            return "CUDA is not available"
        device = torch.device("cuda", torch.cuda.current_device())
    return _unusable_reason(device)


def _unavailable(device: torch.device, reason: str) -> AttentionUnavailableError:
    return AttentionUnavailableError(
        f"model.attention=xformers cannot run on {device}: {reason}; use model.attention=auto or sdpa"
    )


def resolve_attention(attention: str, device: Union[str, torch.device]) -> str:
    """The kernel `attention` runs on `device`: "sdpa", "xformers" or "open_clip".

    "auto" -> "sdpa" (see the module docstring). "xformers" where it cannot run ->
    `AttentionUnavailableError` (never a substitute).
    """
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if attention == "auto":
        return AUTO_ATTENTION
    if attention == "xformers":
        device = torch.device(device)
        reason = xformers_unusable_reason(device)
        if reason is not None:
            raise _unavailable(device, reason)
    return attention


def explain_attention(attention: str = "auto", device: Union[str, torch.device] = "cpu",
                      probe_xformers: bool = True) -> dict:
    """What `attention` runs on `device` and why, as plain data: requested, resolved (None when it cannot
    run), reason, and xformers: {version (None: not installed), usable, reason}.

    probe_xformers=False (for a setting other than "xformers"): xformers is not imported or probed;
    usable is then None, reason "not probed"."""
    device = torch.device(device)
    if probe_xformers or attention == "xformers":
        xf_reason = xformers_unusable_reason(device)
        xf = {"version": xformers_version(), "usable": xf_reason is None, "reason": xf_reason}
    else:
        xf = {"version": xformers_version(), "usable": None, "reason": "not probed"}
    entry = {"requested": attention, "device": str(device), "xformers": xf}
    try:
        resolved = resolve_attention(attention, device)
    except AttentionUnavailableError as err:
        return {**entry, "resolved": None, "reason": str(err)}
    if attention == "auto":
        why = ("'auto' takes PyTorch SDPA: xformers' usable ops call the same aten kernels, and no measurement "
               "shows it faster")
    else:
        why = f"model.attention={attention} asks for it"
    return {**entry, "resolved": resolved, "reason": why}


_XFORMERS_OPS: Dict[tuple, str] = {}


def _record_xformers_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Name the operator xformers dispatches this call to, once per (device, dtype, head width, grad)."""
    needs_grad = any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled()
    key = (str(q.device), q.dtype, q.shape[-1], needs_grad)
    if key in _XFORMERS_OPS:
        return
    try:
        from xformers.ops import fmha

        op = fmha._dispatch_fw(fmha.Inputs(query=q, key=k, value=v), needs_grad)
        _XFORMERS_OPS[key] = str(getattr(op, "NAME", op.__name__))
    except Exception as err:  # a private API: say so rather than fail the forward
        _XFORMERS_OPS[key] = f"unknown ({one_line(err)})"


def xformers_ops_used() -> List[str]:
    """The xformers forward operators (their NAME, e.g. "fa2F@2.5.7-pt") this process's attention calls
    dispatched to, sorted; empty when xformers has not run."""
    return sorted(set(_XFORMERS_OPS.values()))


def frozen_self_attention(mha: nn.MultiheadAttention, x: torch.Tensor, backend: str) -> torch.Tensor:
    """Self-attention of open_clip's nn.MultiheadAttention on x (B, N, d), no mask.

    Same weights and result as ``mha(x, x, x, need_weights=False)[0]``; backend "sdpa" (PyTorch SDPA)
    or "xformers" (memory_efficient_attention; `AttentionUnavailableError` where it cannot run on
    x's device).
    """
    if backend not in ("sdpa", "xformers"):
        raise ValueError(f"frozen_self_attention runs 'sdpa' or 'xformers', got {backend!r}")
    b, n, d = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, heads, d // heads)
    if backend == "xformers":
        reason = xformers_unusable_reason(x.device)
        if reason is not None:
            raise _unavailable(x.device, reason)
        import xformers.ops as xops

        q, k, v = qkv.unbind(2)                               # (B, N, H, hd) each
        if not torch.compiler.is_compiling():
            _record_xformers_op(q, k, v)
        out = xops.memory_efficient_attention(q, k, v)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)        # (B, H, N, hd) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return mha.out_proj(out.reshape(b, n, d))
