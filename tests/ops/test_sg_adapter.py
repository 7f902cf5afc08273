"""SGAdapterFused against the reference SGAdapter.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py), so sizes stay small:
a few hundred rows, d mostly under 100, d = 768 and 1024 with a few rows. With a GPU the same
parity tests run on CUDA (DEV), and bf16 ones run at ViT-B/16 shapes.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.adapters import random_adapter_pair
from sage_fast.ops import backend as _triton_runtime
from sage_fast.ops import sg_adapter as fa
from sage_fast.ops.reference import SGAdapter
from sage_fast import SGAdapterFused, fold_adapter_weights

# (leading shape, d, r): awkward token counts (1, 3 x 197, 257), r from 1 to 256, one wide d.
CASES = [
    ((1, 1), 32, 1),
    ((3, 197), 48, 4),
    ((257,), 40, 7),
    ((2, 33), 96, 32),
    ((70,), 64, 256),
    ((5,), 768, 4),
    ((3,), 1024, 256),
]
TOL = {torch.float32: 2e-5, torch.float16: 1e-2}
# Where the Triton path runs: CUDA if present, else CPU under the interpreter.
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(module, x, guidance, mlp=None, scale=None, upstream=None):
    """Forward and backward with a fixed random upstream gradient; returns output and all grads."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    guidance = guidance.detach().clone().requires_grad_()
    leaves = {"x": x, "guidance": guidance}
    if mlp is None:
        out = module(x, guidance)
    else:
        mlp = mlp.detach().clone().requires_grad_()
        scale = scale.detach().clone().requires_grad_()
        leaves.update(mlp_out=mlp, scale=scale)
        out = module.forward_block(x, guidance, mlp, scale)
    out.backward(upstream.to(out.dtype))
    grads = {k: v.grad for k, v in leaves.items()}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return out, grads


def _assert_close(name, got, want, tol, norm=False, atol=1e-6):
    """Max error within tol * max |want|; with norm=True, the relative Frobenius error instead.

    Low-precision cases use norm=True: when rounding moves a pre-activation h across 0 the leaky
    slope of that one unit changes, a legitimate but local jump that a max-norm test would flag.
    """
    assert got is not None and want is not None, f"{name}: missing gradient"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    got, want = got.double(), want.double()
    if not want.numel():
        return
    if norm:
        err, scale = (got - want).norm().item(), want.norm().item()
    else:
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
    kind = "norm" if norm else "max"
    assert err <= tol * scale + atol, f"{name}: {kind} error {err:.3e} vs {kind} of ref {scale:.3e} (tol {tol})"


def _inputs(lead, d, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, d, generator=gen) * 1.5 + 0.3).to(dtype)
    guidance = torch.randn(d, generator=gen)
    mlp = torch.randn(*lead, d, generator=gen)
    upstream = torch.randn(*lead, d, generator=gen)
    return x, guidance, mlp, upstream


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["adapter", "block"])
@pytest.mark.parametrize("lead,d,r", CASES, ids=[f"{'x'.join(map(str, c[0]))}-d{c[1]}-r{c[2]}" for c in CASES])
def test_matches_reference(lead, d, r, mode, dtype):
    """Output and the gradients of x, guidance, every parameter (and mlp_out, s) match SGAdapter.

    The reference runs in fp32 on the same (already rounded) inputs: for fp16 this measures the
    fused path's own rounding, which must stay at fp16 level.
    """
    ref, fused = (m.to(DEV) for m in random_adapter_pair(d, r, seed=d + r))
    x, g, mlp, up = (t.to(DEV) for t in _inputs(lead, d, dtype))
    kw = {}
    if mode == "block":
        # mlp_out in another dtype than x for fp16: the kernel reads it as is.
        kw = dict(mlp=mlp, scale=torch.tensor(0.7, device=DEV))
    out_f, grads_f = _run(fused, x, g, upstream=up, **kw)
    out_r, grads_r = _run(ref, x.float(), g, upstream=up, **kw)
    assert out_f.dtype == dtype
    tol, norm = TOL[dtype], dtype != torch.float32
    _assert_close("out", out_f, out_r, tol, norm)
    assert set(grads_f) == set(grads_r)
    for name in grads_r:
        _assert_close(f"grad {name}", grads_f[name], grads_r[name], tol, norm)
    assert grads_f["x"].dtype == dtype
    if mode == "block":
        assert grads_f["mlp_out"].dtype == mlp.dtype


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    rows=st.integers(1, 150),
    d=st.integers(3, 80),
    r=st.integers(1, 40),
    alpha=st.sampled_from([0.0, 0.1, 0.8, 1.0]),
    block=st.booleans(),
)
def test_random_sizes_fp32(rows, d, r, alpha, block):
    """Random widths (d not a power of two), token counts and alphas (1.0 = ReLU)."""
    ref, fused = (m.to(DEV) for m in random_adapter_pair(d, r, alpha=alpha, seed=rows))
    x, g, mlp, up = (t.to(DEV) for t in _inputs((rows,), d, torch.float32, seed=d))
    kw = dict(mlp=mlp, scale=torch.tensor(1.3, device=DEV)) if block else {}
    out_f, grads_f = _run(fused, x, g, upstream=up, **kw)
    out_r, grads_r = _run(ref, x, g, upstream=up, **kw)
    # atol: at tiny d some gradients (e.g. the guidance's through LN_a) are rounding noise in both.
    _assert_close("out", out_f, out_r, 1e-4, atol=1e-5)
    for name in grads_r:
        _assert_close(f"grad {name}", grads_f[name], grads_r[name], 1e-4, atol=1e-5)


