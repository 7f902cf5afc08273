"""Argument validation of the public ops API, and one dtype rule for every backend.

Every hyperparameter with a range is checked where a module or function takes it (`sage_fast.ops.checks`,
the same functions the run config calls), so a bad value is a ValueError naming it, not a NaN loss or a
misleading "NaN or Inf in the adapter weights" later. Dtypes: the reference, the folded PyTorch path
("auto" on CPU) and the Triton kernels (interpreted on CPU) accept the same inputs and return the same
dtypes; values agree within the parity tests' tolerances (fp32 1e-4 relative here, fp16 1e-2).
"""
from __future__ import annotations

import math

import pytest
import torch

from helpers.adapters import randomise_adapter
from sage_fast.ops import (
    AdaptFormer,
    AdaptFormerFused,
    CompensatedLALoss,
    FITLoss,
    SGAdapter,
    SGAdapterFused,
    compensated_la_loss,
    compensated_log_prior,
    fit_loss,
    fused_fit_loss,
    fused_la_loss,
    logit_adjusted_loss,
)
from sage_fast.ops.checks import GAMMA_MAX

COUNTS = [500, 40, 3]
# Where "triton" runs: CUDA if present, else the CPU under the interpreter (conftest.py)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
LOGITS = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -0.1]])
TARGET = torch.tensor([0, 2])


# ---------------------------------------------------------------- the loss's hyperparameters


@pytest.mark.parametrize("kw, message", [
    (dict(gamma=1e3), "gamma must lie in [0, 10]"),
    (dict(gamma=float("nan")), "gamma must be a finite number, got nan"),
    (dict(gamma=float("inf")), "gamma must be a finite number, got inf"),
    (dict(gamma=-0.1), "gamma must lie in [0, 10]"),
    (dict(mu=float("inf")), "mu must be a finite number, got inf"),
    (dict(mu=float("nan")), "mu must be a finite number"),
    (dict(mu=0.0), "mu must be positive, got 0.0"),
])
def test_compensated_la_loss_refuses_bad_mu_and_gamma(kw, message):
    with pytest.raises(ValueError) as err:
        compensated_la_loss(LOGITS, TARGET, COUNTS, **kw)
    assert message in str(err.value)
    for make in (CompensatedLALoss, FITLoss):  # the modules, with every adjustment (mu, gamma are kept)
        for adjustment in ("compensated", "la", "ce"):
            with pytest.raises(ValueError, match=message.split(" ")[0]):
                make(COUNTS, adjustment=adjustment, **kw)


@pytest.mark.parametrize("counts, bad", [
    ([500, float("inf"), 3], "[1]"),
    ([500, float("nan"), 3], "[1]"),
    ([500, 0, 3], "[1]"),
    ([500, 40, -3], "[2]"),
])
def test_class_counts_must_be_positive_and_finite(counts, bad):
    with pytest.raises(ValueError, match=r"class counts must be positive and finite; classes \[\d\]") as err:
        compensated_la_loss(LOGITS, TARGET, counts)
    assert bad in str(err.value)
    with pytest.raises(ValueError, match="1-D"):
        CompensatedLALoss([[500, 40, 3]])
    with pytest.raises(TypeError, match="class_counts must be a sequence of numbers"):
        CompensatedLALoss(["500", "40"])


def test_huge_counts_give_a_finite_loss_equal_to_its_log_space_value():
    """1e308 + 1e308 overflows fp64 and 1e308 ** gamma does too for gamma > 1: the prior is computed from logs.
    The adjusted logits are (1 + gamma) log n_k plus a constant (docs/method.md), which the softmax drops."""
    counts = [1e308, 1e308, 3.0]
    for gamma in (0.05, GAMMA_MAX):
        prior = compensated_log_prior(counts, mu=0.5, gamma=gamma)
        assert torch.isfinite(prior).all()
        log_n = torch.tensor(counts, dtype=torch.float64).log()
        # log mu + log S_N - log(C n_min), with S_N = 2e308 + 3 written as logs
        const = math.log(0.5) + math.log(2.0) + math.log(1e308) - math.log(3 * 3.0)
        torch.testing.assert_close(prior.double(), (1 + gamma) * log_n + const, rtol=1e-6, atol=0.0)
        loss = compensated_la_loss(LOGITS, TARGET, counts, gamma=gamma)
        assert torch.isfinite(loss)
        ref = torch.nn.functional.cross_entropy(LOGITS.double() + (1 + gamma) * log_n, TARGET)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)


