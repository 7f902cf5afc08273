"""The ablations' ops: LIFT's AdaptFormer, the SG-Adapter without W_proj^vt, and the LA / CE losses.

Each reference is checked against an independent re-statement of its equations; each fused form
(Triton, interpreted on CPU, fp32, small sizes) and the folded PyTorch form (backend "auto" off
CUDA) against the reference, forward and every gradient. The adapter parity tests run both the
drop-in form and the block form (x + mlp_out + s * a).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sage_fast import (
    AdaptFormer,
    AdaptFormerFused,
    CompensatedLALoss,
    FITLoss,
    SGAdapterFused,
    compensated_log_prior,
    fold_adaptformer_weights,
    fold_adapter_weights,
    loss_log_prior,
)
from sage_fast.ops import LOSSES
from sage_fast.ops import sg_adapter as fa
from sage_fast.ops.reference import SGAdapter

from helpers.adapters import randomise_adapter

# Where the Triton path runs: CUDA if present, else CPU under the interpreter.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (leading shape, d, r): r = 1 (H = 1, far below the kernel's 16-wide tile), odd d and r, several row tiles.
CASES = [((1, 1), 32, 1), ((3, 17), 48, 4), ((70,), 40, 7), ((2, 9), 24, 16)]
IDS = [f"{'x'.join(map(str, c[0]))}-d{c[1]}-r{c[2]}" for c in CASES]


def _randomise(module, seed):
    """Every parameter random (a fresh adapter has up = 0 and would hide most gradients)."""
    randomise_adapter(module, seed)


def _inputs(lead, d, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen) * 1.5 + 0.3
    return x, torch.randn(d, generator=gen), torch.randn(*lead, d, generator=gen), torch.randn(*lead, d, generator=gen)


def _run(module, x, upstream, guidance=None, mlp=None, scale=None):
    """Forward and backward with a fixed upstream gradient: (output, {input and parameter grads})."""
    module.zero_grad(set_to_none=True)
    leaves = {"x": x.detach().clone().requires_grad_()}
    args = [leaves["x"]]
    if guidance is not None:
        leaves["guidance"] = guidance.detach().clone().requires_grad_()
        args.append(leaves["guidance"])
    if mlp is None:
        out = module(*args)
    else:
        leaves["mlp_out"] = mlp.detach().clone().requires_grad_()
        leaves["scale"] = scale.detach().clone().requires_grad_()
        out = module.forward_block(*args, leaves["mlp_out"], leaves["scale"])
    out.backward(upstream)
    grads = {k: v.grad for k, v in leaves.items()}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out, grads


def _assert_all_close(got, want, tol=1e-4, atol=1e-5):
    out_f, grads_f = got
    out_r, grads_r = want
    torch.testing.assert_close(out_f, out_r, rtol=tol, atol=atol)
    assert set(grads_f) == set(grads_r)
    for name, g in grads_r.items():
        assert g is not None and grads_f[name] is not None, f"{name}: missing gradient"
        err = (grads_f[name] - g).abs().max().item()
        assert err <= tol * g.abs().max().item() + atol, f"grad {name}: max error {err:.3e}"


# ----------------------------------------------------------------------------------------------
# AdaptFormer


def test_adaptformer_is_lifts_adapter():
    """Sub-modules, LIFT's init (down: kaiming normal a = sqrt 5, i.e. std 1 / sqrt(3d); up and both
    biases 0), a fresh adapter outputs 0, and forward is up(relu(down(LN(x))))."""
    d, r = 96, 8
    torch.manual_seed(0)
    ad = AdaptFormer(d, r)
    assert {n for n, _ in ad.named_children()} == {"ln", "down", "up"}
    assert ad.down.weight.shape == (r, d) and ad.up.weight.shape == (d, r)
    assert sum(p.numel() for p in ad.parameters()) == 3 * d + 2 * d * r + r
    for t in (ad.down.bias, ad.up.weight, ad.up.bias):
        assert torch.count_nonzero(t) == 0
    assert abs(ad.down.weight.std().item() * math.sqrt(3 * d) - 1) < 0.1
    x = torch.randn(4, 7, d)
    assert torch.count_nonzero(ad(x)) == 0

    _randomise(ad, 1)
    ad = ad.double()
    x = x.double()
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ln = (x - mu) / torch.sqrt(var + ad.eps) * ad.ln.weight + ad.ln.bias
    want = torch.clamp(ln @ ad.down.weight.t() + ad.down.bias, min=0) @ ad.up.weight.t() + ad.up.bias
    torch.testing.assert_close(ad(x), want, rtol=1e-10, atol=1e-10)
    mlp, s = torch.randn_like(x), torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(ad.forward_block(x, mlp, s), x + mlp + 0.7 * want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 96\)"):
        ad(torch.randn(3, 95))


def test_adaptformer_fold_is_exact():
    """LN(x, no affine) @ W_cat + b_cat = down(ln(x)), in fp64."""
    ad = AdaptFormer(40, 5)
    _randomise(ad, 2)
    x = torch.randn(6, 40, dtype=torch.float64)
    w_cat, b_cat = fold_adaptformer_weights(ad.double())
    assert w_cat.shape == (40, 5) and b_cat.shape == (5,)
    xhat = F.layer_norm(x, (40,), eps=ad.eps)
    torch.testing.assert_close(xhat @ w_cat.double() + b_cat.double(), ad.down(ad.ln(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("mode", ["adapter", "block"])
@pytest.mark.parametrize("lead,d,r", CASES, ids=IDS)
def test_adaptformer_fused_matches_reference(lead, d, r, mode, backend, monkeypatch):
    """Output and the gradients of x (and mlp_out, s) and of every parameter against `AdaptFormer`:
    "triton" the kernels (interpreted on CPU), "auto" the folded PyTorch form on CPU."""
    if backend == "auto" and DEV == "cpu":
        monkeypatch.setattr(fa.SGAdapterFunction, "apply", lambda *a: pytest.fail("the kernels must not run"))
    torch.manual_seed(d + r)
    ref = AdaptFormer(d, r)
    _randomise(ref, d + r)
    fused = AdaptFormerFused(d, r, backend=backend)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(DEV), fused.to(DEV)
    x, _, mlp, up = (t.to(DEV) for t in _inputs(lead, d))
    kw = dict(mlp=mlp, scale=torch.tensor(-0.8, device=DEV)) if mode == "block" else {}
    _assert_all_close(_run(fused, x, up, **kw), _run(ref, x, up, **kw))


def test_adaptformer_fused_runs_the_sg_kernels_with_a_relu(monkeypatch):
    """The fused AdaptFormer is the existing autograd Function with H = r and alpha = 1 (slope 0)."""
    seen = []
    apply = fa.SGAdapterFunction.apply

    def spy(*args):
        seen.append((args[1].shape, args[7]))
        return apply(*args)

    monkeypatch.setattr(fa.SGAdapterFunction, "apply", spy)
    fused = AdaptFormerFused(16, 3, backend="triton").to(DEV)
    fused(torch.randn(5, 16, device=DEV))
    assert seen == [(torch.Size([16, 3]), 1.0)]


def test_adaptformer_torch_backend_is_the_reference():
    ref = AdaptFormer(24, 4)
    _randomise(ref, 3)
    fused = AdaptFormerFused(24, 4, backend="torch")
    fused.load_state_dict(ref.state_dict())
    x, _, mlp, _ = _inputs((3, 5), 24)
    s = torch.tensor(1.5)
    with torch.no_grad():
        assert torch.equal(fused(x), ref(x))
        assert torch.equal(fused.forward_block(x, mlp, s), ref.forward_block(x, mlp, s))


# ----------------------------------------------------------------------------------------------
# SG-Adapter without W_proj^vt


def test_no_text_proj_matches_equations_and_drops_proj():
    """f_vt = f_t * f_v (Eq. 7 without W_proj^vt); d^2 + d parameters fewer; no `proj` in the state."""
    d, r, alpha = 32, 3, 0.4
    full = SGAdapter(d, r, alpha=alpha)
    ad = SGAdapter(d, r, alpha=alpha, text_proj=False)
    assert ad.proj is None and not any(k.startswith("proj") for k in ad.state_dict())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(full) - n(ad) == d * d + d
    _randomise(ad, 4)
    ad = ad.double()
    x, g = torch.randn(5, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def ln(t):
        return F.layer_norm(t, (d,), ad.ln.weight, ad.ln.bias, ad.eps)

    fv, ft = ln(x), ln(g)
    h = torch.cat([ad.down_v(fv), ad.down_vt(ft * fv) + ad.s_vt * ad.down_t(ft).expand(5, r)], dim=-1)
    want = ad.up(alpha * torch.relu(h) + (1 - alpha) * h)
    torch.testing.assert_close(ad(x, g), want, rtol=1e-10, atol=1e-10)
    # the fold: m = f_t
    w_cat, b_cat = fold_adapter_weights(ad, g)
    xhat = F.layer_norm(x, (d,), eps=ad.eps)
    torch.testing.assert_close(xhat @ w_cat.double() + b_cat.double(), h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("mode", ["adapter", "block"])
@pytest.mark.parametrize("lead,d,r", CASES[1:3], ids=IDS[1:3])
def test_no_text_proj_fused_matches_reference(lead, d, r, mode, backend, monkeypatch):
    """Without W_proj^vt: fused (Triton) and folded PyTorch against the reference, including the
    gradient of the guidance."""
    if backend == "auto" and DEV == "cpu":
        monkeypatch.setattr(fa.SGAdapterFunction, "apply", lambda *a: pytest.fail("the kernels must not run"))
    torch.manual_seed(d)
    ref = SGAdapter(d, r, alpha=0.3, text_proj=False)
    _randomise(ref, d)
    fused = SGAdapterFused(d, r, alpha=0.3, backend=backend, text_proj=False)
    fused.load_state_dict(ref.state_dict())
    ref, fused = ref.to(DEV), fused.to(DEV)
    x, g, mlp, up = (t.to(DEV) for t in _inputs(lead, d))
    kw = dict(mlp=mlp, scale=torch.tensor(0.6, device=DEV)) if mode == "block" else {}
    _assert_all_close(_run(fused, x, up, guidance=g, **kw), _run(ref, x, up, guidance=g, **kw))


# ----------------------------------------------------------------------------------------------
# Losses: compensated, plain LA, plain CE


COUNTS = [400, 90, 31, 7, 2]


def test_loss_log_priors():
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    assert LOSSES == ("compensated", "la", "ce")
    torch.testing.assert_close(loss_log_prior(COUNTS, "compensated", 0.5, 0.05), compensated_log_prior(COUNTS, 0.5, 0.05))
    torch.testing.assert_close(loss_log_prior(COUNTS, "la", 0.5, 0.05), counts.log().float())
    assert torch.equal(loss_log_prior(COUNTS, "ce"), torch.zeros(5))
    for kind in LOSSES:
        assert loss_log_prior(COUNTS, kind).dtype == torch.float32
    with pytest.raises(ValueError, match="loss must be one of"):
        loss_log_prior(COUNTS, "focal")
    with pytest.raises(ValueError, match="positive"):
        loss_log_prior([3, 0], "ce")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_la_and_ce_losses(backend):
    """la: cross-entropy of z + log n (tau = 1), the compensated loss at gamma = 0 (its constants
    cancel); ce: plain cross-entropy. Both on the reference and the fused kernel."""
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(9, 5, generator=gen) * 3).to(DEV)
    target = torch.randint(0, 5, (9,), generator=gen).to(DEV)
    log_n = torch.tensor(COUNTS, dtype=torch.float32, device=DEV).log()
    la = CompensatedLALoss(COUNTS, backend=backend, adjustment="la").to(DEV)
    ce = CompensatedLALoss(COUNTS, backend=backend, adjustment="ce").to(DEV)
    comp0 = CompensatedLALoss(COUNTS, gamma=0.0, backend=backend).to(DEV)
    assert la.adjustment == "la" and "adjustment='ce'" in repr(ce)
    torch.testing.assert_close(la(z, target), F.cross_entropy(z + log_n, target), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(la(z, target), comp0(z, target), rtol=1e-5, atol=1e-6)
    zg = z.clone().requires_grad_()
    ce(zg, target).backward()
    zr = z.clone().requires_grad_()
    want = F.cross_entropy(zr, target)
    want.backward()
    torch.testing.assert_close(ce(z, target), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zg.grad, zr.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        CompensatedLALoss(COUNTS, adjustment="balanced")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("adjustment", LOSSES)
def test_fit_loss_with_each_adjustment(adjustment, backend):
    """FIT combines with each loss: its four terms all use that loss's prior; loss and the
    gradients of z, zv, zt, s1, s2 against a direct statement."""
    gen = torch.Generator().manual_seed(6)
    z, zv, zt = ((torch.randn(7, 5, generator=gen) * 3).to(DEV).requires_grad_() for _ in range(3))
    target = torch.randint(0, 5, (7,), generator=gen).to(DEV)
    lambdas = (0.1, 0.2, 0.4)
    fit = FITLoss(COUNTS, mu=0.5, gamma=0.07, lambdas=lambdas, backend=backend, adjustment=adjustment).to(DEV)
    with torch.no_grad():
        fit.s1.fill_(0.3)
        fit.s2.fill_(-0.2)
    loss, z_hat = fit(z, zv, zt, target)
    loss.backward()
    got = [t.grad.clone() for t in (z, zv, zt, fit.s1, fit.s2)]
    prior = loss_log_prior(COUNTS, adjustment, 0.5, 0.07).to(DEV)
    s1 = torch.tensor(0.3, device=DEV, requires_grad=True)
    s2 = torch.tensor(-0.2, device=DEV, requires_grad=True)
    leaves = [t.detach().clone().requires_grad_() for t in (z, zv, zt)]
    a, b, c = leaves
    ce = lambda t: F.cross_entropy(t + prior, target)  # noqa: E731
    want = ce(a) + 0.1 * ce(b) + 0.2 * ce(c) + 0.4 * ce(a + s1 * b + s2 * c)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got, [t.grad for t in leaves] + [s1.grad, s2.grad]):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-4, atol=1e-6)
