"""End-to-end benchmark: one training step and one inference batch of Sage on CLIP ViT-B/16.

CUDA: open_clip `ViT-B-16-quickgelu` at 224 px, batch 128, 1000 classes (ImageNet-LT, r = 32 by
LIFT's rule), bf16 autocast, synthetic images and labels already on the GPU. The backbone has
random weights, seeded (speed does not depend on them, and GPU machines may be offline); the classifier
starts from random unit rows instead of the text-template init (which only costs build time).
CPU: the tiny open_clip config of `sage-tiny` (sage_fast/model/configs: 32 px, 2 blocks),
batch 4, 10 classes, fp32; a smoke test of the harness, not a measurement.

Configurations ("impl", with the FIT setting as "case"):
  floor          frozen backbone (no autograd) + trainable cosine head + compensated LA loss (case
                 "floor": the cheapest way to train on CLIP features)
  floor_bwd      the frozen-backbone floor of Sage: forward and backward through the frozen blocks
                 without adapters (gradients flow back to the input) + the cosine head and LA loss,
                 and with FIT on also FIT's second forward (the frozen f_zs pass, no autograd): what
                 any method that adapts inside the blocks must at least pay
  reference      Sage, reference SG-Adapter (`SGAdapter`) and the PyTorch loss (backend "torch")
  fused          Sage, backend "auto": `SGAdapterFused` (Triton on CUDA) and the Triton loss; on CPU
                 the fused modules' PyTorch backend, so the smoke run never touches the Triton interpreter
  fused_compile  the fused model's forward under torch.compile (default mode, static shapes; Dynamo
                 traces the adapters' custom ops, AOTAutograd compiles the backward), the loss eager
                 (its one host sync, the input check, would break the graph anyway); run_gpu.sh times
                 these in its last stage (-k compile), after the uncompiled ones
FIT on: the four-term loss and the extra frozen forward pass for f_zs; FIT off: the compensated LA loss.

Activation checkpointing (`test_train_step_grad_checkpoint`, CUDA only): the fused Sage step with FIT
on `ViT-B-16-quickgelu` and `ViT-L-14-quickgelu` (random weights, 224 px, batch 128, 1000 classes),
`model.grad_checkpoint` false and true: images/s and the peak memory the step adds to what was allocated
before the model was built, next to `sage_fast.model.memory.training_memory`'s computed total.
A training step is zero_grad, forward, loss, backward and an SGD step (lr 0.01, momentum 0.9,
weight decay 5e-4) over the trainable parameters. Inference is `SageModel.predict` (FIT on: two
backbone passes) or the floor's features + head. Reported: images/s and peak memory.

Error: before it is timed, each Sage configuration (reference and fused) compares one step with
the reference model (backend "torch", same trainable weights, all of them perturbed first so that
every gradient is non-zero; a fresh model has up = 0) run in fp32: the loss, z, z_hat and the
gradient of all trainable parameters taken as one vector; inference compares predict's z_hat.
On CUDA the step runs under bf16 autocast, so the limits are bf16's (error_check.TOLERANCES, and twice
the reference's own bf16-autocast error); on CPU fp32's. The record keeps the error and the case
fails when it is over the limit. The floor configurations are not Sage and are not compared.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from sage_fast import CompensatedLALoss, lift_bottleneck
from sage_fast.model import SageModel, load_clip

from . import environment, harness, timing
from .error_check import ErrorCheck, assert_error_ok, check_error
from .timing import DEVICE, ON_GPU

TRAIN_CASES = [("floor", "floor"), ("fit_off", "floor_bwd"), ("fit_on", "floor_bwd"),
               ("fit_on", "reference"), ("fit_on", "fused"), ("fit_off", "reference"), ("fit_off", "fused"),
               ("fit_on", "fused_compile"), ("fit_off", "fused_compile")]
INFER_CASES = [("floor", "floor"), ("fit_on", "reference"), ("fit_on", "fused"), ("fit_off", "reference"),
               ("fit_off", "fused")]
LOGIT_SCALE = 25.0
#: precision of the step (bf16 autocast on CUDA), the key of its limits in error_check.TOLERANCES
PRECISION = "bf16" if ON_GPU else "fp32"


def make_e2e(classes: int, batch: int) -> dict:
    """The frozen CLIP shared by every configuration, plus synthetic data on the device."""
    model_name = "ViT-B-16-quickgelu" if ON_GPU else "sage-tiny"
    with torch.random.fork_rng(devices=[]):  # seeded: every run builds (and checks) the same random weights
        torch.manual_seed(0)
        clip = load_clip(model_name, pretrained=None, device=DEVICE)
    visual = clip.visual
    size = visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    width = visual.transformer.width
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen, device=DEVICE)
    target = torch.randint(0, classes, (batch,), generator=gen, device=DEVICE)
    init = F.normalize(torch.randn(classes, width, generator=torch.Generator().manual_seed(4)), dim=-1)
    return {
        "clip": clip, "images": images, "target": target, "init": init,
        "counts": harness.long_tailed_counts(classes), "names": [f"class_{k}" for k in range(classes)],
        "attention": environment.attention_backend(),
        "params": {
            "model": model_name, "image_size": image_size, "batch": batch, "classes": classes,
            "bottleneck": lift_bottleneck(classes, len(visual.transformer.resblocks)),
            "precision": "bf16 autocast" if ON_GPU else "fp32",
        },
    }


@pytest.fixture(scope="module")
def e2e(e2e_settings):
    data = make_e2e(e2e_settings["classes"], e2e_settings["batch"])
    yield data
    del data
    timing.free_memory()


def bf16_autocast(enabled: bool = ON_GPU):
    """bf16 autocast on the device when enabled (the default on CUDA, as training runs), else nothing."""
    if enabled:
        return torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_sage(e2e, fit: bool, impl: str) -> SageModel:
    """A SageModel on the shared frozen CLIP. reference: backend "torch"; fused: backend "auto" (the
    Triton adapters and loss on CUDA, the folded PyTorch adapter and the reference loss on CPU)."""
    backend = "torch" if impl == "reference" else "auto"
    model = SageModel(
        e2e["clip"], e2e["names"], e2e["counts"], e2e["init"], fit=fit, backend=backend, attention=e2e["attention"],
    ).to(DEVICE)
    model.train()
    return model


def _backends(impl: str) -> dict:
    """What actually ran for a Sage configuration (the table says "fused" on CPU too)."""
    if impl in ("fused", "fused_compile"):
        out = ({"adapter_backend": "triton", "loss_backend": "triton"} if ON_GPU
               else {"adapter_backend": "folded torch", "loss_backend": "torch"})
        if impl == "fused_compile":
            out["compiled"] = "torch.compile(model): forward and backward; loss eager"
        return out
    return {"adapter_backend": "reference", "loss_backend": "torch"}


# ----------------------------------------------------------------------------------------------
# error against the reference


def perturb(model: SageModel, seed: int = 5) -> None:
    """Add noise to every trainable parameter, N(0, 1 / fan_in) to matrices and N(0, 0.1^2) to the
    rest: with LIFT's init (up = 0) the adapters output zero and most gradients are exactly zero,
    which would leave the adapters unchecked; this way each adapter's output is about as large as
    its input and an error in it shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            std = p.shape[1] ** -0.5 if p.ndim > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * std)


