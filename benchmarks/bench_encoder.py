"""The frozen image encoder, forward and backward, with each attention kernel of the model's switch.

Sage adapts inside every block of a frozen CLIP ViT, so each training step runs the frozen encoder forward
and backward: the gradient flows back through the frozen blocks to the adapters of the earlier ones. Its
attention is the model's ``attention`` setting (sage_fast/model/clip.py): ``open_clip`` (the block's own
nn.MultiheadAttention), ``sdpa`` (PyTorch's scaled_dot_product_attention; which SDPA kernel runs is
probed, `environment.sdpa_kernel`) or ``xformers`` (xformers' memory_efficient_attention, with the
operator its dispatcher chose). This times that encoder alone with each of them, on the same weights and
inputs: the measurement that decides whether the model's ``auto`` (SDPA) should ever take xformers.

CUDA: open_clip ``ViT-B-16-quickgelu`` (random weights) at 224 px, batch 128 (``--sage-e2e-batch``), bf16
autocast, as the training step runs. CPU: the tiny ``sage-tiny`` config, batch 4, fp32; xformers is
skipped with the reason (its kernels need CUDA, and on a CPU the switch runs SDPA), as it is on a GPU
where xformers is not installed or does not run (the model's own probe, `environment.xformers_status`).

One step (``impl`` = the attention, ``case`` "fwdbwd"): `SageModel.visual_features(images,
adapters=False)` on images that require grad (the frozen blocks without adapters, as the training step's
``floor_bwd``), then the gradient of the images for a fixed upstream gradient.

Parity: before it is timed, each attention's features and image gradient are compared with open_clip's
attention run in fp32 on the same inputs (`error_check.check_error`; on CUDA the limits are bf16's, or
twice open_clip's own bf16-autocast error): a fast but wrong kernel fails its case after its record is
written. Recorded: time, images/s, peak memory (reset before each attention), the error, and
``speedup_vs_open_clip`` (`records.add_ratios`).
"""
from __future__ import annotations

import pytest
import torch

from sage_fast.model import SageModel
from sage_fast.model.attention import xformers_ops_used

from . import environment, timing
from .bench_train_step import bf16_autocast, make_e2e
from .error_check import ErrorCheck, assert_error_ok, check_error
from .timing import DEVICE, ON_GPU

ATTENTIONS = ("open_clip", "sdpa", "xformers")
#: the precision of the step (bf16 autocast on CUDA), the key of its limits in error_check.TOLERANCES
PRECISION = "bf16" if ON_GPU else "fp32"


def build_encoder(data: dict, attention: str) -> SageModel:
    """A Sage model on the shared frozen CLIP with `attention`; only its frozen encoder is used."""
    return SageModel(data["clip"], data["names"], data["counts"], data["init"], fit=False, backend="torch",
                     attention=attention).to(DEVICE)


def encoder_outputs(model: SageModel, images: torch.Tensor, grad_out: torch.Tensor, autocast: bool) -> dict:
    """Features (B, d) and the gradient of the images (B, 3, H, W) for the upstream gradient grad_out (B, d)."""
    x = images.detach().clone().requires_grad_(True)
    with bf16_autocast(autocast):
        feats = model.visual_features(x, adapters=False)
    (grad,) = torch.autograd.grad(feats, x, grad_out.to(feats.dtype))
    return {"features": feats.detach().float(), "grad images": grad.float()}


def make_encoder_data(batch: int) -> dict:
    """The frozen CLIP and the inputs (make_e2e's), a fixed upstream gradient, and open_clip's attention's
    outputs in fp32 (the reference) and, on CUDA, under bf16 autocast (which sets the limits)."""
    data = make_e2e(classes=10, batch=batch)
    width = data["clip"].visual.transformer.width
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    data["grad_out"] = torch.randn(batch, width, generator=gen, device=DEVICE)
    reference = build_encoder(data, "open_clip")
    data["want"] = encoder_outputs(reference, data["images"], data["grad_out"], autocast=False)
    data["eager"] = encoder_outputs(reference, data["images"], data["grad_out"], autocast=True) if ON_GPU else None
    p = data["params"]
    data["params"] = {"model": p["model"], "image_size": p["image_size"], "batch": batch, "precision": p["precision"],
                      "passes": "visual_features(adapters=False) forward + gradient of the images"}
    del reference
    timing.free_memory()
    return data


@pytest.fixture(scope="module")
def encoder_data(e2e_settings):
    data = make_encoder_data(e2e_settings["batch"])
    yield data
    del data
    timing.free_memory()


def skip_reason(attention: str) -> str | None:
    """Why this attention cannot run here, or None."""
    if attention == "xformers":
        runs, why = environment.xformers_status()
        return None if runs else why
    return None


def kernel_name(attention: str) -> str:
    """What ran: the SDPA kernel (probed), or xformers with the operators its dispatcher chose."""
    if attention == "sdpa":
        return environment.sdpa_kernel()
    if attention == "xformers":
        return f"xformers ({', '.join(xformers_ops_used()) or 'operator unknown'})"
    return attention


def check_against_open_clip(data: dict, model: SageModel) -> ErrorCheck:
    got = encoder_outputs(model, data["images"], data["grad_out"], autocast=ON_GPU)
    return check_error(got, data["want"], PRECISION, data["eager"])


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_encoder_fwdbwd(attention, encoder_data, benchmark, recorder):
    benchmark.group = "encoder"
    reason = skip_reason(attention)
    if reason:
        pytest.skip(reason)
    timing.free_memory()
    model = build_encoder(encoder_data, attention)
    check = check_against_open_clip(encoder_data, model)
    images, grad_out = encoder_data["images"], encoder_data["grad_out"]
    x = images.detach().clone().requires_grad_(True)

    def step():
        with bf16_autocast(ON_GPU):
            feats = model.visual_features(x, adapters=False)
        return torch.autograd.grad(feats, x, grad_out.to(feats.dtype))

    timing.reset_peak_memory()
    measured = timing.run_benchmark(benchmark, step, timing.default_plan(step=True))
    if measured is not None:
        batch = encoder_data["params"]["batch"]
        recorder.add({
            "group": "encoder",
            "case": "fwdbwd",
            "impl": attention,
            "params": dict(encoder_data["params"]),
            "attention": attention,
            "attention_kernel": kernel_name(attention),
            **measured.record_fields(),
            "images_per_s": batch / measured.median_s,
            **timing.peak_memory_fields(),
            **check.record_fields(),
        }, benchmark.extra_info)
    assert_error_ok(check, f"encoder fwdbwd {attention}")
    del model
    timing.free_memory()
