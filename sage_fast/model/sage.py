"""Sage on a frozen open_clip ViT: an SG-Adapter and a learnable scale in every visual block (Eq. 9),
a cosine classifier initialised from the 60 templates, and FIT's frozen zero-shot path (docs/method.md).

`build_sage` loads CLIP, freezes it, initialises the classifier and builds `SageModel` from a
`ModelConfig` (the one list of hyperparameters). Its ablation switches (``adapter``, ``text_proj``,
``classifier_init``, ``loss``; docs/method.md, "Ablation switches") choose what is built, once.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import AdaptFormerFused, CompensatedLALoss, FITLoss, SGAdapterFused, lift_bottleneck
from ..ops.backend import check_backend, explain_backend
from .attention import explain_attention, frozen_self_attention, resolve_attention, xformers_ops_used
from .classifier import cached_text_classifier
from .clip import load_clip, tokenizer
from .config import ModelConfig, check_model_config, checkpoint_every
from .templates import CLASSIFIER_TEMPLATES


class SageOutput(NamedTuple):
    """Logits of one forward pass, each (B, C) fp32.

    z = W f, zv = W f_zs, zt = W_zs f and z_hat = z + s1 zv + s2 zt. Without FIT, zv and zt are
    None and z_hat is z.
    """

    z: torch.Tensor
    zv: Optional[torch.Tensor]
    zt: Optional[torch.Tensor]
    z_hat: torch.Tensor


_ALIASES = {"model_name": "name"}


def model_config(config: Optional[ModelConfig] = None, **fields) -> ModelConfig:
    """`config` (default: `ModelConfig()`) with `fields` replaced; ``model_name`` is an alias of ``name``.

    An unknown field is a TypeError naming the valid ones; a value outside a field's choices (its
    Literal type) or its range (`check_model_config`: grad_checkpoint too) is a ValueError naming them.
    """
    config = config or ModelConfig()
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {_ALIASES.get(k, k): v for k, v in fields.items()}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise TypeError(f"unknown model settings {unknown}; valid: {sorted(valid)}")
    if "lambdas" in fields:
        fields["lambdas"] = [float(v) for v in fields["lambdas"]]
    config = dataclasses.replace(config, **fields)
    for name, tp in typing.get_type_hints(ModelConfig).items():
        if typing.get_origin(tp) is typing.Literal and getattr(config, name) not in typing.get_args(tp):
            raise ValueError(f"{name} must be one of {typing.get_args(tp)}, got {getattr(config, name)!r}")
    check_model_config(config)
    return config


class WeightsMismatchError(ValueError):
    """Trained weights whose names or shapes do not fit the model built from the config."""

    user_error = True  # the `sage-fast` command prints it as one line (model does not import training)


class SageModel(nn.Module):
    """Sage: frozen CLIP ViT with an SG-Adapter and a scale s per visual block, a cosine classifier,
    and FIT's frozen zero-shot path.

    Build with `build_sage`. Trainable: `adapters`, `block_scales`, `classifier` and, with FIT,
    `criterion.s1`, `criterion.s2`; everything under `clip` is frozen and stays in eval mode.
    `adapters` are `SGAdapterFused` (config ``adapter="sg"``, with or without ``text_proj``) or
    `AdaptFormerFused` (``adapter="adaptformer"``, which takes no guidance).
    """

    def __init__(
        self,
        clip: nn.Module,
        class_names: Sequence[str],
        class_counts: Sequence[int],
        classifier_init: torch.Tensor,
        config: Optional[ModelConfig] = None,
        **fields,
    ):
        super().__init__()
        cfg = model_config(config, **fields)
        check_backend(cfg.backend)
        visual = clip.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
            raise ValueError("Sage needs an open_clip VisionTransformer with standard ResidualAttentionBlocks")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("Sage uses the class token: the visual tower must have pool_type='tok' and no attention pool")
        if len(class_names) != len(class_counts):
            raise ValueError(f"{len(class_names)} class names but {len(class_counts)} class counts")
        self.config = cfg
        self.clip = clip
        self.dim = visual.transformer.width
        self.num_layers = len(blocks)
        self.class_names = list(class_names)
        self.class_counts = [int(c) for c in class_counts]
        self.bottleneck = int(cfg.bottleneck) if cfg.bottleneck else lift_bottleneck(len(class_names), self.num_layers)
        self.alpha = float(cfg.alpha)
        self.fit = bool(cfg.fit)
        # AdaptFormer takes no guidance: the classifier is then trained through the logits only.
        self.guided = cfg.adapter == "sg"
        self.logit_scale = float(cfg.logit_scale)
        self.attention = cfg.attention
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

        if classifier_init.shape != (len(class_names), self.dim):
            raise ValueError(f"classifier_init must be ({len(class_names)}, {self.dim}), got {tuple(classifier_init.shape)}")
        if self.guided:
            make = lambda: SGAdapterFused(  # noqa: E731
                self.dim, self.bottleneck, self.alpha, backend=cfg.backend, text_proj=cfg.text_proj
            )
        else:
            make = lambda: AdaptFormerFused(self.dim, self.bottleneck, backend=cfg.backend)  # noqa: E731
        self.adapters = nn.ModuleList(make() for _ in range(self.num_layers))
        for adapter in self.adapters:
            adapter.check_finite = False  # the model checks all its parameters at once per forward
        # One finiteness check of all trainable parameters per forward (one host sync), instead of
        # one per fused adapter: NaN weights raise a clear error rather than giving NaN logits.
        self.check_finite = True
        self.block_scales = nn.Parameter(torch.ones(self.num_layers))   # LIFT: learnable, starts at 1
        self.classifier = nn.Parameter(classifier_init.detach().clone().float())
        self.register_buffer("zs_classifier", classifier_init.detach().clone().float())  # W_zs, frozen
        if self.fit:
            self.criterion = FITLoss(class_counts, cfg.mu, cfg.gamma, cfg.lambdas, backend=cfg.backend,
                                     adjustment=cfg.loss)
        else:
            self.criterion = CompensatedLALoss(class_counts, cfg.mu, cfg.gamma, backend=cfg.backend,
                                               adjustment=cfg.loss)
        self.clip.requires_grad_(False)

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen backbone: always eval
        return self

    @property
    def backend(self) -> str:
        """"auto" | "triton" | "torch" of the adapters and the loss (see `sage_fast.ops.backend`)."""
        return self.config.backend

    def set_backend(self, backend: str) -> None:
        """Switch the adapters and the loss to another backend; the modules and weights stay as they are."""
        check_backend(backend)
        self.config = dataclasses.replace(self.config, backend=backend)
        for adapter in self.adapters:
            adapter.backend = backend
        self.criterion.backend = backend

    def trainable_parameters(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_parameter_counts(self) -> Dict[str, int]:
        """Trainable numbers per part: "adapters", "block_scales", "classifier" and "fit" (s1, s2; 0
        without FIT). They sum to `num_trainable_parameters`; the paper's adapter counts (Table 12)
        are adapters + block_scales."""
        counts = {"adapters": 0, "block_scales": 0, "classifier": 0, "fit": 0}
        for name, p in self.named_parameters():
            if p.requires_grad:
                part = name.split(".")[0]
                counts["fit" if part == "criterion" else part] += p.numel()
        return counts

    def trainable_state_dict(self) -> dict:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict) -> None:
        own = dict(self.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise WeightsMismatchError(f"trained weights do not fit this model: missing {sorted(missing)[:5]}, "
                                       f"unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                if own[n].shape != t.shape:
                    raise WeightsMismatchError(f"{n}: shape {tuple(t.shape)} does not match {tuple(own[n].shape)}")
                own[n].copy_(t)

    def finite_parameters(self):
        """(names, mask): the trainable parameters' names and a bool tensor on their device, True where a
        parameter holds no NaN / Inf. No host sync: the caller decides when to read it."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        # foreach max-abs: one fused pass over all parameters; NaN and Inf propagate into the maxima.
        maxima = torch._foreach_norm([p.detach() for _, p in named], float("inf"))
        return [n for n, _ in named], torch.isfinite(torch.stack(maxima))

    def check_parameters_finite(self) -> None:
        """Raise ValueError naming the first trainable parameter that holds NaN or Inf (one host sync)."""
        names, finite = self.finite_parameters()
        if not bool(finite.all()):
            bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
            raise ValueError(f"trainable parameters hold NaN or Inf: {', '.join(bad[:5])}")

    def runtime(self, dtype: Optional[torch.dtype] = None) -> dict:
        """What runs in this model, as plain data (JSON-ready; the run folder keeps it).

        Keys: device; adapter and loss (kind, then `sage_fast.ops.backend.explain_backend`: requested,
        resolved "triton" | "torch", path, reason, fallback, self_check); attention
        (`explain_attention`, xformers probed only when it is the setting, plus ran: the kernel the
        last forward used, and xformers_ops: the xformers operators it dispatched to); forward_seen.
        Device and adapter dtype are the last forward's (autocast's dtype, or the tokens'), else the
        parameters' device and fp32; `dtype` overrides the adapter's. The loss is explained in fp32,
        the dtype of the logits. Runs the kernels' self-check where it has not run.
        """
        ran = getattr(self, "_ran", None) or {}
        device = ran.get("device", self.classifier.device)
        adapter_dtype = dtype or ran.get("adapter_dtype", torch.float32)
        attention = explain_attention(self.attention, device, probe_xformers=self.attention == "xformers")
        attention["ran"] = ran.get("attention")
        attention["xformers_ops"] = xformers_ops_used() if ran.get("attention") == "xformers" else []
        return {
            "device": str(device),
            "adapter": {"kind": self.config.adapter,
                        **explain_backend("adapter", self.backend, device, adapter_dtype)},
            "loss": {"kind": type(self.criterion).__name__,
                     **explain_backend("loss", self.backend, device, torch.float32)},
            "attention": attention,
            "forward_seen": bool(ran),
        }

    # -- forward ------------------------------------------------------------------------------
    def guidance(self) -> torch.Tensor:
        """g: the mean of the L2-normalised classifier rows, (d,). Gradients reach W through it.
        Computed for the SG-Adapter only (AdaptFormer takes none)."""
        return F.normalize(self.classifier, dim=-1).mean(dim=0)

    def visual_features(self, images: torch.Tensor, adapters: bool = True) -> torch.Tensor:
        """ln_post of the class token, without the visual projection: (B, d).

        adapters=False is the frozen zero-shot encoder (f_zs). With config ``grad_checkpoint`` and gradients
        enabled, the blocks it names keep only their input for backward (`torch.utils.checkpoint`).
        """
        self.check_images(images)
        visual = self.clip.visual
        backend = resolve_attention(self.attention, images.device)
        if adapters and self.check_finite and not torch.compiler.is_compiling():
            self.check_parameters_finite()
        x = visual._embeds(images)                                   # (B, N, d)
        if adapters and not torch.compiler.is_compiling():  # what ran, for `runtime`
            dev = images.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            self._ran = {"device": images.device, "attention": backend, "adapter_dtype": dtype}
        g = self.guidance() if adapters and self.guided else None
        every = checkpoint_every(self.config.grad_checkpoint) if torch.is_grad_enabled() else 0
        for i in range(self.num_layers):
            if every and (i + 1) % every == 0:
                # Keeps only the block's input (and g) for backward; the block runs again in backward.
                # No random op runs in a frozen block (CLIP is in eval mode), so no RNG state is kept.
                x = checkpoint(self._block, i, x, g, backend, adapters, use_reentrant=False,
                               preserve_rng_state=False)
            else:
                x = self._block(i, x, g, backend, adapters)
        return visual.ln_post(x[:, 0])

    def check_images(self, images: torch.Tensor) -> None:
        """images must be a floating-point (B, 3, S, S) tensor, S = `image_size` (the ViT's position
        embeddings fix it); TypeError / ValueError saying what differs."""
        s = self.image_size
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, 3, {s}, {s}), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (RGB scaled to [0, 1], then normalised with "
                            f"CLIP's mean and std), got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (s, s):
            raise ValueError(f"images must have shape (B, 3, {s}, {s}) for this model (model.image_size = {s}), "
                             f"got {tuple(images.shape)}")

    def _block(self, i: int, x: torch.Tensor, g: Optional[torch.Tensor], backend: str, adapters: bool) -> torch.Tensor:
        """Visual block i with its adapter (Eq. 9), or frozen alone: x (B, N, d) -> (B, N, d)."""
        block = self.clip.visual.transformer.resblocks[i]
        if backend == "open_clip":
            attn = block.attention(block.ln_1(x))
        else:
            attn = frozen_self_attention(block.attn, block.ln_1(x), backend)
        f = x + block.ls_1(attn)                                     # f~
        mlp_out = block.ls_2(block.mlp(block.ln_2(f)))
        if not adapters:
            return f + mlp_out
        if self.guided:
            return self.adapters[i].forward_block(f, g, mlp_out, self.block_scales[i])
        return self.adapters[i].forward_block(f, mlp_out, self.block_scales[i])

    def _cosine(self, weight: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=feats.device.type, enabled=False):
            return self.logit_scale * F.normalize(feats.float(), dim=-1) @ F.normalize(weight.float(), dim=-1).t()

    def forward(self, images: torch.Tensor) -> SageOutput:
        feats = self.visual_features(images, adapters=True)
        z = self._cosine(self.classifier, feats)
        if not self.fit:
            return SageOutput(z, None, None, z)
        with torch.no_grad():  # f_zs is frozen: no graph for the second pass
            feats_zs = self.visual_features(images, adapters=False)
        zv = self._cosine(self.classifier, feats_zs)
        zt = self._cosine(self.zs_classifier, feats)
        return SageOutput(z, zv, zt, self.criterion.combine(z, zv, zt))

    def loss(self, out: SageOutput, target: torch.Tensor):
        """(scalar loss, z_hat): FIT's four-term loss, or l(z) without FIT; l is config ``loss``."""
        if self.fit:
            return self.criterion(out.z, out.zv, out.zt, target)
        return self.criterion(out.z, target), out.z

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """z_hat (B, C): the logits predictions take the argmax of."""
        return self(images).z_hat


def build_sage(
    class_names: Sequence[str],
    class_counts: Sequence[int],
    config: Optional[ModelConfig] = None,
    *,
    device="cpu",
    progress: bool = True,
    cache_dir=None,
    **fields,
) -> SageModel:
    """Load CLIP, initialise the classifier from the templates and build `SageModel` on `device`.

    The prompts are config ``classifier_init``'s: the 60 templates, or LIFT's single one; they are
    part of the classifier cache's key.

    config: a `ModelConfig`; keyword arguments replace its fields (``model_name`` is an alias of
    ``name``), e.g. ``build_sage(names, counts, model_name="ViT-B-16-quickgelu", pretrained="openai")``.
    cache_dir: where the initialised classifier is cached (`cached_text_classifier`): a folder; None:
    $SAGE_FAST_CACHE, else ~/.cache/sage-fast; False: no cache. Random weights (pretrained=None) are
    never cached.
    """
    cfg = model_config(config, **fields)
    device = torch.device(device)
    check_backend(cfg.backend)
    resolve_attention(cfg.attention, device)  # fail early on a bad choice
    clip = load_clip(cfg.name, cfg.pretrained, device)
    init = cached_text_classifier(clip, tokenizer(cfg.name), class_names, model_name=cfg.name,
                                  pretrained=cfg.pretrained, cache_dir=cache_dir,
                                  templates=CLASSIFIER_TEMPLATES[cfg.classifier_init],
                                  batch_size=cfg.text_batch_size, progress=progress)
    return SageModel(clip, class_names, class_counts, init, cfg).to(device)