def step_outputs(model: SageModel, images, target, autocast: bool) -> dict:
    """Loss, z, z_hat and the gradient of all trainable parameters (one vector) of one step."""
    params = model.trainable_parameters()
    with bf16_autocast(autocast):
        out = model(images)
        loss, z_hat = model.loss(out, target)
    grads = torch.autograd.grad(loss, params)
    grad = torch.cat([g.detach().float().flatten() for g in grads])
    return {"loss": loss.detach(), "z": out.z.detach(), "z_hat": z_hat.detach(), "grad": grad}


def predict_outputs(model: SageModel, images, target, autocast: bool) -> dict:
    with bf16_autocast(autocast):
        return {"z_hat": model.predict(images)}


def error_check(e2e, sage: SageModel, outputs) -> ErrorCheck:
    """`outputs` (step_outputs or predict_outputs) of `sage` at the step's precision against the reference
    model with the same (perturbed) weights in fp32; on CUDA also the reference under bf16 autocast,
    which sets the limits (check_error)."""
    perturb(sage)
    twin = build_sage(e2e, sage.fit, "reference")
    twin.load_trainable_state_dict(sage.trainable_state_dict())
    twin.train(sage.training)
    images, target = e2e["images"], e2e["target"]
    got = outputs(sage, images, target, autocast=ON_GPU)
    eager = None
    if ON_GPU:
        eager = got if sage.backend == "torch" else outputs(twin, images, target, autocast=True)
    want = outputs(twin, images, target, autocast=False)
    check = check_error(got, want, PRECISION, eager)
    del twin, got, eager, want
    timing.free_memory()
    return check


