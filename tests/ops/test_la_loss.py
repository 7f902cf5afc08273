"""The fused compensated LA / FIT loss (Triton) against the PyTorch reference in sage_fast.ops.reference.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in
fp32 and fp16; bf16 and the memory check need a GPU.
"""
import pytest
import torch
from torch.func import functional_call

import sage_fast.ops.backend as fused_loss_module
import sage_fast.ops.launch as launch
import sage_fast.ops.modules as losses_module
from sage_fast.ops.backend import resolve_backend
from sage_fast.ops.la_loss import fused_fit_loss, fused_la_loss
from sage_fast import CompensatedLALoss, FITLoss, compensated_la_loss, compensated_log_prior

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAMBDAS = (0.015, 0.02, 0.4)
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-2, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=1e-5),
}


def make_counts(num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Long-tailed: a few heads with hundreds, many tails with a handful.
    return (500 * torch.rand(num_classes, generator=g) ** 4).floor() + 1


def make_logits(batch, num_classes, dtype, seed, scale=4.0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(batch, num_classes, generator=g)).to(DEVICE, dtype).requires_grad_() for _ in range(n)]


def make_target(batch, num_classes, seed, ignore_index=-100, n_ignored=None):
    g = torch.Generator().manual_seed(seed + 1000)
    target = torch.randint(0, num_classes, (batch,), generator=g)
    if n_ignored is None:
        n_ignored = batch // 5
    target[torch.randperm(batch, generator=g)[:n_ignored]] = ignore_index
    return target.to(DEVICE)


def reference_fit(z, zv, zt, target, counts, s1, s2, lambdas=LAMBDAS, ignore_index=-100):
    """(loss, z_hat, [dz, dzv, dzt, ds1, ds2]) from FITLoss(backend='torch')."""
    ref = FITLoss(counts, lambdas=lambdas, ignore_index=ignore_index, backend="torch").to(DEVICE)
    with torch.no_grad():
        ref.s1.fill_(s1)
        ref.s2.fill_(s2)
    loss, z_hat = ref(z, zv, zt, target)
    grads = torch.autograd.grad(loss, [z, zv, zt, ref.s1, ref.s2])
    return loss.detach(), z_hat.detach(), list(grads), ref.log_prior


def fused_fit(z, zv, zt, target, log_prior, s1, s2, lambdas=LAMBDAS, ignore_index=-100):
    s1 = torch.tensor(float(s1), device=DEVICE, requires_grad=True)
    s2 = torch.tensor(float(s2), device=DEVICE, requires_grad=True)
    loss, z_hat = fused_fit_loss(z, zv, zt, target, log_prior, s1, s2, lambdas, ignore_index)
    grads = torch.autograd.grad(loss, [z, zv, zt, s1, s2])
    return loss.detach(), z_hat.detach(), list(grads)


def assert_grads_close(got, want, dtype):
    for name, g, w in zip(("dz", "dzv", "dzt", "ds1", "ds2"), got, want):
        assert g.dtype == w.dtype, name
        tol = TOL[dtype] if name.startswith("dz") else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


def force_loss_tile(monkeypatch, tile):
    """Launch the loss kernel with tile = (block_b, block_c) instead of the launch heuristic's choice
    (None: keep it): small tiles run several class chunks (the online log-sum-exp) and partial row
    tiles at a C small enough for the interpreter."""
    if tile is None:
        return
    block_b, block_c = tile
    forced = launch.LossLaunch(block_b=block_b, block_c=block_c, num_warps=launch.loss_num_warps(block_b, block_c))
    monkeypatch.setattr(launch, "loss_launch", lambda batch, num_classes: forced)


