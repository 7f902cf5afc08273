"""End-to-end benchmark: one training step and one inference batch of Sage on CLIP ViT-B/16.

CUDA: open_clip `ViT-B-16-quickgelu` at 224 px, batch 128, 1000 classes (ImageNet-LT, r = 32 by
LIFT's rule), bf16 autocast, synthetic images and labels already on the GPU. The backbone has
random weights (speed does not depend on them, and GPU machines may be offline); the classifier
starts from random unit rows instead of the text-template init (which only costs build time).
CPU: the tiny open_clip config of `sage-tiny` (sage_fast/model/configs: 32 px, 2 blocks),
batch 4, 10 classes, fp32; a smoke test of the harness, not a measurement.

Configurations ("impl", with the FIT setting as "case"):
  floor       frozen backbone (no autograd) + trainable cosine head + compensated LA loss
  floor_bwd   the same, with gradients flowing back through the frozen backbone (what any method
              that adapts inside the blocks must at least pay)
  reference   Sage, reference SG-Adapter (`SGAdapter`) and the PyTorch loss
  fused       Sage, `SGAdapterFused` (Triton on CUDA) and the Triton loss; on CPU the fused
              modules' PyTorch backend, so the smoke run never touches the Triton interpreter
FIT on: the four-term loss and the extra frozen forward pass for f_zs; FIT off: the compensated LA loss.
A training step is zero_grad, forward, loss, backward and an SGD step (lr 0.01, momentum 0.9,
weight decay 5e-4) over the trainable parameters. Inference is `SageModel.predict` (FIT on: two
backbone passes) or the floor's features + head. Reported: images/s and peak memory.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from sage_fast.ops.reference import lift_bottleneck
from sage_fast import CompensatedLALoss

from . import harness
from .harness import DEVICE, ON_GPU

TRAIN_CASES = [("floor", "floor"), ("floor", "floor_bwd"), ("fit_on", "reference"), ("fit_on", "fused"),
               ("fit_off", "reference"), ("fit_off", "fused")]
INFER_CASES = [("floor", "floor"), ("fit_on", "reference"), ("fit_on", "fused"), ("fit_off", "reference"),
               ("fit_off", "fused")]
LOGIT_SCALE = 25.0


def _model_module():
    from sage_fast import model as model_module

    return model_module


@pytest.fixture(scope="module")
def e2e(e2e_settings):
    """The frozen CLIP shared by every configuration, plus synthetic data on the device."""
    mm = _model_module()
    if ON_GPU:
        model_name = "ViT-B-16-quickgelu"
    else:
        model_name = "sage-tiny"
    clip = mm.load_clip(model_name, pretrained=None, device=DEVICE)
    visual = clip.visual
    size = visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    width = visual.transformer.width
    classes, batch = e2e_settings["classes"], e2e_settings["batch"]
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen, device=DEVICE)
    target = torch.randint(0, classes, (batch,), generator=gen, device=DEVICE)
    init = F.normalize(torch.randn(classes, width, generator=torch.Generator().manual_seed(4)), dim=-1)
    attention = harness.attention_backend()
    counts = harness.long_tailed_counts(classes)
    data = {
        "module": mm, "clip": clip, "images": images, "target": target, "init": init,
        "counts": counts, "names": [f"class_{k}" for k in range(classes)], "attention": attention,
        "params": {
            "model": model_name, "image_size": image_size, "batch": batch, "classes": classes,
            "bottleneck": lift_bottleneck(classes, len(visual.transformer.resblocks)), "precision": "bf16 autocast" if ON_GPU else "fp32",
        },
    }
    yield data
    del data, clip, images
    harness.free_memory()


def _autocast():
    if ON_GPU:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_sage(e2e, fit: bool, impl: str):
    """A SageModel on the shared frozen CLIP. reference: backend "torch"; fused: backend "auto" (the
    Triton adapters and loss on CUDA, the folded PyTorch adapter and the reference loss on CPU)."""
    mm = e2e["module"]
    backend = "torch" if impl == "reference" else "auto"
    model = mm.SageModel(
        e2e["clip"], e2e["names"], e2e["counts"], e2e["init"], fit=fit, backend=backend, attention=e2e["attention"],
    ).to(DEVICE)
    model.train()
    return model


def _backends(impl: str) -> dict:
    """What actually ran for a Sage configuration (the table says "fused" on CPU too)."""
    if impl == "fused":
        if ON_GPU:
            return {"adapter_backend": "triton", "loss_backend": "triton"}
        return {"adapter_backend": "folded torch", "loss_backend": "torch"}
    return {"adapter_backend": "reference", "loss_backend": "torch"}


class FloorHead(torch.nn.Module):
    """Frozen backbone features -> cosine classifier (the cheapest way to train on CLIP features)."""

    def __init__(self, sage_model, init, counts):
        super().__init__()
        self.sage = sage_model
        self.weight = torch.nn.Parameter(init.clone().to(DEVICE))
        self.criterion = CompensatedLALoss(counts, **harness.loss_backend_kwargs(CompensatedLALoss, "torch")).to(DEVICE)

    def logits(self, images, backbone_grad: bool):
        ctx = contextlib.nullcontext() if backbone_grad else torch.no_grad()
        with ctx:
            feats = self.sage.visual_features(images, adapters=False)
        with torch.autocast(device_type=DEVICE.type, enabled=False):
            return LOGIT_SCALE * F.normalize(feats.float(), dim=-1) @ F.normalize(self.weight.float(), dim=-1).t()


def _record(recorder, benchmark, group, case, impl, e2e, timing, extra):
    batch = e2e["params"]["batch"]
    record = {
        "group": group,
        "case": case,
        "impl": impl,
        "params": dict(e2e["params"]),
        "attention": e2e["attention"],
        "attention_kernel": harness.sdpa_kernel() if e2e["attention"] == "sdpa" else e2e["attention"],
        "time_s": timing.median_s,
        "mean_s": timing.mean_s,
        "stddev_s": timing.stddev_s,
        "rounds": timing.rounds,
        "iterations": timing.iterations,
        "images_per_s": batch / timing.median_s,
        "tokens_per_s": batch * _tokens(e2e) / timing.median_s,
        "peak_mem_MiB": harness.peak_memory_mib(),
        **extra,
    }
    recorder.add(record, benchmark.extra_info)


def _tokens(e2e) -> int:
    patch = e2e["clip"].visual.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    return (e2e["params"]["image_size"] // patch) ** 2 + 1


@pytest.mark.parametrize("case,impl", TRAIN_CASES, ids=[f"{c}-{i}" for c, i in TRAIN_CASES])
def test_train_step(case, impl, e2e, benchmark, recorder):
    benchmark.group = "train_step"
    harness.free_memory()
    images, target = e2e["images"], e2e["target"]
    extra = {}
    if impl.startswith("floor"):
        sage = build_sage(e2e, fit=False, impl="reference")
        head = FloorHead(sage, e2e["init"], e2e["counts"])
        params = [head.weight]
        backbone_grad = impl == "floor_bwd"
        inputs = images.detach().clone().requires_grad_(backbone_grad)

        def loss_fn():
            return head.criterion(head.logits(inputs, backbone_grad), target)
    else:
        sage = build_sage(e2e, fit=(case == "fit_on"), impl=impl)
        params = sage.trainable_parameters()
        extra["bottleneck"] = sage.bottleneck
        extra["trainable_params"] = sage.num_trainable_parameters()
        extra.update(_backends(impl))

        def loss_fn():
            loss, _ = sage.loss(sage(images), target)
            return loss
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    harness.reset_peak_memory()
    timing = harness.run_benchmark(benchmark, step, harness.default_plan(step=True))
    if timing is None:
        return
    _record(recorder, benchmark, "train", case, impl, e2e, timing, extra)
    del sage, optimizer
    harness.free_memory()


@pytest.mark.parametrize("case,impl", INFER_CASES, ids=[f"{c}-{i}" for c, i in INFER_CASES])
def test_inference(case, impl, e2e, benchmark, recorder):
    benchmark.group = "inference"
    harness.free_memory()
    images = e2e["images"]
    if impl == "floor":
        sage = build_sage(e2e, fit=False, impl="reference")
        head = FloorHead(sage, e2e["init"], e2e["counts"])
        extra = {}

        def run():
            with torch.no_grad(), _autocast():
                return head.logits(images, backbone_grad=False)
    else:
        sage = build_sage(e2e, fit=(case == "fit_on"), impl=impl).eval()
        extra = _backends(impl)

        def run():
            with _autocast():
                return sage.predict(images)

    harness.reset_peak_memory()
    timing = harness.run_benchmark(benchmark, run, harness.default_plan(step=True))
    if timing is None:
        return
    _record(recorder, benchmark, "infer", case, impl, e2e, timing, extra)
    del sage
    harness.free_memory()