def test_the_largest_gamma_keeps_the_loss_finite_for_extreme_inputs():
    """gamma = GAMMA_MAX, counts from 1 to 1e300, mu tiny and huge: the loss stays finite on every backend."""
    counts = [1e300, 1.0, 7.0]
    for mu in (1e-300, 0.5, 1e300):
        for backend in ("torch", "triton"):
            loss = CompensatedLALoss(counts, mu=mu, gamma=GAMMA_MAX, backend=backend).to(DEV)(
                (LOGITS * 25).to(DEV), TARGET.to(DEV))
            assert torch.isfinite(loss), (mu, backend)


@pytest.mark.parametrize("lambdas, message", [
    ((-1.0, 0.0, 0.0), r"lambdas\[0\] must be >= 0, got -1.0"),
    ((0.0, float("nan"), 0.0), r"lambdas\[1\] must be a finite number, got nan"),
    ((0.0, 0.0, float("inf")), r"lambdas\[2\] must be a finite number, got inf"),
    ((0.1, 0.2), "lambdas must hold three numbers"),
])
def test_fit_lambdas_are_checked_everywhere(lambdas, message):
    with pytest.raises(ValueError, match=message):
        FITLoss(COUNTS, lambdas=lambdas)
    z = torch.randn(2, 3)
    prior = compensated_log_prior(COUNTS)
    s = torch.zeros(())
    for fn in (fit_loss, fused_fit_loss):
        with pytest.raises(ValueError, match=message):
            fn(z, z, z, TARGET, prior, s, s, lambdas)


@pytest.mark.parametrize("ignore_index", [1.7, 2.0, "1", True, None])
def test_ignore_index_must_be_an_integer(ignore_index):
    """1.7 was truncated to 1, silently ignoring class 1's rows."""
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        compensated_la_loss(LOGITS, TARGET, COUNTS, ignore_index=ignore_index)
    for make in (CompensatedLALoss, FITLoss):
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            make(COUNTS, ignore_index=ignore_index)
    prior = compensated_log_prior(COUNTS)
    for fn in (logit_adjusted_loss, fused_la_loss):
        with pytest.raises(TypeError, match="ignore_index must be an integer"):
            fn(LOGITS, TARGET, prior, ignore_index)


def test_integer_ignore_index_of_any_integer_type_still_works():
    import numpy as np

    want = compensated_la_loss(LOGITS, TARGET, COUNTS, ignore_index=2)
    got = compensated_la_loss(LOGITS, TARGET, COUNTS, ignore_index=np.int64(2))
    assert torch.equal(want, got)
    assert CompensatedLALoss(COUNTS, ignore_index=np.int32(-1)).ignore_index == -1


# ---------------------------------------------------------------- the adapters' hyperparameters


@pytest.mark.parametrize("kw, message", [
    (dict(eps=-1.0), "eps must be positive, got -1.0"),
    (dict(eps=0.0), "eps must be positive, got 0.0"),
    (dict(eps=float("nan")), "eps must be a finite number, got nan"),
    (dict(eps=float("inf")), "eps must be a finite number, got inf"),
    (dict(alpha=2.0), r"alpha must lie in \[0, 1\], got 2.0"),
    (dict(alpha=-0.1), r"alpha must lie in \[0, 1\]"),
    (dict(alpha=float("nan")), "alpha must be a finite number, got nan"),
])
@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_sg_adapter_refuses_bad_eps_and_alpha_at_construction(kw, message, backend):
    """eps = -1 made every backend's LayerNorm NaN: the fused path blamed the weights, the reference said nothing."""
    with pytest.raises(ValueError, match=message):
        SGAdapterFused(16, 4, backend=backend, **kw)
    with pytest.raises(ValueError, match=message):
        SGAdapter(16, 4, **kw)
    if "eps" in kw:
        with pytest.raises(ValueError, match=message):
            AdaptFormerFused(16, 4, backend=backend, **kw)
        with pytest.raises(ValueError, match=message):
            AdaptFormer(16, 4, **kw)


