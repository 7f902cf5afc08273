"""SG-Adapter block benchmark: ``forward_block(x, g, mlp_out, s) = x + mlp_out + s * adapter(x, g)``.

This is the call every Sage block makes (Eq. 9), so it is what the fused kernel has to beat.
Implementations, same weights and inputs:
  eager        sage_fast.ops.reference.SGAdapter (the literal reference of Eq. 7, 8)
  compile      torch.compile of the reference (default mode, dynamic=False)
  fused_torch  the folded algebra in PyTorch (sage_fast/ops/fold.py: fold_adapter_weights and
               sg_adapter_torch), the path SGAdapterFused(backend="auto") takes off CUDA
               (backend="torch" is the literal reference, i.e. eager)
  fused        SGAdapterFused(backend="triton"): the Triton kernels (CUDA only), check_finite off
               as in the Sage model (the check is one host sync per call)

Shapes: ViT-B/16 on CUDA (128 images x 197 tokens, d = 768, r in {4, 8, 32, 256}, bf16 and fp32);
a small smoke shape on CPU. Modes: fwd (under no_grad) and fwdbwd (forward, then
torch.autograd.grad of every input and parameter for a fixed upstream gradient).
The bf16 cases hold bf16 parameters and run without autocast; training holds fp32 parameters and
runs under bf16 autocast (fold in fp32, GEMM operands bf16). Mode fwdbwd-autocast measures that:
fp32 module, guidance and scale, bf16 x and mlp_out, forward under torch.autocast(bf16), backward
outside it, for r in {4, 32, 256} (all CPU ranks) and eager / fused_torch / fused (no compile).

Error: before it is timed, every case compares its output (and, with backward, the gradients of
x, g, mlp_out, s and every parameter) with the eager reference run in fp32 on the same rounded
inputs and weights (error_check.check_error); the record keeps the error and the case fails when it
is over the limit. Weights and the upstream gradient (mean 1) are chosen so that the gradients of
s, s_vt and the biases, sums over every token, do not cancel out to rounding noise (_randomise).

Work model (documented in benchmarks/README.md), N = tokens, d = width, e = element size,
P = adapter parameters:
  fwd     bytes = 3 N d e + P e          (read x, mlp_out; write out; read weights once)
          FLOPs = 8 N d r                (N x d x 2r and N x 2r x d GEMMs)
  fwdbwd  bytes = 6 N d e + 3 P e        (+ read grad_out, x; write grad_x; weights read, grads written)
          FLOPs = 24 N d r               (backward GEMMs are twice the forward)
  fwdbwd-autocast: as fwdbwd with e = 2 (bf16 activations) and 4 bytes per parameter element
The same work model is used for every implementation, so GB/s and TFLOP/s compare like for like.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from sage_fast import SGAdapter, SGAdapterFused, fold_adapter_weights, sg_adapter_torch

from . import harness, timing
from .error_check import DTYPES, ErrorCheck, assert_error_ok, check_error
from .harness import CPU_NO_COMPILE, CPU_NO_TRITON
from .timing import DEVICE, ON_GPU

IMPLS = ("eager", "compile", "fused_torch", "fused")
AUTOCAST_MODE = "fwdbwd-autocast"
AUTOCAST_IMPLS = ("eager", "fused_torch", "fused")
AUTOCAST_RANKS = (4, 32, 256)  # a subset keeps run_gpu.sh's adapter stage short
INPUT_NAMES = ("x", "guidance", "mlp_out", "scale")


@dataclass(frozen=True)
class AdapterCase:
    batch: int
    tokens: int
    dim: int
    r: int
    dtype: str
    mode: str
    impl: str

    @property
    def key(self) -> str:
        return f"r={self.r} {self.dtype} {self.mode}"

    @property
    def rows(self) -> int:
        return self.batch * self.tokens

    @property
    def autocast(self) -> bool:
        return self.mode == AUTOCAST_MODE

    @property
    def training(self) -> bool:
        return self.mode != "fwd"

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float32 if self.autocast else DTYPES[self.dtype]


def _cases() -> list:
    if ON_GPU:
        batch, tokens, dim, ranks, dtypes = 128, 197, 768, (4, 8, 32, 256), ("bf16", "fp32")
    else:
        batch, tokens, dim, ranks, dtypes = 2, 17, 64, (4, 32), ("fp32", "bf16")
    out = []
    for r in ranks:
        for dtype in dtypes:
            for mode in ("fwd", "fwdbwd"):
                for impl in IMPLS:  # eager first: later impls find their baseline already measured
                    case = AdapterCase(batch, tokens, dim, r, dtype, mode, impl)
                    out.append(pytest.param(case, id=f"r{r}-{dtype}-{mode}-{impl}"))
        if r in AUTOCAST_RANKS or not ON_GPU:
            for impl in AUTOCAST_IMPLS:
                case = AdapterCase(batch, tokens, dim, r, "bf16", AUTOCAST_MODE, impl)
                out.append(pytest.param(case, id=f"r{r}-bf16-{AUTOCAST_MODE}-{impl}"))
    return out


def work_model(case: AdapterCase, num_params: int) -> tuple[int, int]:
    """(bytes, FLOPs) of one call under the documented work model."""
    e = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    pe = torch.empty((), dtype=case.param_dtype).element_size()
    n, d, r = case.rows, case.dim, case.r
    if case.mode == "fwd":
        return 3 * n * d * e + num_params * pe, 8 * n * d * r
    return 6 * n * d * e + 3 * num_params * pe, 24 * n * d * r


def _randomise(module: torch.nn.Module) -> None:
    """Weights that make a well-conditioned test problem (the LIFT init zeroes `up`: a constant output).

    Matrices N(0, 1 / fan_in) so that the adapter output a is about as large as x and mlp_out (an
    error in a shows in the block output); LayerNorm weight 1 + N(0, 0.1^2), biases N(0, 0.1^2),
    s_vt 1 + N(0, 0.1^2). Three means make the gradients of the scalars s_vt and s, which are sums
    over every token, add up instead of cancelling to rounding noise (with the mean-1 upstream
    gradient of make_inputs): up.weight mean half its std, up.bias mean 0.5, down_t.bias mean 1.
    """
    gen = torch.Generator().manual_seed(0)
    means = {"ln.weight": 1.0, "up.bias": 0.5, "down_t.bias": 1.0, "s_vt": 1.0}
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = p.shape[1] ** -0.5 if p.ndim > 1 else 0.1
            mean = 0.5 * std if name == "up.weight" else means.get(name, 0.0)
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)


def build_module(case: AdapterCase) -> torch.nn.Module:
    """The module holding the weights: SGAdapterFused(backend="triton") for fused, SGAdapter otherwise."""
    ref = SGAdapter(case.dim, case.r)
    _randomise(ref)
    if case.impl == "fused":
        module = SGAdapterFused(case.dim, case.r, backend="triton")
        module.check_finite = False  # as in the Sage model: no host sync per call
        module.load_state_dict(ref.state_dict())
    else:
        module = ref
    return module.to(device=DEVICE, dtype=case.param_dtype)


def folded_block(module: SGAdapter) -> Callable:
    """forward_block through the fold in plain PyTorch (the fused_torch implementation)."""

    def call(x, guidance, mlp_out, scale):
        w_cat, b_cat = fold_adapter_weights(module, guidance)
        a = sg_adapter_torch(x, w_cat, b_cat, module.up.weight, module.up.bias, module.alpha, module.eps)
        return x + mlp_out + scale * a

    return call


def make_call(case: AdapterCase, module: torch.nn.Module, compile_enabled: bool) -> Callable:
    if case.impl == "fused_torch":
        return folded_block(module)
    if case.impl != "compile":
        return module.forward_block
    if not compile_enabled:
        pytest.skip(CPU_NO_COMPILE if not ON_GPU else "torch.compile baselines disabled (--sage-no-compile)")
    # A fresh dynamo cache per case: recompiling the same code object for many shapes would hit
    # the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(module.forward_block, dynamic=False)


def make_inputs(case: AdapterCase, requires_grad: bool):
    """x and mlp_out in the case's dtype; guidance and scale in the parameters' dtype (fp32 under autocast,
    as the model's guidance and block scale are); the upstream gradient (x's dtype, mean 1)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    dtype = DTYPES[case.dtype]

    def randn(*shape, scale=1.0, shift=0.0, dt=dtype, grad=requires_grad):
        t = torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32) * scale + shift
        return t.to(dt).requires_grad_(grad)

    x = randn(case.batch, case.tokens, case.dim)
    guidance = randn(case.dim, scale=0.05, dt=case.param_dtype)
    mlp_out = randn(case.batch, case.tokens, case.dim)
    scale = torch.full((), 0.9, device=DEVICE, dtype=case.param_dtype, requires_grad=requires_grad)
    grad_out = randn(case.batch, case.tokens, case.dim, shift=1.0, grad=False)
    return (x, guidance, mlp_out, scale), grad_out