def test_half_module():
    """A module cast to fp16 as a whole (fp16 parameters): fold in fp32, grads back in fp16."""
    ref, fused = random_adapter_pair(32, 4)
    fused = fused.half()
    ref.load_state_dict({k: v.half().float() for k, v in ref.state_dict().items()})
    x, g, mlp, up = _inputs((3, 30), 32, torch.float16)
    kw = dict(mlp=mlp.half(), scale=torch.tensor(0.9))
    out_f, grads_f = _run(fused, x, g.half(), upstream=up, **kw)
    out_r, grads_r = _run(ref, x.float(), g.half().float(), upstream=up, **kw)
    assert fused.proj.weight.grad.dtype == torch.float16
    _assert_close("out", out_f, out_r, 1e-2, norm=True)
    for name in grads_r:
        _assert_close(f"grad {name}", grads_f[name], grads_r[name], 1e-2, norm=True)


def test_fresh_adapter_outputs_zero():
    """LIFT's init (up = 0) gives a = 0: the block is then x + mlp_out exactly."""
    d, r = 32, 4
    fused = SGAdapterFused(d, r)
    x, g, mlp, _ = _inputs((2, 9), d, torch.float32)
    assert torch.equal(fused(x, g), torch.zeros_like(x))
    torch.testing.assert_close(fused.forward_block(x, g, mlp, torch.tensor(2.0)), x + mlp, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["adapter", "block"])
def test_auto_on_cpu_is_the_folded_path_and_matches_reference(mode, dtype, monkeypatch):
    """backend="auto" off CUDA: the folded PyTorch form (no kernel, even with the interpreter on)."""
    def no_kernels(*args, **kwargs):
        raise AssertionError("the Triton path must not run")

    monkeypatch.setattr(fa.SGAdapterFunction, "apply", no_kernels)
    lead, d, r = (3, 17), 24, 5
    ref, fused = random_adapter_pair(d, r, backend="auto")
    x, g, mlp, up = _inputs(lead, d, dtype)
    kw = dict(mlp=mlp.to(dtype), scale=torch.tensor(-0.4, dtype=dtype)) if mode == "block" else {}
    out_f, grads_f = _run(fused, x, g.to(dtype), upstream=up, **kw)
    out_r, grads_r = _run(ref.to(dtype), x, g.to(dtype), upstream=up, **kw)
    # fp64 too is fp32-accurate: the fold computes its weights in fp32
    _assert_close("out", out_f, out_r, 1e-5)
    for name in grads_r:
        _assert_close(f"grad {name}", grads_f[name], grads_r[name], 1e-5)


@pytest.mark.parametrize("mode", ["adapter", "block"])
def test_torch_backend_is_the_literal_reference(mode, monkeypatch):
    """backend="torch" runs SGAdapter's own forward: bit-identical to the reference, no fold."""
    import sage_fast.ops.modules as modules

    monkeypatch.setattr(modules, "fold_adapter_weights", lambda *a: pytest.fail("the fold must not run"))
    ref, fused = random_adapter_pair(24, 5, backend="torch")
    x, g, mlp, _ = _inputs((3, 17), 24, torch.float32)
    with torch.no_grad():
        if mode == "block":
            s = torch.tensor(-0.4)
            assert torch.equal(fused.forward_block(x, g, mlp, s), ref.forward_block(x, g, mlp, s))
        else:
            assert torch.equal(fused(x, g), ref(x, g))