# (batch, C, tile): the batch sizes 1..300 with small C; C up to iNaturalist's 8142 and past
# 10,000; forced tiles (block_b, block_c) so that several chunks and a partial row tile run.
CASES = [
    (1, 1, None),
    (17, 3, None),
    (300, 3, None),
    (300, 100, (64, 32)),
    (9, 100, None),
    (5, 1000, None),
    (7, 1000, (2, 128)),
    (2, 8142, None),
    (3, 8142, (1, 2048)),
    (2, 10007, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,num_classes,tile", CASES)
def test_fit_loss_and_gradients_match_reference(batch, num_classes, tile, dtype, monkeypatch):
    counts = make_counts(num_classes)
    z, zv, zt = make_logits(batch, num_classes, dtype, seed=batch + num_classes)
    target = make_target(batch, num_classes, seed=batch)
    s1, s2 = 0.3, -0.45
    want_loss, want_zhat, want_grads, log_prior = reference_fit(z, zv, zt, target, counts, s1, s2)
    force_loss_tile(monkeypatch, tile)
    loss, z_hat, grads = fused_fit(z, zv, zt, target, log_prior, s1, s2)
    assert loss.dtype == torch.float32 and z_hat.dtype == dtype
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_hat, want_zhat, **TOL[dtype])
    assert_grads_close(grads, want_grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,num_classes,tile", CASES)
def test_la_loss_and_gradient_match_reference(batch, num_classes, tile, dtype, monkeypatch):
    counts = make_counts(num_classes, seed=1)
    (logits,) = make_logits(batch, num_classes, dtype, seed=7 * batch + num_classes, n=1)
    target = make_target(batch, num_classes, seed=batch + 1)
    want = compensated_la_loss(logits, target, counts, mu=0.5, gamma=0.085)
    (want_grad,) = torch.autograd.grad(want, [logits])
    force_loss_tile(monkeypatch, tile)
    got = fused_la_loss(logits, target, compensated_log_prior(counts, 0.5, 0.085))
    (grad,) = torch.autograd.grad(got, [logits])
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, want_grad, **TOL[dtype])


def test_fit_with_zero_lambdas_and_s_is_the_single_loss():
    """The single-loss case is the same math: FIT with lambdas and s at 0 gives the LA loss and grad."""
    counts = make_counts(50)
    z, zv, zt = make_logits(11, 50, torch.float32, seed=3)
    target = make_target(11, 50, seed=3)
    log_prior = compensated_log_prior(counts)
    loss, _, grads = fused_fit(z, zv, zt, target, log_prior, 0.0, 0.0, lambdas=(0.0, 0.0, 0.0))
    la = fused_la_loss(z, target, log_prior)
    (la_grad,) = torch.autograd.grad(la, [z])
    torch.testing.assert_close(loss, la.detach())
    torch.testing.assert_close(grads[0], la_grad)
    assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_classes,tile", [(3, None), (1000, (8, 256))])
def test_extreme_logits_do_not_overflow(num_classes, tile, dtype, monkeypatch):
    batch = 6
    counts = make_counts(num_classes, seed=4)
    g = torch.Generator().manual_seed(5)
    sign = torch.where(torch.rand(3, batch, num_classes, generator=g) < 0.5, -1.0, 1.0)
    z, zv, zt = (
        (1e4 * s + torch.randn(batch, num_classes, generator=g)).to(DEVICE, dtype).requires_grad_() for s in sign
    )
    with torch.no_grad():  # a row at -1e4 everywhere: its log-sum-exp is ~ -1e4 itself
        for t in (z, zv, zt):
            t[2] = -1e4
    target = make_target(batch, num_classes, seed=5, n_ignored=1)
    target[2] = 0
    want_loss, want_zhat, want_grads, log_prior = reference_fit(z, zv, zt, target, counts, 0.5, -0.5)
    force_loss_tile(monkeypatch, tile)
    loss, z_hat, grads = fused_fit(z, zv, zt, target, log_prior, 0.5, -0.5)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(z_hat, want_zhat, **TOL[dtype])
    assert_grads_close(grads, want_grads, dtype)


def test_custom_ignore_index_inside_the_class_range():
    counts = make_counts(5)
    z, zv, zt = make_logits(20, 5, torch.float32, seed=6)
    target = make_target(20, 5, seed=6, ignore_index=2, n_ignored=4)
    want_loss, _, want_grads, log_prior = reference_fit(z, zv, zt, target, counts, 0.1, 0.2, ignore_index=2)
    loss, _, grads = fused_fit(z, zv, zt, target, log_prior, 0.1, 0.2, ignore_index=2)
    torch.testing.assert_close(loss, want_loss)
    assert_grads_close(grads, want_grads, torch.float32)


def test_all_rows_ignored_gives_nan_loss_and_zero_gradients_like_the_reference():
    counts = make_counts(7)
    z, zv, zt = make_logits(4, 7, torch.float32, seed=8)
    target = torch.full((4,), -100, device=DEVICE)
    want_loss, _, want_grads, log_prior = reference_fit(z, zv, zt, target, counts, 0.3, 0.3)
    loss, _, grads = fused_fit(z, zv, zt, target, log_prior, 0.3, 0.3)
    assert torch.isnan(want_loss) and torch.isnan(loss)
    for g, w in zip(grads, want_grads):
        assert not g.any() and not w.any()
    la = fused_la_loss(z, target, log_prior)
    assert torch.isnan(la)
    (la_grad,) = torch.autograd.grad(la, [z])
    assert not la_grad.any()


def test_strided_inputs_and_grad_output_scaling():
    counts = make_counts(40)
    base = torch.randn(8, 100, device=DEVICE)
    z = base[:, 10:50].clone().requires_grad_()
    zv_store = torch.randn(8, 64, device=DEVICE, requires_grad=True)
    zv = zv_store[:, :40]  # row stride 64
    zt_store = torch.randn(40, 8, device=DEVICE, requires_grad=True)
    zt = zt_store.t()  # column stride 8: copied to contiguous
    target = make_target(8, 40, seed=9)
    log_prior = compensated_log_prior(counts)
    s1 = torch.tensor(0.2, device=DEVICE, requires_grad=True)
    s2 = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    loss, _ = fused_fit_loss(z, zv, zt, target, log_prior, s1, s2, LAMBDAS)
    got = torch.autograd.grad(-3.0 * loss, [z, zv_store, zt_store, s1, s2])
    ref = FITLoss(counts, lambdas=LAMBDAS, backend="torch").to(DEVICE)
    with torch.no_grad():
        ref.s1.fill_(0.2)
        ref.s2.fill_(0.7)
    want_loss, _ = ref(z, zv, zt, target)
    want = torch.autograd.grad(-3.0 * want_loss, [z, zv_store, zt_store, ref.s1, ref.s2])
    torch.testing.assert_close(loss.detach(), want_loss.detach())
    assert_grads_close(got, want, torch.float32)


def test_z_hat_is_differentiable():
    """A gradient that enters through z^ (e.g. another loss on it) reaches z, zv, zt, s1, s2."""
    counts = make_counts(30)
    z, zv, zt = make_logits(6, 30, torch.float32, seed=10)
    target = make_target(6, 30, seed=10)
    weight = torch.randn(6, 30, device=DEVICE)
    ref = FITLoss(counts, lambdas=LAMBDAS, backend="torch").to(DEVICE)
    fused = FITLoss(counts, lambdas=LAMBDAS, backend="triton").to(DEVICE)
    results = []
    for module in (ref, fused):
        with torch.no_grad():
            module.s1.fill_(-0.25)
            module.s2.fill_(0.6)
        loss, z_hat = module(z, zv, zt, target)
        results.append(torch.autograd.grad(loss + (weight * z_hat).sum(), [z, zv, zt, module.s1, module.s2]))
    assert_grads_close(results[1], results[0], torch.float32)


def test_only_z_hat_used_gives_its_gradient():
    counts = make_counts(10)
    z, zv, zt = make_logits(3, 10, torch.float32, seed=11)
    target = make_target(3, 10, seed=11, n_ignored=0)
    s1 = torch.tensor(0.5, device=DEVICE, requires_grad=True)
    s2 = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    _, z_hat = fused_fit_loss(z, zv, zt, target, compensated_log_prior(counts), s1, s2, LAMBDAS)
    dz, dzv, dzt, ds1, ds2 = torch.autograd.grad(z_hat.sum(), [z, zv, zt, s1, s2])
    torch.testing.assert_close(dz, torch.ones_like(dz))
    torch.testing.assert_close(dzv, torch.full_like(dzv, 0.5))
    torch.testing.assert_close(dzt, torch.full_like(dzt, 2.0))
    torch.testing.assert_close(ds1, zv.detach().sum())
    torch.testing.assert_close(ds2, zt.detach().sum())


def test_partial_requires_grad_and_no_grad():
    """Only the inputs that need a gradient get one; under no_grad the loss is the same."""
    counts = make_counts(25)
    z, zv, zt = make_logits(5, 25, torch.float32, seed=12)
    target = make_target(5, 25, seed=12)
    want_loss, want_zhat, want_grads, log_prior = reference_fit(z, zv, zt, target, counts, 0.4, 0.1)
    zv = zv.detach()  # W f_zs with W and f_zs frozen: no gradient wanted
    s1 = torch.tensor(0.4, device=DEVICE)  # not learnable here
    s2 = torch.tensor(0.1, device=DEVICE, requires_grad=True)
    loss, _ = fused_fit_loss(z, zv, zt, target, log_prior, s1, s2, LAMBDAS)
    dz, dzt, ds2 = torch.autograd.grad(loss, [z, zt, s2])
    torch.testing.assert_close(loss.detach(), want_loss)
    for got, want in ((dz, want_grads[0]), (dzt, want_grads[2]), (ds2, want_grads[4])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss_ng, z_hat_ng = fused_fit_loss(z, zv, zt, target, log_prior, s1, s2, LAMBDAS)
    assert loss_ng.grad_fn is None and z_hat_ng.grad_fn is None
    torch.testing.assert_close(loss_ng, want_loss)
    torch.testing.assert_close(z_hat_ng, want_zhat)


def test_second_backward_is_a_clear_error():
    counts = make_counts(4)
    (logits,) = make_logits(3, 4, torch.float32, seed=13, n=1)
    loss = fused_la_loss(logits, make_target(3, 4, seed=13, n_ignored=0), compensated_log_prior(counts))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# --- the modules' backend keyword ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_modules_agree_across_backends(backend):
    counts = make_counts(64)
    z, zv, zt = make_logits(12, 64, torch.float32, seed=14)
    target = make_target(12, 64, seed=14)
    results = {}
    for name in ("torch", backend):
        la = CompensatedLALoss(counts, gamma=0.06, backend=name).to(DEVICE)
        fit = FITLoss(counts, gamma=0.06, lambdas=LAMBDAS, backend=name).to(DEVICE)
        with torch.no_grad():
            fit.s1.fill_(0.35)
            fit.s2.fill_(-0.2)
        la_loss = la(z, target)
        fit_loss, z_hat = fit(z, zv, zt, target)
        results[name] = (
            la_loss.detach(),
            torch.autograd.grad(la_loss, [z])[0],
            fit_loss.detach(),
            z_hat.detach(),
            torch.autograd.grad(fit_loss, [z, zv, zt, fit.s1, fit.s2]),
        )
    want, got = results["torch"], results[backend]
    for w, g in zip(want[:4], got[:4]):
        torch.testing.assert_close(g, w)
    assert_grads_close(got[4], want[4], torch.float32)


def test_auto_takes_the_kernel_on_cuda_only(monkeypatch):
    """"auto": the kernel on CUDA for fp16 / bf16 / fp32, never the CPU interpreter; "triton" forces it."""
    calls = []
    real = losses_module.fused_la_loss
    monkeypatch.setattr(losses_module, "fused_la_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = make_counts(6)
    module = CompensatedLALoss(counts)
    (logits,) = make_logits(4, 6, torch.float32, seed=15, n=1)
    target = make_target(4, 6, seed=15)
    want = module(logits, target)
    assert calls == []  # CPU: the reference, although the interpreter is on (conftest)
    module.backend = "triton"
    torch.testing.assert_close(module(logits, target), want, rtol=1e-5, atol=1e-6)
    assert calls == [1]
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setattr(fused_loss_module, "triton_unavailable_reason", lambda device: None)
    assert resolve_backend("auto", "cuda", torch.bfloat16) == "triton"
    assert resolve_backend("auto", "cuda", torch.float64) == "torch"  # the kernel would compute in fp32
    monkeypatch.setattr(fused_loss_module, "triton_unavailable_reason", lambda device: "no Triton device (test)")
    assert resolve_backend("auto", "cuda", torch.float32) == "torch"


def test_backend_triton_where_triton_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fused_loss_module, "triton_unavailable_reason", lambda device: "no Triton device (test)")
    counts = make_counts(6)
    z, zv, zt = make_logits(4, 6, torch.float32, seed=16)
    target = make_target(4, 6, seed=16)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: no Triton device"):
        CompensatedLALoss(counts, backend="triton")(z, target)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        FITLoss(counts, backend="triton")(z, zv, zt, target)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        fused_la_loss(z, target, compensated_log_prior(counts))
    with pytest.raises(ValueError, match="backend must be one of"):
        FITLoss(counts, backend="cuda")


def test_cpu_without_interpreter_is_reported():
    if DEVICE != "cpu":
        pytest.skip("CPU-only behaviour")
    assert fused_loss_module.triton_unavailable_reason("cpu") is None  # conftest set TRITON_INTERPRET=1
    assert "Triton does not run" in fused_loss_module.triton_unavailable_reason("meta")


# --- invalid input: clear errors, never a silent wrong loss -------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad_label", [-1, 6, 1000])
def test_labels_out_of_range(backend, bad_label):
    counts = make_counts(6)
    z, zv, zt = make_logits(5, 6, torch.float32, seed=17)
    target = make_target(5, 6, seed=17, n_ignored=1)
    target[3] = bad_label
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        CompensatedLALoss(counts, backend=backend)(z, target)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        FITLoss(counts, backend=backend)(z, zv, zt, target)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes on the bad values
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_finite_logits(backend, bad, which):
    counts = make_counts(300)
    logits = [t.detach().clone() for t in make_logits(3, 300, torch.float16, seed=18)]
    logits[which][2, 257] = bad
    target = make_target(3, 300, seed=18, n_ignored=0)
    name = ("z", "zv", "zt")[which]
    with pytest.raises(ValueError, match=f"^{name} contains NaN or Inf"):
        FITLoss(counts, backend=backend)(*logits, target)
    if which == 0:
        with pytest.raises(ValueError, match="logits contains NaN or Inf"):
            CompensatedLALoss(counts, backend=backend)(logits[0], target)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes on the bad values
def test_non_finite_in_an_ignored_row_is_still_an_error():
    counts = make_counts(5)
    (logits,) = make_logits(4, 5, torch.float32, seed=19, n=1)
    logits = logits.detach().clone()
    logits[1, 0] = float("nan")
    target = torch.tensor([0, -100, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="logits contains NaN or Inf"):
        fused_la_loss(logits, target, compensated_log_prior(counts))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computes on the bad values
def test_non_finite_s_or_log_prior():
    counts = make_counts(5)
    z, zv, zt = make_logits(4, 5, torch.float32, seed=20)
    target = make_target(4, 5, seed=20)
    log_prior = compensated_log_prior(counts)
    with pytest.raises(ValueError, match="z\\^ = z \\+ s1 \\* zv \\+ s2 \\* zt is not finite"):
        fused_fit_loss(z, zv, zt, target, log_prior, float("nan"), 0.0, LAMBDAS)
    bad_prior = log_prior.clone()
    bad_prior[2] = float("inf")
    with pytest.raises(ValueError, match="log_prior contains NaN or Inf"):
        fused_la_loss(z, target, bad_prior)


@pytest.mark.parametrize("counts", [[10, 0, 3], [10, -2, 3], [5, float("nan"), 1], []])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_class_counts(counts, backend):
    with pytest.raises(ValueError, match="class counts must be positive|class_counts is empty"):
        CompensatedLALoss(counts, backend=backend)
    with pytest.raises(ValueError, match="class counts must be positive|class_counts is empty"):
        FITLoss(counts, backend=backend)


def test_bad_shapes_and_dtypes():
    counts = make_counts(5)
    log_prior = compensated_log_prior(counts)
    z, zv, zt = make_logits(4, 5, torch.float32, seed=21)
    target = make_target(4, 5, seed=21)
    with pytest.raises(ValueError, match=r"zv must have shape \(batch, 5\)"):
        fused_fit_loss(z, zv[:, :4], zt, target, log_prior, 0.0, 0.0, LAMBDAS)
    with pytest.raises(ValueError, match="z, zv, zt must have the same shape"):
        fused_fit_loss(z, zv[:3], zt, target, log_prior, 0.0, 0.0, LAMBDAS)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        fused_la_loss(z, target[:3], log_prior)
    with pytest.raises(TypeError, match="integer class indices"):
        fused_la_loss(z, target.float(), log_prior)
    with pytest.raises(TypeError, match="floating-point"):
        fused_la_loss(z.detach().long(), target, log_prior)
    with pytest.raises(ValueError, match="lambdas must hold three numbers"):
        fused_fit_loss(z, zv, zt, target, log_prior, 0.0, 0.0, (0.1, 0.2))


# --- the reference itself: gradcheck in float64 --------------------------------------------------


def test_gradcheck_reference_compensated_la_loss():
    counts = [40, 9, 3, 1, 17]
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 1, 3, 2])
    assert torch.autograd.gradcheck(lambda x: compensated_la_loss(x, target, counts, gamma=0.085), (logits,))


def test_gradcheck_reference_fit_loss():
    counts = [40, 9, 3, 1]
    module = FITLoss(counts, lambdas=(0.3, 0.2, 0.5), backend="torch").double()
    target = torch.tensor([0, 3, -100, 1, 2])
    inputs = tuple(torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)) + (
        torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
        torch.tensor(-0.6, dtype=torch.float64, requires_grad=True),
    )

    def loss(z, zv, zt, s1, s2):
        return functional_call(module, {"s1": s1, "s2": s2}, (z, zv, zt, target))[0]

    assert torch.autograd.gradcheck(loss, inputs)


