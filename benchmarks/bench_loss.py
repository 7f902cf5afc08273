"""Loss benchmark: compensated logit-adjusted CE (Eq. 22, kind "la") and FIT's four-term loss (Eq. 23, 24,
kind "fit"), called as the model calls them: the public modules `CompensatedLALoss` / `FITLoss`.

Implementations, same inputs:
  eager    the module with backend="torch" (the PyTorch reference)
  compile  torch.compile of that module (default mode, dynamic=False)
  fused    the module with backend="triton" (sage_fast.ops.la_loss; CUDA only)
Each includes the module's input validation (NaN and label-range checks), as a user's call does.

Shapes: batch 512, C in {100, 1000, 8142} (CIFAR-100-LT, ImageNet-LT, iNaturalist 2018) on CUDA,
bf16 and fp32 logits; batch 16, C = 100 on CPU. Modes: fwd (no_grad) and fwdbwd (forward, then
torch.autograd.grad of the loss w.r.t. the logits and, for FIT, s1 and s2).

Work model (B rows, C classes, e = logit element size; see README):
  la   fwd bytes = B C e      fwdbwd bytes = 2 B C e     (read logits; write their gradient)
       fwd FLOPs = 5 B C      fwdbwd FLOPs = 8 B C
  fit  fwd bytes = 4 B C e    fwdbwd bytes = 7 B C e     (read z, zv, zt; write z_hat; write 3 grads)
       fwd FLOPs = 24 B C     fwdbwd FLOPs = 44 B C
FLOPs are counted elementwise operations (exp counted as one); the loss is memory-bound, read GB/s.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sage_fast import CompensatedLALoss, FITLoss

from . import harness
from .harness import CPU_NO_COMPILE, CPU_NO_TRITON, DEVICE, DTYPES, ON_GPU

IMPLS = ("eager", "compile", "fused")
LAMBDAS = (0.015, 0.015, 0.4)


@dataclass(frozen=True)
class LossCase:
    kind: str
    batch: int
    classes: int
    dtype: str
    mode: str
    impl: str

    @property
    def key(self) -> str:
        return f"{self.kind} C={self.classes} {self.dtype} {self.mode}"


def _cases() -> list:
    if ON_GPU:
        batch, class_counts, dtypes = 512, (100, 1000, 8142), ("bf16", "fp32")
    else:
        batch, class_counts, dtypes = 16, (100,), ("fp32", "bf16")
    out = []
    for kind in ("fit", "la"):
        # The compensated LA loss alone only at the largest C on CUDA: it keeps the torch.compile
        # cases (each a cold Inductor compile) within run_gpu.sh's 10-minute budget.
        for classes in class_counts if (kind == "fit" or not ON_GPU) else class_counts[-1:]:
            for dtype in dtypes:
                for mode in ("fwd", "fwdbwd"):
                    for impl in IMPLS:
                        case = LossCase(kind, batch, classes, dtype, mode, impl)
                        out.append(pytest.param(case, id=f"{kind}-C{classes}-{dtype}-{mode}-{impl}"))
    return out


def work_model(case: LossCase) -> tuple[int, int]:
    """(bytes, FLOPs) of one call under the documented work model."""
    e = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    bc = case.batch * case.classes
    side = case.classes * 4 + case.batch * 8  # log-prior (fp32) and int64 labels
    if case.kind == "la":
        return (bc * e if case.mode == "fwd" else 2 * bc * e) + side, (5 if case.mode == "fwd" else 8) * bc
    return (4 * bc * e if case.mode == "fwd" else 7 * bc * e) + side, (24 if case.mode == "fwd" else 44) * bc


def build_module(case: LossCase) -> torch.nn.Module:
    counts = harness.long_tailed_counts(case.classes)
    cls = FITLoss if case.kind == "fit" else CompensatedLALoss
    backend = "triton" if case.impl == "fused" else "torch"
    kwargs = {"lambdas": LAMBDAS} if case.kind == "fit" else {}
    module = cls(counts, **kwargs, **harness.loss_backend_kwargs(cls, backend)).to(DEVICE)
    if case.kind == "fit":
        with torch.no_grad():  # s1 = s2 = 0 at init would make z_hat = z; time the general case
            module.s1.fill_(0.1)
            module.s2.fill_(-0.05)
    return module


def make_inputs(case: LossCase, requires_grad: bool):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    dtype = DTYPES[case.dtype]
    count = 3 if case.kind == "fit" else 1
    logits = [
        (torch.randn(case.batch, case.classes, generator=gen, device=DEVICE) * 5).to(dtype).requires_grad_(requires_grad)
        for _ in range(count)
    ]
    target = torch.randint(0, case.classes, (case.batch,), generator=gen, device=DEVICE)
    return logits, target


def _loss_of(case: LossCase, call, logits, target):
    if case.kind == "fit":
        loss, _ = call(*logits, target)
        return loss
    return call(logits[0], target)


@pytest.mark.parametrize("case", _cases())
def test_loss(case: LossCase, benchmark, recorder, ceilings, compile_enabled):
    if case.impl == "fused" and not ON_GPU:
        pytest.skip(CPU_NO_TRITON)
    if case.impl == "compile" and not compile_enabled:
        pytest.skip(CPU_NO_COMPILE if not ON_GPU else "torch.compile baselines disabled (--sage-no-compile)")
    benchmark.group = f"loss_{case.kind} {case.dtype} {case.mode}"
    harness.free_memory()
    module = build_module(case)
    if case.impl == "compile":
        torch._dynamo.reset()  # fresh cache per case, see bench_adapter.make_call
        call = torch.compile(module, dynamic=False)
    else:
        call = module
    training = case.mode == "fwdbwd"
    logits, target = make_inputs(case, requires_grad=training)

    error = None
    if not training:
        def fn():
            with torch.no_grad():
                return _loss_of(case, call, logits, target)

        if case.impl != "eager":
            reference = build_module(LossCase(case.kind, case.batch, case.classes, case.dtype, case.mode, "eager"))
            try:
                got = fn()
            except Exception as err:
                harness.skip_if_compile_failed(case.impl, err)
                raise
            with torch.no_grad():
                want = _loss_of(case, reference, logits, target)
            error = (abs(got.float() - want.float()) / want.float().abs().clamp_min(1e-12)).item()
    else:
        leaves = list(logits) + ([module.s1, module.s2] if case.kind == "fit" else [])

        def fn():
            return torch.autograd.grad(_loss_of(case, call, logits, target), leaves)

    timing = harness.time_kernel_case(benchmark, fn, case.impl)
    if timing is None:
        return
    nbytes, flops = work_model(case)
    backend = {"fused": "triton", "compile": "inductor"}.get(case.impl, "eager")
    recorder.add(harness.kernel_record("loss", case, backend, timing, case.batch, nbytes, flops, error, ceilings),
                 benchmark.extra_info)