def test_fold_reproduces_reference_hidden_layer():
    """h = LN(x, no affine) @ W_cat + b_cat equals the reference's concatenated down-projections."""
    d, r = 20, 3
    ref, _ = random_adapter_pair(d, r)
    x, g, _, _ = _inputs((7,), d, torch.float64)
    ref = ref.double()
    fv = ref.ln(x)
    ft = ref.ln(g.double())
    h_ref = torch.cat([ref.down_v(fv), ref.down_vt(ref.proj(ft) * fv) + ref.s_vt * ref.down_t(ft)], -1)
    w_cat, b_cat = fold_adapter_weights(ref, g.double())
    assert w_cat.shape == (d, 2 * r) and b_cat.shape == (2 * r,) and w_cat.dtype == torch.float32
    xhat = torch.nn.functional.layer_norm(x, (d,), eps=ref.eps)
    torch.testing.assert_close(xhat @ w_cat.double() + b_cat.double(), h_ref, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_both_ways():
    ref, fused = random_adapter_pair(16, 2)
    assert list(ref.state_dict()) == list(fused.state_dict())
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in fused.named_modules()]
    fresh_ref, fresh_fused = SGAdapter(16, 2, alpha=0.3), SGAdapterFused(16, 2, alpha=0.3)
    fresh_ref.load_state_dict(fused.state_dict())
    fresh_fused.load_state_dict(ref.state_dict())
    x, g, _, _ = _inputs((4, 5), 16, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fresh_fused(x, g), ref(x, g), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fresh_ref(x, g), fused(x, g), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_many_leading_dims():
    """Non-contiguous x is copied (documented fallback); out.sum().backward() hands backward an
    expanded, stride-0 gradient, which must work too."""
    ref, fused = random_adapter_pair(24, 3)
    x, g, _, _ = _inputs((2, 3, 4, 5), 24, torch.float32)
    xt = x.transpose(1, 2)  # (2, 4, 3, 5, 24), non-contiguous
    assert not xt.is_contiguous()
    grads = []
    for module in (fused, ref):
        xs = xt.detach().clone().requires_grad_()
        out = module(xs, g)
        out.sum().backward()
        grads.append((out.detach(), xs.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


def _saved_bytes(module, x, guidance, block):
    """Bytes of the distinct storages autograd keeps for backward, beyond x and the parameters."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if block:
            module.forward_block(x, guidance, torch.randn_like(x), torch.tensor(0.5, device=x.device))
        else:
            module(x, guidance)
    assert x.untyped_storage().data_ptr() in storages, "the hook saw no saved x: nothing was measured"
    owned = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    return sum(n for ptr, n in storages.items() if ptr not in owned)


@pytest.mark.parametrize("block", [False, True], ids=["adapter", "block"])
def test_backward_keeps_only_row_stats(block):
    """Between forward and backward the fused path holds, per token row, only mean and rstd (two
    fp32, 8 bytes) beyond x itself; everything else it saves is weight-sized. Measured as the
    growth of the saved bytes from 61 to 190 rows. The reference, for contrast, keeps several
    activations of width d per row."""
    d, r = 48, 4
    ref, fused = (m.to(DEV) for m in random_adapter_pair(d, r))
    growth = {}
    for name, module in (("fused", fused), ("reference", ref)):
        sizes = []
        for rows in (61, 190):
            x, g, _, _ = (t.to(DEV) for t in _inputs((rows,), d, torch.float32))
            sizes.append(_saved_bytes(module, x.requires_grad_(), g.requires_grad_(), block))
        growth[name] = (sizes[1] - sizes[0]) / (190 - 61)
    assert growth["fused"] == 8, growth
    assert growth["reference"] >= 3 * d * 4, growth


def test_custom_op_rejects_non_contiguous_rows():
    _, fused = random_adapter_pair(16, 2)
    w_cat, b_cat = fold_adapter_weights(fused, torch.randn(16))
    x = torch.randn(16, 8).t()  # (8, 16), rows not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.sage_fast.sg_adapter_fwd(
            x, w_cat, b_cat, fused.up.weight, fused.up.bias, None, None, 0.1, 1e-5, torch.float32
        )


def test_empty_input():
    _, fused = random_adapter_pair(16, 2)
    x = torch.zeros(0, 5, 16, requires_grad=True)
    out = fused(x, torch.randn(16))
    assert out.shape == (0, 5, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_fp64_auto_falls_back_to_torch_and_triton_refuses():
    ref, fused = random_adapter_pair(16, 2, backend="auto")
    x, g, _, _ = _inputs((6,), 16, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, g), ref.double()(x, g.double()), rtol=1e-6, atol=1e-6)
    fused.backend = "triton"
    with pytest.raises(TypeError, match="fp32, fp16 and bf16"):
        fused(x, g)


def test_cpu_without_interpreter_uses_torch_path(monkeypatch):
    """backend='auto' on a CPU tensor without the interpreter takes the folded PyTorch path;
    backend='triton' there is a clear error."""
    monkeypatch.setattr(_triton_runtime, "interpret_enabled", lambda: False)

    def no_kernels(*args, **kwargs):
        raise AssertionError("the Triton path must not run")

    monkeypatch.setattr(fa.SGAdapterFunction, "apply", no_kernels)
    ref, fused = random_adapter_pair(16, 2, backend="auto")
    x, g, mlp, _ = _inputs((3, 4), 16, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, g), ref(x, g), rtol=1e-5, atol=1e-5)
        s = torch.tensor(0.3)
        torch.testing.assert_close(
            fused.forward_block(x, g, mlp, s), ref.forward_block(x, g, mlp, s), rtol=1e-5, atol=1e-5
        )
    fused.backend = "triton"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused(x, g)


def test_bad_inputs_raise():
    _, fused = random_adapter_pair(16, 2)
    x, g, mlp, _ = _inputs((2, 3), 16, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        SGAdapterFused(16, 2, backend="cuda")
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        fused(torch.randn(2, 15), g)
    with pytest.raises(ValueError, match="guidance"):
        fused(x, torch.randn(2, 16))
    with pytest.raises(TypeError, match="floating-point"):
        fused(x.long(), g)
    with pytest.raises(ValueError, match="mlp_out"):
        fused.forward_block(x, g, mlp[:, :2], torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale"):
        fused.forward_block(x, g, mlp, torch.ones(2))


@pytest.mark.parametrize("where", ["weight", "guidance", "scale"])
def test_nan_raises(where):
    _, fused = random_adapter_pair(16, 2)
    x, g, mlp, _ = _inputs((2, 3), 16, torch.float32)
    s = torch.tensor(1.0)
    if where == "weight":
        with torch.no_grad():
            fused.down_vt.weight[0, 3] = float("nan")
    elif where == "guidance":
        g[5] = float("nan")
    else:
        s = torch.tensor(float("inf"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fused.forward_block(x, g, mlp, s)
    fused.check_finite = False  # documented opt-out: NaN then propagates, visibly
    assert not torch.isfinite(fused.forward_block(x, g, mlp, s)).all()


def test_torch_compile_fullgraph_no_graph_break():
    """The custom ops let torch.compile trace forward and backward in one graph."""
    ref, fused = (m.to(DEV) for m in random_adapter_pair(24, 3))
    x, g, mlp, up = (t.to(DEV) for t in _inputs((2, 21), 24, torch.float32))
    scale = torch.nn.Parameter(torch.tensor(0.6, device=DEV))

    def block(x, g, mlp):
        return fused.forward_block(x, g, mlp, scale)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    xs, gs = x.clone().requires_grad_(), g.clone().requires_grad_()
    out = compiled(xs, gs, mlp)
    out.backward(up)
    out_r = ref.forward_block(x.clone().requires_grad_(), g.clone().requires_grad_(), mlp, scale.detach())
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    assert xs.grad is not None and gs.grad is not None and scale.grad is not None
    assert fused.proj.weight.grad is not None and fused.up.weight.grad is not None
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, g, mlp)
    assert explained.graph_break_count == 0, explained.break_reasons
    # The drop-in forward through the compiled module itself.
    compiled_module = torch.compile(fused, fullgraph=True, backend="aot_eager")
    xs = x.clone().requires_grad_()
    compiled_module(xs, g).backward(up)
    xr = x.clone().requires_grad_()
    ref(xr, g).backward(up)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_cpu():
    """Under autocast the GEMM operands follow autocast's dtype; forward returns it (as the
    reference's last Linear does), forward_block keeps x's dtype; gradients reach fp32 weights."""
    ref, fused = random_adapter_pair(32, 4)
    x, g, mlp, _ = _inputs((2, 20), 32, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fused(x, g)
        a_ref = ref(x, g)
        blk = fused.forward_block(x, g, mlp, torch.tensor(0.5))
    assert a.dtype == a_ref.dtype == torch.bfloat16
    assert blk.dtype == torch.float32
    _assert_close("autocast a", a, a_ref, 3e-2, norm=True)
    blk.sum().backward()
    assert fused.proj.weight.grad.dtype == torch.float32 and torch.isfinite(fused.proj.weight.grad).all()


# ----------------------------------------------------------------------------------------------
# GPU only: bf16 parity at ViT-B/16 shapes (128 images x 197 tokens, d = 768) and ViT-L/14 shapes
# (64 images x 257 tokens, d = 1024, with the r LIFT's rule gives it: 2 to 128).
# ----------------------------------------------------------------------------------------------

VIT_SHAPES = [(768, (128, 197), r) for r in (4, 8, 32, 256)] + [(1024, (64, 257), r) for r in (2, 4, 16, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["adapter", "block"])
@pytest.mark.parametrize("d,lead,r", VIT_SHAPES, ids=[f"d{d}-r{r}" for d, _, r in VIT_SHAPES])
def test_bf16_vit_shapes_cuda(d, lead, r, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref, fused = random_adapter_pair(d, r)
    ref, fused = ref.cuda(), fused.cuda()
    x, g, mlp, up = (t.cuda() for t in _inputs(lead, d, torch.bfloat16))
    kw = dict(mlp=mlp.bfloat16(), scale=torch.tensor(0.8, device="cuda")) if mode == "block" else {}
    out_f, grads_f = _run(fused, x, g, upstream=up, **kw)
    kw_r = dict(mlp=mlp.bfloat16().float(), scale=kw["scale"]) if mode == "block" else {}
    out_r, grads_r = _run(ref, x.float(), g, upstream=up, **kw_r)
    assert out_f.dtype == torch.bfloat16
    _assert_close("out", out_f, out_r, 2e-2, norm=True)
    for name in grads_r:
        _assert_close(f"grad {name}", grads_f[name], grads_r[name], 2e-2, norm=True)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 7, 256])
def test_fp32_cuda_matches_reference(r):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d, lead = 1024, (4, 197)
    ref, fused = random_adapter_pair(d, r)
    ref, fused = ref.cuda(), fused.cuda()
    x, g, mlp, up = (t.cuda() for t in _inputs(lead, d, torch.float32))
    kw = dict(mlp=mlp, scale=torch.tensor(0.8, device="cuda"))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 reference, to compare the ieee dots against
    try:
        out_f, grads_f = _run(fused, x, g, upstream=up, **kw)
        out_r, grads_r = _run(ref, x, g, upstream=up, **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    _assert_close("out", out_f, out_r, 1e-4)
    for name in grads_r:
        _assert_close(f"grad {name}", grads_f[name], grads_r[name], 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["bf16-stream", "fp32-stream"])
def test_autocast_bf16_cuda_block(x_dtype):
    """Under bf16 autocast on CUDA. bf16 stream: the Sage model's setting (open_clip's LayerNorm casts
    back to bf16, so f~, mlp_out and the output are bf16); fp32 stream: an fp32 model under autocast."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    d, lead = 768, (16, 197)
    ref, fused = random_adapter_pair(d, 8)
    ref, fused = ref.cuda(), fused.cuda()
    x, g, mlp, up = (t.cuda() for t in _inputs(lead, d, torch.float32))
    x = x.to(x_dtype)
    kw = dict(mlp=mlp.bfloat16(), scale=torch.tensor(0.8, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_f, grads_f = _run(fused, x, g, upstream=up.to(x_dtype), **kw)
        out_r, grads_r = _run(ref, x, g, upstream=up.to(x_dtype), **kw)
    assert out_f.dtype == x_dtype
    _assert_close("out", out_f, out_r, 2e-2, norm=True)
    for name in grads_r:
        _assert_close(f"grad {name}", grads_f[name], grads_r[name], 3e-2, norm=True)
