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

Error: before it is timed, every case compares the loss (and FIT's z_hat; with backward, the
gradients of the logits and of s1, s2) with the eager module run in fp32 on fp32 copies of the same
logits (error_check.check_error); the record keeps the error and the case fails when it is over the limit.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sage_fast import CompensatedLALoss, FITLoss

from . import harness, timing
from .error_check import DTYPES, ErrorCheck, assert_error_ok, check_error
from .harness import CPU_NO_COMPILE, CPU_NO_TRITON
from .timing import DEVICE, ON_GPU

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

    @property
    def training(self) -> bool:
        return self.mode == "fwdbwd"


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
    """The loss module of the case: backend "triton" for fused, the PyTorch reference ("torch") otherwise."""
    counts = harness.long_tailed_counts(case.classes)
    backend = "triton" if case.impl == "fused" else "torch"
    if case.kind == "fit":
        module = FITLoss(counts, lambdas=LAMBDAS, backend=backend).to(DEVICE)
        with torch.no_grad():  # s1 = s2 = 0 at init would make z_hat = z; time the general case
            module.s1.fill_(0.1)
            module.s2.fill_(-0.05)
    else:
        module = CompensatedLALoss(counts, backend=backend).to(DEVICE)
    return module


def make_inputs(case: LossCase, requires_grad: bool):
    """Logits N(0, 5^2) plus 5 at the labelled class (as a model that has learnt something scores it
    higher), so the gradients of s1 and s2, sums over every row and class, add up instead of cancelling."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    dtype = DTYPES[case.dtype]
    count = 3 if case.kind == "fit" else 1
    target = torch.randint(0, case.classes, (case.batch,), generator=gen, device=DEVICE)
    label = torch.nn.functional.one_hot(target, case.classes).float()
    logits = [
        (torch.randn(case.batch, case.classes, generator=gen, device=DEVICE) * 5 + 5 * label).to(dtype)
        .requires_grad_(requires_grad)
        for _ in range(count)
    ]
    return logits, target


def _loss_of(case: LossCase, call, logits, target):
    if case.kind == "fit":
        loss, _ = call(*logits, target)
        return loss
    return call(logits[0], target)


def loss_outputs(case: LossCase, call, module: torch.nn.Module, logits, target) -> dict:
    """The tensors the error check compares: the loss (and FIT's z_hat); with backward, the gradients
    of the logits (and of s1, s2)."""
    names = ["z", "zv", "zt"] if case.kind == "fit" else ["logits"]
    with torch.set_grad_enabled(case.training):
        if case.kind == "fit":
            loss, z_hat = call(*logits, target)
            out = {"loss": loss, "z_hat": z_hat}
        else:
            loss = call(logits[0], target)
            out = {"loss": loss}
    if case.training:
        scalars = [("s1", module.s1), ("s2", module.s2)] if case.kind == "fit" else []
        grads = torch.autograd.grad(loss, list(logits) + [p for _, p in scalars])
        out.update({f"grad {n}": g for n, g in zip(names + [n for n, _ in scalars], grads)})
    return {k: v.detach() for k, v in out.items()}


def eager_outputs(case: LossCase, logits, target, fp32: bool) -> dict:
    """loss_outputs of the eager module (backend "torch", same s1, s2): on fp32 copies of the logits,
    or on the case's own logits."""
    eager = build_module(LossCase(case.kind, case.batch, case.classes, case.dtype, case.mode, "eager"))
    logits = [(t.detach().float() if fp32 else t.detach().clone()).requires_grad_(case.training) for t in logits]
    return loss_outputs(case, eager, eager, logits, target)


def error_check(case: LossCase, call, module: torch.nn.Module, logits, target) -> ErrorCheck:
    """The case's error against the eager reference (see the module doc); the first call of `call`."""
    try:
        got = loss_outputs(case, call, module, logits, target)
    except Exception as err:  # a torch.compile failure is reported, not a crash of the run
        harness.skip_if_compile_failed(case.impl, err)
        raise
    eager = None
    if case.dtype != "fp32":
        eager = got if case.impl == "eager" else eager_outputs(case, logits, target, fp32=False)
    return check_error(got, eager_outputs(case, logits, target, fp32=True), case.dtype, eager)


@pytest.mark.parametrize("case", _cases())
def test_loss(case: LossCase, benchmark, recorder, ceilings, compile_enabled):
    if case.impl == "fused" and not ON_GPU:
        pytest.skip(CPU_NO_TRITON)
    if case.impl == "compile" and not compile_enabled:
        pytest.skip(CPU_NO_COMPILE if not ON_GPU else "torch.compile baselines disabled (--sage-no-compile)")
    benchmark.group = f"loss_{case.kind} {case.dtype} {case.mode}"
    timing.free_memory()
    module = build_module(case)
    if case.impl == "compile":
        torch._dynamo.reset()  # fresh cache per case, see bench_adapter.make_call
        call = torch.compile(module, dynamic=False)
    else:
        call = module
    logits, target = make_inputs(case, requires_grad=case.training)
    check = error_check(case, call, module, logits, target)

    if not case.training:
        def fn():
            with torch.no_grad():
                return _loss_of(case, call, logits, target)
    else:
        leaves = list(logits) + ([module.s1, module.s2] if case.kind == "fit" else [])

        def fn():
            return torch.autograd.grad(_loss_of(case, call, logits, target), leaves)

    measured = harness.time_kernel_case(benchmark, fn, case.impl)
    if measured is not None:
        nbytes, flops = work_model(case)
        backend = {"fused": "triton", "compile": "inductor"}.get(case.impl, "eager")
        recorder.add(harness.kernel_record("loss", case, backend, measured, case.batch, nbytes, flops, check, ceilings),
                     benchmark.extra_info)
    assert_error_ok(check, f"loss {case.key} {case.impl}")
