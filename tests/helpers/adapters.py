"""Randomised SG-Adapters, for every test that needs one.

A fresh adapter has `up` = 0 (LIFT's init: a = 0, a fresh Sage model is zero-shot CLIP), which
would hide most of its math from a test. These helpers perturb every parameter instead (one
rule for all of them), on the parameters' device and in their dtype.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from sage_fast.ops import SGAdapter, SGAdapterFused


def _perturb(adapter: nn.Module, gen: Optional[torch.Generator]) -> None:
    """gen None: the global RNG."""
    # Vectors and scalars (LayerNorm affine, biases, s_vt) move by 0.5 sigma; the matrices by
    # 1 / sqrt(d), so that h and a keep an O(1) scale whatever the width.
    with torch.no_grad():
        for p in adapter.parameters():
            scale = 0.5 if p.ndim < 2 else 1.0 / adapter.dim**0.5
            p.add_((torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype))


def randomise_adapter(adapter: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter of one adapter (SGAdapter or SGAdapterFused) in place, drawing from
    a generator seeded with `seed` (the global RNG is left alone); returns it."""
    _perturb(adapter, torch.Generator().manual_seed(seed))
    return adapter


def randomise_adapters(adapters: Iterable[nn.Module], seed: int = 0) -> None:
    """Perturb every parameter of several adapters (e.g. a Sage model's `model.adapters`) in place,
    each differently (one generator across them)."""
    gen = torch.Generator().manual_seed(seed)
    for adapter in adapters:
        _perturb(adapter, gen)


def random_adapter_pair(
    d: int, r: int, alpha: float = 0.3, seed: int = 0, backend: str = "triton"
) -> Tuple[SGAdapter, SGAdapterFused]:
    """A randomised reference SGAdapter and an SGAdapterFused with the same weights.

    One stream: the global RNG, seeded with `seed`, draws the adapter's init and then the
    perturbation (so the caller's later global draws are the same on every run too; the fp16
    parity tolerances of test_sg_adapter.py were set on these draws). backend "triton": the
    kernels (interpreted on CPU).
    """
    torch.manual_seed(seed)
    ref = SGAdapter(d, r, alpha=alpha)
    _perturb(ref, None)
    fused = SGAdapterFused(d, r, alpha=alpha, backend=backend)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def random_folded_weights(d: int, r: int, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """(W_cat (d, 2r), b_cat (2r,), W_up (d, 2r), b_up (d,)), fp32: the folded operands the custom
    ops `sage_fast::sg_adapter_fwd` / `_bwd` take, random."""
    gen = torch.Generator().manual_seed(seed)
    h = 2 * r
    w_cat = torch.randn(d, h, generator=gen) / d**0.5
    b_cat = torch.randn(h, generator=gen) * 0.5
    w_up = torch.randn(d, h, generator=gen) / h**0.5
    b_up = torch.randn(d, generator=gen) * 0.5
    return w_cat, b_cat, w_up, b_up
