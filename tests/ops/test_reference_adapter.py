"""The reference SG-Adapter against an independent re-statement of Eq. 7 and 8."""
import math

import pytest
import torch

from helpers.adapters import randomise_adapter
from sage_fast.ops.reference import SGAdapter, lift_bottleneck


def eq7_eq8(x, g, p, alpha, eps):
    """Eq. 7 and 8 written from docs/method.md with raw tensors, in float64 (weights as x @ W: d_in x d_out)."""
    def ln(t):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + eps) * p["gamma"] + p["beta"]

    fv = ln(x)
    ft = ln(g)
    fvt = (ft @ p["W_proj"] + p["b_proj"]) * fv
    h = torch.cat([fv @ p["W_dv"] + p["b_dv"],
                   fvt @ p["W_dvt"] + p["b_dvt"] + p["s_vt"] * (ft @ p["W_dt"] + p["b_dt"])], dim=-1)
    return alpha * torch.relu(h) @ p["W_up"] + (1 - alpha) * h @ p["W_up"] + p["b_up"]


def raw_params(adapter):
    a = adapter.double()
    return {
        "gamma": a.ln.weight, "beta": a.ln.bias,
        "W_proj": a.proj.weight.t(), "b_proj": a.proj.bias,
        "W_dv": a.down_v.weight.t(), "b_dv": a.down_v.bias,
        "W_dvt": a.down_vt.weight.t(), "b_dvt": a.down_vt.bias,
        "W_dt": a.down_t.weight.t(), "b_dt": a.down_t.bias,
        "W_up": a.up.weight.t(), "b_up": a.up.bias, "s_vt": a.s_vt,
    }


@pytest.mark.parametrize("dim,r,alpha", [(16, 1, 0.1), (48, 4, 0.8), (64, 7, 1.0), (32, 3, 0.0)])
@pytest.mark.parametrize("lead", [(5,), (2, 7), (1, 1, 3)])
def test_matches_equations(dim, r, alpha, lead):
    torch.manual_seed(dim + r)
    adapter = SGAdapter(dim, r, alpha=alpha).double()
    randomise_adapter(adapter, seed=dim)
    x = torch.randn(*lead, dim, dtype=torch.float64) * 2 + 0.5
    g = torch.randn(dim, dtype=torch.float64)
    got = adapter(x, g)
    want = eq7_eq8(x, g, raw_params(adapter), alpha, adapter.eps)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fresh_adapter_outputs_zero_and_has_paper_parameter_count():
    dim, r = 40, 5
    adapter = SGAdapter(dim, r)
    out = adapter(torch.randn(3, 9, dim), torch.randn(dim))
    assert torch.count_nonzero(out) == 0
    # (5r + d + 4)d + 3r + 2 includes s_vt and the block's scale s, which lives in the model.
    assert sum(p.numel() for p in adapter.parameters()) == (5 * r + dim + 4) * dim + 3 * r + 2 - 1
    assert {n for n, _ in adapter.named_children()} == {"ln", "proj", "down_v", "down_vt", "down_t", "up"}
    for lin in (adapter.down_v, adapter.down_vt, adapter.down_t):
        assert torch.count_nonzero(lin.bias) == 0 and lin.weight.std() > 0


def test_forward_block_is_residual_plus_mlp_plus_scaled_adapter():
    dim = 24
    adapter = SGAdapter(dim, 2)
    randomise_adapter(adapter, seed=3)
    x, mlp, g = torch.randn(4, dim), torch.randn(4, dim), torch.randn(dim)
    s = torch.tensor(0.7)
    torch.testing.assert_close(adapter.forward_block(x, g, mlp, s), x + mlp + 0.7 * adapter(x, g))


def test_bad_inputs_raise_clear_errors():
    adapter = SGAdapter(16, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\)"):
        adapter(torch.randn(3, 15), torch.randn(16))
    with pytest.raises(ValueError, match="guidance must have shape"):
        adapter(torch.randn(3, 16), torch.randn(2, 16))
    with pytest.raises(TypeError, match="floating-point"):
        adapter(torch.ones(3, 16, dtype=torch.int64), torch.randn(16))
    with pytest.raises(ValueError, match="alpha"):
        SGAdapter(16, 2, alpha=1.5)
    with pytest.raises(ValueError, match="positive"):
        SGAdapter(16, 0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="same device"):
            adapter(torch.randn(3, 16), torch.randn(16, device="cuda"))


@pytest.mark.parametrize("classes,r", [(100, 4), (365, 8), (1000, 32), (8142, 256), (10, 1), (1, 1)])
def test_lift_bottleneck_rule(classes, r):
    assert lift_bottleneck(classes, 12) == r
    assert r == max(1, 2 ** math.floor(math.log2(classes / 24))) if classes >= 48 else r == 1
