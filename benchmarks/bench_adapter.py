"""SG-Adapter block benchmark: ``forward_block(x, g, mlp_out, s) = x + mlp_out + s * adapter(x, g)``.

This is the call every Sage block makes (Eq. 9), so it is what the fused kernel has to beat.
Implementations, same weights and inputs:
  eager        sage_fast.ops.reference.SGAdapter (the literal reference of Eq. 7, 8)
  compile      torch.compile of the reference (default mode, dynamic=False)
  fused_torch  SGAdapterFused(backend="torch"): the folded algebra of SAGE.md 1.2 in PyTorch
  fused        SGAdapterFused(backend="triton"): the Triton kernels (CUDA only)

Shapes: ViT-B/16 on CUDA (128 images x 197 tokens, d = 768, r in {4, 8, 32, 256}, bf16 and fp32);
a small smoke shape on CPU. Modes: fwd (under no_grad) and fwdbwd (forward, then
torch.autograd.grad of every input and parameter for a fixed upstream gradient).
The bf16 cases hold bf16 parameters and run without autocast; training holds fp32 parameters and
runs under bf16 autocast (fold in fp32, GEMM operands bf16). Mode fwdbwd-autocast measures that:
fp32 module, guidance and scale, bf16 x and mlp_out, forward under torch.autocast(bf16), backward
outside it, for r in {4, 32, 256} (all CPU ranks) and eager / fused_torch / fused (no compile).

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

from dataclasses import dataclass

import pytest
import torch

from sage_fast.ops.reference import SGAdapter

from . import harness
from .harness import CPU_NO_COMPILE, CPU_NO_TRITON, DEVICE, DTYPES, ON_GPU

IMPLS = ("eager", "compile", "fused_torch", "fused")
AUTOCAST_MODE = "fwdbwd-autocast"
AUTOCAST_IMPLS = ("eager", "fused_torch", "fused")
AUTOCAST_RANKS = (4, 32, 256)  # a subset keeps run_gpu.sh's adapter stage short


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
    """Non-trivial weights (the LIFT init zeroes `up`, which would make the output constant)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 0 else 0.0))


def build_module(case: AdapterCase) -> torch.nn.Module:
    ref = SGAdapter(case.dim, case.r)
    _randomise(ref)
    if case.impl in ("eager", "compile"):
        module = ref
    else:
        cls = harness.fused_adapter_class()
        module = cls(case.dim, case.r, backend="triton" if case.impl == "fused" else "torch")
        module.load_state_dict(ref.state_dict())
    return module.to(device=DEVICE, dtype=case.param_dtype)


def make_inputs(case: AdapterCase, requires_grad: bool):
    """x and mlp_out in the case's dtype; guidance and scale in the parameters' dtype (fp32 under autocast,
    as the model's guidance and block scale are)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    dtype = DTYPES[case.dtype]

    def randn(*shape, scale=1.0, dt=dtype):
        t = torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32) * scale
        return t.to(dt).requires_grad_(requires_grad)

    x = randn(case.batch, case.tokens, case.dim)
    guidance = randn(case.dim, scale=0.05, dt=case.param_dtype)
    mlp_out = randn(case.batch, case.tokens, case.dim)
    scale = torch.full((), 0.9, device=DEVICE, dtype=case.param_dtype, requires_grad=requires_grad)
    return x, guidance, mlp_out, scale


def make_call(case: AdapterCase, module: torch.nn.Module, compile_enabled: bool):
    if case.impl != "compile":
        return module.forward_block
    if not compile_enabled:
        pytest.skip(CPU_NO_COMPILE if not ON_GPU else "torch.compile baselines disabled (--sage-no-compile)")
    # A fresh dynamo cache per case: recompiling the same code object for many shapes would hit
    # the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(module.forward_block, dynamic=False)


@pytest.mark.parametrize("case", _cases())
def test_sg_adapter_block(case: AdapterCase, benchmark, recorder, ceilings, compile_enabled):
    if case.impl == "fused" and not ON_GPU:
        pytest.skip(CPU_NO_TRITON)
    benchmark.group = f"sg_adapter_block {case.dtype} {case.mode}"
    harness.free_memory()
    module = build_module(case)
    call = make_call(case, module, compile_enabled)
    training = case.training
    x, guidance, mlp_out, scale = make_inputs(case, requires_grad=training)

    error = None
    if not training:
        def fn():
            with torch.no_grad():
                return call(x, guidance, mlp_out, scale)

        if case.impl != "eager":
            # Sanity of what is being timed (full parity lives in tests/): error vs the reference.
            reference = SGAdapter(case.dim, case.r).to(device=DEVICE, dtype=DTYPES[case.dtype])
            reference.load_state_dict(module.state_dict())
            try:
                got = fn()
            except Exception as err:  # a torch.compile failure is reported, not a crash of the run
                harness.skip_if_compile_failed(case.impl, err)
                raise
            with torch.no_grad():
                want = reference.forward_block(x, guidance, mlp_out, scale)
            error = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()
            del reference, got, want
    else:
        leaves = [x, guidance, mlp_out, scale] + [p for p in module.parameters() if p.requires_grad]
        grad_out = torch.randn_like(x).detach()

        def fn():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=case.autocast):
                out = call(x, guidance, mlp_out, scale)
            return torch.autograd.grad(out, leaves, grad_out)  # backward outside autocast, as in training

    timing = harness.time_kernel_case(benchmark, fn, case.impl)
    if timing is None:
        return
    num_params = sum(p.numel() for p in module.parameters())
    nbytes, flops = work_model(case, num_params)
    backend = {"fused": "triton", "fused_torch": "torch", "compile": "inductor"}.get(case.impl, "eager")
    recorder.add(harness.kernel_record("adapter", case, backend, timing, case.rows, nbytes, flops, error, ceilings),
                 benchmark.extra_info)