# ---------------------------------------------------------------- one dtype rule for every backend

BACKENDS = ["torch", "auto", "triton"]


def _adapter_outputs(make, dtype, backend, block):
    torch.manual_seed(0)
    module = randomise_adapter(make(backend), seed=3).to(DEV)
    x = (torch.randn(3, 5, 16) * 2 + 0.3).to(DEV, dtype)
    g = torch.randn(16, device=DEV)
    mlp = torch.randn(3, 5, 16, device=DEV)  # fp32: another dtype than x for fp16
    sg = isinstance(module, SGAdapter)
    args = (x, g) if sg else (x,)
    if block:
        out = module.forward_block(*args, mlp, torch.tensor(0.7, device=DEV))
    else:
        out = module(*args)
    return out


@pytest.mark.parametrize("block", [False, True], ids=["forward", "forward_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["sg", "adaptformer"])
def test_adapters_accept_and_return_the_same_dtypes_on_every_backend(kind, dtype, block):
    """fp16 input to fp32 weights: the reference ("torch") raised a raw dtype error where "auto" worked, and
    "auto"'s forward_block returned fp32 where the kernels return x's dtype. Now every backend computes in x's
    dtype; forward returns it, forward_block x's dtype; values agree with the fp32 reference."""
    if kind == "sg":
        make = lambda b: SGAdapterFused(16, 4, alpha=0.3, backend=b)  # noqa: E731
    else:
        make = lambda b: AdaptFormerFused(16, 4, backend=b)  # noqa: E731
    want = _adapter_outputs(make, torch.float32, "torch", block).double()
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for backend in BACKENDS:
        out = _adapter_outputs(make, dtype, backend, block)
        assert out.dtype == dtype, backend
        err = (out.double() - want).norm() / want.norm()
        assert err < tol, (backend, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=["fp32", "fp16", "fp64"])
def test_losses_return_the_same_dtype_on_every_backend(dtype):
    """fp16 / bf16 / fp32 logits give an fp32 loss, fp64 logits an fp64 one (the kernel computes fp64 in fp32
    but returns fp64, as the reference); FIT's z^ keeps z's dtype."""
    torch.manual_seed(1)
    z, zv, zt = (torch.randn(6, 3).to(DEV, dtype) for _ in range(3))
    target = torch.tensor([0, 1, 2, 0, 1, 2], device=DEV)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    ref_la = CompensatedLALoss(COUNTS, backend="torch").to(DEV)(z, target)
    ref_fit, ref_hat = FITLoss(COUNTS, backend="torch").to(DEV)(z, zv, zt, target)
    for backend in BACKENDS:
        la = CompensatedLALoss(COUNTS, backend=backend).to(DEV)(z, target)
        fit, z_hat = FITLoss(COUNTS, backend=backend).to(DEV)(z, zv, zt, target)
        assert la.dtype == fit.dtype == want_dtype, backend
        assert z_hat.dtype == dtype, backend
        torch.testing.assert_close(la, ref_la, **tol)
        torch.testing.assert_close(fit, ref_fit, **tol)
        torch.testing.assert_close(z_hat, ref_hat, **tol)


def test_fp64_loss_gradient_flows_through_the_triton_cast():
    z = torch.randn(4, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0], device=DEV)
    CompensatedLALoss(COUNTS, backend="triton").to(DEV)(z, target).backward()
    zr = z.detach().clone().requires_grad_()
    CompensatedLALoss(COUNTS, backend="torch").to(DEV)(zr, target).backward()
    assert z.grad.dtype == torch.float64
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)
