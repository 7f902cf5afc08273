"""The reference compensated LA loss and FIT loss (Eq. 22 to 24)."""
import pytest
import torch
import torch.nn.functional as F

from sage_fast import CompensatedLALoss, FITLoss, compensated_la_loss, compensated_log_prior


def la_loss(logits, target, counts, tau):
    """Logit adjustment (Menon et al.) with temperature tau on the log prior."""
    prior = torch.as_tensor(counts, dtype=torch.float64)
    return F.cross_entropy(logits.double() + tau * (prior / prior.sum()).log(), target)


def test_equals_la_with_log_prior_scaled_by_one_plus_gamma():
    torch.manual_seed(0)
    counts = [500, 200, 77, 20, 5, 1]
    logits = torch.randn(32, 6) * 3
    target = torch.randint(0, 6, (32,))
    for gamma in (0.0, 0.05, 0.085, 0.5):
        got = compensated_la_loss(logits, target, counts, mu=0.5, gamma=gamma)
        torch.testing.assert_close(got.double(), la_loss(logits, target, counts, 1 + gamma), rtol=1e-5, atol=1e-6)


def test_does_not_change_with_mu():
    torch.manual_seed(1)
    counts = [300, 40, 9, 2]
    logits, target = torch.randn(16, 4), torch.randint(0, 4, (16,))
    base = compensated_la_loss(logits, target, counts, mu=0.5, gamma=0.06)
    for mu in (1e-3, 0.1, 1.0, 7.0):
        torch.testing.assert_close(compensated_la_loss(logits, target, counts, mu=mu, gamma=0.06), base)


def test_log_prior_is_papers_formula():
    counts = torch.tensor([10.0, 4.0, 2.0])
    mu, gamma = 0.5, 0.05
    lam = mu * counts ** gamma * counts.sum() / (3 * counts.min())
    torch.testing.assert_close(compensated_log_prior(counts, mu, gamma), (counts.log() + lam.log()).float())


def test_module_matches_function_and_ignores_padded_rows():
    torch.manual_seed(2)
    counts = [50, 20, 3]
    logits, target = torch.randn(10, 3), torch.randint(0, 3, (10,))
    module = CompensatedLALoss(counts, mu=0.5, gamma=0.05)
    torch.testing.assert_close(module(logits, target), compensated_la_loss(logits, target, counts))
    padded_target = target.clone()
    padded_target[7:] = -100
    torch.testing.assert_close(module(logits, padded_target), module(logits[:7], target[:7]))


def test_fit_loss_is_the_four_term_sum():
    torch.manual_seed(3)
    counts = [120, 60, 30, 8, 2]
    z, zv, zt = (torch.randn(12, 5) * 4 for _ in range(3))
    target = torch.randint(0, 5, (12,))
    lambdas = (0.015, 0.02, 0.4)
    fit = FITLoss(counts, mu=0.5, gamma=0.05, lambdas=lambdas)
    with torch.no_grad():
        fit.s1.fill_(0.3)
        fit.s2.fill_(-0.2)
    loss, z_hat = fit(z, zv, zt, target)
    l = lambda t: compensated_la_loss(t, target, counts, 0.5, 0.05)  # noqa: E731
    z_hat_want = z + 0.3 * zv - 0.2 * zt
    torch.testing.assert_close(z_hat, z_hat_want)
    want = l(z) + lambdas[0] * l(zv) + lambdas[1] * l(zt) + lambdas[2] * l(z_hat_want)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert fit.s1.grad is not None and fit.s1.grad.abs() > 0 and fit.s2.grad.abs() > 0


def test_fit_scalars_start_at_zero_so_z_hat_is_z():
    fit = FITLoss([5, 3, 1])
    z = torch.randn(4, 3)
    assert torch.equal(fit.combine(z, torch.randn(4, 3), torch.randn(4, 3)), z)


def test_gradcheck_float64():
    torch.manual_seed(4)
    counts = [40, 9, 3, 1]
    fit = FITLoss(counts, lambdas=(0.1, 0.2, 0.3)).double()
    with torch.no_grad():
        fit.s1.fill_(0.4)
        fit.s2.fill_(0.1)
    target = torch.tensor([0, 3, 1, 1, 2])
    inputs = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda z, zv, zt: fit(z, zv, zt, target)[0], inputs)
    assert torch.autograd.gradcheck(lambda z: compensated_la_loss(z, target, counts), inputs[:1])


@pytest.mark.parametrize("counts", [[3, 0, 1], [3, -2, 1], [], [1.0, float("nan")]])
def test_bad_class_counts(counts):
    with pytest.raises(ValueError, match="class counts|empty"):
        CompensatedLALoss(counts)


def test_bad_labels_and_logits():
    module = FITLoss([5, 3, 1])
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        module(z, z, z, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match=r"labels must lie"):
        module(z, z, z, torch.tensor([0, -1, 2, 0]))
    with pytest.raises(TypeError, match="integer"):
        module(z, z, z, torch.tensor([0.0, 1.0, 2.0, 0.0]))
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        module(bad, z, z, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"shape \(batch, 3\)"):
        module(torch.randn(4, 2), z, z, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="three numbers"):
        FITLoss([5, 3, 1], lambdas=(0.1, 0.2))