def _autocast(case: AdapterCase):
    if case.autocast:
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def block_outputs(case: AdapterCase, call: Callable, module: torch.nn.Module, inputs, grad_out) -> dict:
    """The tensors the error check compares: out and, with backward, the gradient of every input and
    parameter (backward outside autocast, as in training)."""
    if not case.training:
        with torch.no_grad(), _autocast(case):
            return {"out": call(*inputs)}
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with _autocast(case):
        out = call(*inputs)
    grads = torch.autograd.grad(out, list(inputs) + [p for _, p in params], grad_out.to(out.dtype))
    names = list(INPUT_NAMES) + [n for n, _ in params]
    return {"out": out.detach(), **{f"grad {n}": g for n, g in zip(names, grads)}}


def eager_outputs(case: AdapterCase, module: torch.nn.Module, inputs, grad_out, fp32: bool) -> dict:
    """block_outputs of the eager reference holding `module`'s weights: in fp32 on fp32 copies of the
    (already rounded) inputs, or at the case's own precision (dtype and autocast)."""
    ref = SGAdapter(case.dim, case.r).to(DEVICE)
    ref.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    if fp32:
        ref_case = AdapterCase(case.batch, case.tokens, case.dim, case.r, "fp32", case.mode, "eager")
        inputs = [t.detach().float().requires_grad_(case.training) for t in inputs]
        grad_out = grad_out.float()
    else:
        ref_case = case
        ref = ref.to(case.param_dtype)
        inputs = [t.detach().clone().requires_grad_(case.training) for t in inputs]
    return block_outputs(ref_case, ref.forward_block, ref, inputs, grad_out)