# ----------------------------------------------------------------------------------------------
# the benchmarks


class FloorHead(torch.nn.Module):
    """Frozen backbone features -> cosine classifier (the cheapest way to train on CLIP features)."""

    def __init__(self, sage_model, init, counts):
        super().__init__()
        self.sage = sage_model
        self.weight = torch.nn.Parameter(init.clone().to(DEVICE))
        self.criterion = CompensatedLALoss(counts, backend="torch").to(DEVICE)

    def logits(self, images, backbone_grad: bool):
        ctx = contextlib.nullcontext() if backbone_grad else torch.no_grad()
        with ctx:
            feats = self.sage.visual_features(images, adapters=False)
        with torch.autocast(device_type=DEVICE.type, enabled=False):
            return LOGIT_SCALE * F.normalize(feats.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()


def _record(recorder, benchmark, group, case, impl, e2e, measured, extra):
    batch = e2e["params"]["batch"]
    record = {
        "group": group,
        "case": case,
        "impl": impl,
        "params": dict(e2e["params"]),
        "attention": e2e["attention"],
        "attention_kernel": environment.sdpa_kernel() if e2e["attention"] == "sdpa" else e2e["attention"],
        **measured.record_fields(),
        "images_per_s": batch / measured.median_s,
        "tokens_per_s": batch * _tokens(e2e) / measured.median_s,
        **timing.peak_memory_fields(),
        **extra,
    }
    recorder.add(record, benchmark.extra_info)


def _tokens(e2e) -> int:
    patch = e2e["clip"].visual.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return (e2e["params"]["image_size"] // patch) ** 2 + 1


def _finish(recorder, benchmark, group, case, impl, e2e, measured, extra, check) -> None:
    """Record the timing (with the error where the case was compared), then fail on a bad error."""
    if check is not None:
        extra = {**extra, **check.record_fields()}
    if measured is not None:
        _record(recorder, benchmark, group, case, impl, e2e, measured, extra)
    if check is not None:
        assert_error_ok(check, f"{group} {case} {impl}")


@pytest.mark.parametrize("case,impl", TRAIN_CASES, ids=[f"{c}-{i}" for c, i in TRAIN_CASES])
def test_train_step(case, impl, e2e, benchmark, recorder, compile_enabled):
    benchmark.group = "train_step"
    if impl == "fused_compile" and not compile_enabled:
        pytest.skip(harness.CPU_NO_COMPILE if not ON_GPU else "torch.compile baselines disabled (--sage-no-compile)")
    timing.free_memory()
    images, target = e2e["images"], e2e["target"]
    extra, check = {}, None
    if impl.startswith("floor"):
        sage = build_sage(e2e, fit=False, impl="reference")
        head = FloorHead(sage, e2e["init"], e2e["counts"])
        params = [head.weight]
        backbone_grad = impl == "floor_bwd"
        second_forward = case == "fit_on"  # FIT's frozen f_zs pass
        inputs = images.detach().clone().requires_grad_(backbone_grad)
        extra["second_forward"] = second_forward

        def loss_fn():
            loss = head.criterion(head.logits(inputs, backbone_grad), target)
            if second_forward:
                with torch.no_grad():
                    sage.visual_features(images, adapters=False)
            return loss
    else:
        sage = build_sage(e2e, fit=(case == "fit_on"), impl="fused" if impl == "fused_compile" else impl)
        model = sage
        if impl == "fused_compile":
            torch._dynamo.reset()  # a fresh cache per case (see bench_adapter.make_call)
            model = torch.compile(sage, dynamic=False)
        try:
            check = error_check(e2e, model, step_outputs)  # the first call: compiles
        except Exception as err:  # a torch.compile failure is reported, not a crash of the run
            if impl == "fused_compile":
                harness.skip_if_compile_failed("compile", err)
            raise
        params = sage.trainable_parameters()
        extra["bottleneck"] = sage.bottleneck
        extra["trainable_params"] = sage.num_trainable_parameters()
        extra.update(_backends(impl))

        def loss_fn():
            loss, _ = sage.loss(model(images), target)
            return loss
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with bf16_autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    timing.reset_peak_memory()
    measured = timing.run_benchmark(benchmark, step, timing.default_plan(step=True))
    _finish(recorder, benchmark, "train", case, impl, e2e, measured, extra, check)
    del sage, optimizer
    timing.free_memory()


@pytest.mark.parametrize("case,impl", INFER_CASES, ids=[f"{c}-{i}" for c, i in INFER_CASES])
def test_inference(case, impl, e2e, benchmark, recorder):
    benchmark.group = "inference"
    timing.free_memory()
    images = e2e["images"]
    check = None
    if impl == "floor":
        sage = build_sage(e2e, fit=False, impl="reference")
        head = FloorHead(sage, e2e["init"], e2e["counts"])
        extra = {}

        def run():
            with torch.no_grad(), bf16_autocast():
                return head.logits(images, backbone_grad=False)
    else:
        sage = build_sage(e2e, fit=(case == "fit_on"), impl=impl).eval()
        check = error_check(e2e, sage, predict_outputs)
        extra = _backends(impl)

        def run():
            with bf16_autocast():
                return sage.predict(images)

    timing.reset_peak_memory()
    measured = timing.run_benchmark(benchmark, run, timing.default_plan(step=True))
    _finish(recorder, benchmark, "infer", case, impl, e2e, measured, extra, check)
    del sage
    timing.free_memory()


CHECKPOINT_CASES = [(name, ck) for name in ("ViT-B-16-quickgelu", "ViT-L-14-quickgelu") for ck in (False, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("model_name,grad_checkpoint", CHECKPOINT_CASES,
                         ids=[f"{n}-{'ckpt' if c else 'no_ckpt'}" for n, c in CHECKPOINT_CASES])
def test_train_step_grad_checkpoint(model_name, grad_checkpoint, benchmark, recorder):
    """Peak memory and images/s of a fused FIT step with and without `model.grad_checkpoint` (CUDA only)."""
    from sage_fast.model.memory import training_memory

    if not ON_GPU:
        pytest.skip("peak GPU memory needs CUDA")
    benchmark.group = "train_step_grad_checkpoint"
    classes, batch = 1000, 128
    timing.free_memory()
    # what was allocated before the model is built (without the L2-flush buffer, allocated or not yet)
    before_mib = torch.cuda.memory_allocated() / 2**20 - timing.flush_mib()
    clip = load_clip(model_name, pretrained=None, device=DEVICE)
    size = clip.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    images = torch.randn(batch, 3, size, size, generator=gen, device=DEVICE)
    target = torch.randint(0, classes, (batch,), generator=gen, device=DEVICE)
    init = F.normalize(torch.randn(classes, clip.visual.transformer.width, generator=torch.Generator().manual_seed(4)),
                       dim=-1)
    sage = SageModel(clip, [f"class_{k}" for k in range(classes)], harness.long_tailed_counts(classes), init,
                     fit=True, backend="auto", attention=environment.attention_backend(),
                     grad_checkpoint=grad_checkpoint).to(DEVICE)
    sage.train()
    optimizer = torch.optim.SGD(sage.trainable_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with bf16_autocast():
            loss, _ = sage.loss(sage(images), target)
        loss.backward()
        optimizer.step()
        return loss

    step()  # the momentum buffers and the gradients exist from here on, as in training
    timing.reset_peak_memory()
    measured = timing.run_benchmark(benchmark, step, timing.default_plan(step=True))
    peak = timing.peak_memory_mib() - before_mib
    predicted = training_memory(model_name, batch, num_classes=classes, bottleneck=sage.bottleneck,
                                grad_checkpoint=grad_checkpoint).total / 2**20
    if measured is not None:
        recorder.add({
            "group": "train_grad_checkpoint", "case": f"{model_name} grad_checkpoint={grad_checkpoint}", "impl": "fused",
            "params": {"model": model_name, "image_size": size, "batch": batch, "classes": classes,
                       "bottleneck": sage.bottleneck, "precision": "bf16 autocast", "grad_checkpoint": grad_checkpoint},
            **measured.record_fields(), "images_per_s": batch / measured.median_s,
            "step_peak_MiB": peak, "computed_total_MiB": predicted,
        }, benchmark.extra_info)
    del sage, clip, optimizer, images
    timing.free_memory()
