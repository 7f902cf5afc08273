"""The model's hyperparameters: one dataclass, the single source of their names, types and defaults.

`build_sage` builds from it, `SageModel` keeps it, and the run config (`sage_fast.training.config`)
uses it as its ``model`` section, so a hyperparameter is declared here and nowhere else; its numbers'
ranges are checked by `check_model_config`, for the API and the run config alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

from ..ops.checks import check_alpha, check_gamma, check_lambdas, check_mu, check_positive


@dataclass
class ModelConfig:
    #: open_clip architecture; "sage-tiny" (32 px, 2 blocks) ships with the package for the demo and tests
    name: str = "ViT-B-16-quickgelu"
    #: open_clip tag, a local checkpoint path, or null for random initialisation
    pretrained: Optional[str] = "openai"
    #: adapter bottleneck r; null: LIFT's rule from the number of classes (sage_fast.lift_bottleneck)
    bottleneck: Optional[int] = None
    #: the adapter's activation mix alpha * relu(h) + (1 - alpha) * h
    alpha: float = 0.1
    #: compensation factor Lambda_k = mu * n_k^gamma * S_N / (C n_min) of the loss
    mu: float = 0.5
    gamma: float = 0.05
    #: the loss l: "compensated" (Eq. 22), "la" (logit adjustment with log n_k, tau = 1, no compensation
    #: factor) or "ce" (plain cross-entropy); with FIT, each of its four terms. mu, gamma: "compensated" only
    loss: Literal["compensated", "la", "ce"] = "compensated"
    #: FIT's weights of l(zv), l(zt), l(z^)
    lambdas: List[float] = field(default_factory=lambda: [0.015, 0.015, 0.4])
    #: train with FIT (the frozen zero-shot path and its four-term loss)
    fit: bool = True
    #: the adapter in every block: "sg" (the SG-Adapter) or "adaptformer" (LIFT's AdaptFormer: LayerNorm,
    #: down, ReLU, up; no guidance, alpha and text_proj unused). Ablations of Tables 5, 6, 10, 11
    adapter: Literal["sg", "adaptformer"] = "sg"
    #: the SG-Adapter's text projection W_proj^vt; false: f_vt = f_t * f_v (Tables 10 to 12)
    text_proj: bool = True
    #: the classifier's initial rows: "templates" (the mean over the 60 templates) or "single"
    #: (LIFT's one prompt "a photo of a {}.")
    classifier_init: Literal["templates", "single"] = "templates"
    #: "auto": the Triton kernels on CUDA, the folded PyTorch adapter elsewhere; "triton"; "torch": the reference
    backend: Literal["auto", "triton", "torch"] = "auto"
    attention: Literal["auto", "sdpa", "xformers", "open_clip"] = "auto"
    #: the cosine classifier's logit scale
    logit_scale: float = 25.0
    #: prompts per text-encoder batch when the classifier is initialised from the templates
    text_batch_size: int = 256
    #: activation checkpointing of the visual blocks, each frozen block together with its adapter: false
    #: (off), true (every block), or an int k >= 1 (every k-th block: k, 2k, ... counted from 1). A
    #: checkpointed block keeps only its input for backward and runs again there: 7x less activation
    #: memory for ViT-B/16 and ViT-L/14 with every block (sage_fast.model.memory) for one more forward
    #: of those blocks. The same loss and gradients; FIT's frozen pass keeps nothing either way
    grad_checkpoint: Union[bool, int] = False


def check_model_config(cfg: ModelConfig, prefix: str = "") -> None:
    """Raise ValueError (TypeError for a non-number) naming the first field out of its range.

    The ranges are the ops' (`sage_fast.ops.checks`): alpha in [0, 1], mu > 0, gamma in [0, 10], lambdas
    three numbers >= 0, logit_scale > 0, all finite; bottleneck (unless null) and text_batch_size positive;
    grad_checkpoint false, true or k >= 1.
    prefix: put before each field's name in the message ("model." for the run config's keys).
    """
    check_alpha(cfg.alpha, f"{prefix}alpha")
    check_mu(cfg.mu, f"{prefix}mu")
    check_gamma(cfg.gamma, f"{prefix}gamma")
    check_lambdas(cfg.lambdas, f"{prefix}lambdas")
    check_positive(f"{prefix}logit_scale", cfg.logit_scale)
    check_positive(f"{prefix}text_batch_size", cfg.text_batch_size)
    if cfg.bottleneck is not None:
        check_positive(f"{prefix}bottleneck", cfg.bottleneck)
    try:
        checkpoint_every(cfg.grad_checkpoint)
    except ValueError as err:
        raise ValueError(f"{prefix}{err}") from None


def checkpoint_every(value: Union[bool, int]) -> int:
    """`ModelConfig.grad_checkpoint` as a block stride: 0 (off), else k (blocks i with (i + 1) % k == 0 are checkpointed).

    ValueError for anything but a bool or an int >= 1.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value >= 1:
        return value
    raise ValueError(f"grad_checkpoint must be false, true or a block stride k >= 1, got {value!r}")