def error_check(case: AdapterCase, call: Callable, module: torch.nn.Module, inputs, grad_out) -> ErrorCheck:
    """The case's error against the eager reference (see the module doc); the first call of `call`."""
    try:
        got = block_outputs(case, call, module, inputs, grad_out)
    except Exception as err:  # a torch.compile failure is reported, not a crash of the run
        harness.skip_if_compile_failed(case.impl, err)
        raise
    precision = "bf16" if case.autocast else case.dtype
    eager = None
    if precision != "fp32":
        eager = got if case.impl == "eager" else eager_outputs(case, module, inputs, grad_out, fp32=False)
    want = eager_outputs(case, module, inputs, grad_out, fp32=True)
    return check_error(got, want, precision, eager)


@pytest.mark.parametrize("case", _cases())
def test_sg_adapter_block(case: AdapterCase, benchmark, recorder, ceilings, compile_enabled):
    if case.impl == "fused" and not ON_GPU:
        pytest.skip(CPU_NO_TRITON)
    benchmark.group = f"sg_adapter_block {case.dtype} {case.mode}"
    timing.free_memory()
    module = build_module(case)
    call = make_call(case, module, compile_enabled)
    inputs, grad_out = make_inputs(case, requires_grad=case.training)
    check = error_check(case, call, module, inputs, grad_out)

    if not case.training:
        def fn():
            with torch.no_grad():
                return call(*inputs)
    else:
        leaves = list(inputs) + [p for p in module.parameters() if p.requires_grad]

        def fn():
            with _autocast(case):
                out = call(*inputs)
            return torch.autograd.grad(out, leaves, grad_out)  # backward outside autocast, as in training

    measured = harness.time_kernel_case(benchmark, fn, case.impl)
    if measured is not None:
        num_params = sum(p.numel() for p in module.parameters())
        nbytes, flops = work_model(case, num_params)
        backend = {"fused": "triton", "fused_torch": "folded torch", "compile": "inductor"}.get(case.impl, "eager")
        recorder.add(harness.kernel_record("adapter", case, backend, measured, case.rows, nbytes, flops, check, ceilings),
                     benchmark.extra_info)
    assert_error_ok(check, f"adapter {case.key} {case.impl}")