# --- GPU: bf16 parity and memory -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("batch,num_classes", [(512, 8142), (300, 100), (1, 1), (33, 1000)])
def test_gpu_parity(batch, num_classes, dtype):
    counts = make_counts(num_classes)
    z, zv, zt = make_logits(batch, num_classes, dtype, seed=22)
    target = make_target(batch, num_classes, seed=22)
    want_loss, want_zhat, want_grads, log_prior = reference_fit(z, zv, zt, target, counts, 0.3, -0.45)
    loss, z_hat, grads = fused_fit(z, zv, zt, target, log_prior, 0.3, -0.45)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_hat, want_zhat, **TOL[dtype])
    assert_grads_close(grads, want_grads, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_extra_memory_is_at_most_one_fp32_buffer():
    """Beyond the three gradients autograd hands on and the returned z^: <= one (B, C) fp32 buffer."""
    batch, num_classes, dtype = 512, 8142, torch.bfloat16
    counts = make_counts(num_classes)
    module = FITLoss(counts, lambdas=LAMBDAS, backend="triton").cuda()
    z, zv, zt = make_logits(batch, num_classes, dtype, seed=23)
    target = make_target(batch, num_classes, seed=23)
    module(z, zv, zt, target)[0].backward()  # compile outside the measurement
    for t in (z, zv, zt):
        t.grad = None
    module.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, z_hat = module(z, zv, zt, target)
    loss.backward()
    torch.cuda.synchronize()
    unit = batch * num_classes * z.element_size()
    extra = torch.cuda.max_memory_allocated() - base - 3 * unit - z_hat.numel() * z_hat.element_size()
    assert extra <= batch * num_classes * 4, extra
