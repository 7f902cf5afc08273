"""The Sage model on a frozen open_clip ViT (SAGE.md section 1 and 2).

`build_sage` loads CLIP, freezes both encoders, puts an SG-Adapter and a learnable scale s in
every visual block (Eq. 9), initialises the cosine classifier from the 60 templates and keeps
the frozen zero-shot path (image features without adapters, text classifier W_zs) for FIT.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import tempfile
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import SGAdapter, lift_bottleneck
from .losses import CompensatedLALoss, FITLoss
from .templates import TEMPLATES, prompts_for

ADAPTER_IMPLS = ("auto", "fused", "reference")
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "open_clip")


class SageOutput(NamedTuple):
    """Logits of one forward pass, each (B, C) fp32.

    z = W f, zv = W f_zs, zt = W_zs f and z_hat = z + s1 zv + s2 zt. Without FIT, zv and zt are
    None and z_hat is z.
    """

    z: torch.Tensor
    zv: Optional[torch.Tensor]
    zt: Optional[torch.Tensor]
    z_hat: torch.Tensor


# --------------------------------------------------------------------------------------------
# CLIP loading


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def register_tiny_clip_config(name: str = "sage-tiny", config: Optional[dict] = None) -> str:
    """Register a small open_clip architecture (32 px images, 2 blocks of width 64) and return its name.

    For tests and the demo: it builds in a fraction of a second with random weights.
    """
    import open_clip

    if name in open_clip.list_models():
        return name
    folder = tempfile.mkdtemp(prefix="sage_fast_cfg_")
    with open(os.path.join(folder, f"{name}.json"), "w") as fh:
        json.dump(config or TINY_CLIP_CONFIG, fh)
    open_clip.add_model_config(folder)
    return name


_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _looks_like_path(pretrained: Optional[str]) -> bool:
    if not pretrained:
        return False
    text = str(pretrained)
    return os.path.exists(text) or os.path.sep in text or text.endswith(_CHECKPOINT_SUFFIXES)


def load_clip(model_name: str = "ViT-B-16-quickgelu", pretrained: Optional[str] = "openai", device="cpu"):
    """Create an open_clip model, frozen and in eval mode.

    pretrained: an open_clip tag (e.g. "openai", downloaded by open_clip), a local checkpoint file
    (.safetensors, or a .pt / .bin / .pth state dict, read with ``weights_only=True``), or None for
    random weights. OpenAI's weights need QuickGELU: use ``ViT-B-16-quickgelu``.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}; known: e.g. ViT-B-16-quickgelu, ViT-B-16")
    if _looks_like_path(pretrained):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"checkpoint file not found: {pretrained}")
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        # open_clip's loader reads safetensors or torch.load(weights_only=True), never a full unpickle.
        try:
            open_clip.load_checkpoint(model, str(pretrained), strict=True, weights_only=True)
        except RuntimeError as err:
            if "TorchScript" not in str(err):
                raise
            raise ValueError(
                f"{pretrained} is a TorchScript archive (OpenAI's original .pt): save its state_dict as a "
                "plain .pt or .safetensors file, or use pretrained='openai'"
            ) from err
    else:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, device="cpu")
    model.requires_grad_(False)
    return model.eval().to(device)


# --------------------------------------------------------------------------------------------
# Frozen attention with a choice of kernel


@functools.lru_cache(maxsize=1)
def _xformers_available() -> bool:
    # Cached: visual_features resolves the attention backend on every forward.
    return importlib.util.find_spec("xformers") is not None


def resolve_attention(attention: str, device: torch.device) -> str:
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    if attention == "auto":
        return "xformers" if (device.type == "cuda" and _xformers_available()) else "sdpa"
    if attention == "xformers" and not _xformers_available():
        raise RuntimeError("attention='xformers' but xformers is not installed (pip install 'sage-fast[xformers]')")
    return attention


def frozen_self_attention(mha: nn.MultiheadAttention, x: torch.Tensor, backend: str) -> torch.Tensor:
    """Self-attention of open_clip's nn.MultiheadAttention on x (B, N, d), no mask.

    Same weights and result as ``mha(x, x, x, need_weights=False)[0]``; the kernel is PyTorch SDPA
    (FlashAttention / memory-efficient on CUDA) or xformers' memory-efficient attention.
    """
    b, n, d = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, heads, d // heads)
    if backend == "xformers" and x.is_cuda:
        import xformers.ops as xops

        q, k, v = qkv.unbind(2)                               # (B, N, H, hd) each
        out = xops.memory_efficient_attention(q, k, v)
    else:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)        # (B, H, N, hd) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return mha.out_proj(out.reshape(b, n, d))


# --------------------------------------------------------------------------------------------
# The model


def resolve_adapter_impl(adapter_impl: str, device: torch.device) -> str:
    """"auto" -> "fused" on CUDA, "reference" elsewhere; "fused" and "reference" pass through."""
    if adapter_impl not in ADAPTER_IMPLS:
        raise ValueError(f"adapter_impl must be one of {ADAPTER_IMPLS}, got {adapter_impl!r}")
    if adapter_impl == "auto":
        return "fused" if device.type == "cuda" else "reference"
    return adapter_impl


def _make_adapter(impl: str, dim: int, bottleneck: int, alpha: float) -> nn.Module:
    if impl == "reference":
        return SGAdapter(dim, bottleneck, alpha)
    try:
        from .fused_adapter import SGAdapterFused
    except ImportError as err:  # pragma: no cover - only while the fused module is missing
        raise RuntimeError(f"adapter_impl='fused' needs sage_fast.fused_adapter: {err}") from err
    return SGAdapterFused(dim, bottleneck, alpha)


class SageModel(nn.Module):
    """Sage: frozen CLIP ViT with an SG-Adapter and a scale s per visual block, a cosine classifier,
    and FIT's frozen zero-shot path.

    Build with `build_sage`. Trainable: `adapters`, `block_scales`, `classifier` and, with FIT,
    `criterion.s1`, `criterion.s2`; everything under `clip` is frozen and stays in eval mode.
    """

    def __init__(
        self,
        clip: nn.Module,
        class_names: Sequence[str],
        class_counts: Sequence[int],
        classifier_init: torch.Tensor,
        bottleneck: Optional[int] = None,
        alpha: float = 0.1,
        mu: float = 0.5,
        gamma: float = 0.05,
        lambdas: Sequence[float] = (0.015, 0.015, 0.4),
        fit: bool = True,
        adapter_impl: str = "reference",
        loss_backend: str = "auto",
        attention: str = "auto",
        logit_scale: float = 25.0,
    ):
        super().__init__()
        visual = clip.visual
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
            raise ValueError("Sage needs an open_clip VisionTransformer with standard ResidualAttentionBlocks")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError("Sage uses the class token: the visual tower must have pool_type='tok' and no attention pool")
        if len(class_names) != len(class_counts):
            raise ValueError(f"{len(class_names)} class names but {len(class_counts)} class counts")
        # "auto": where the backbone lives now; `build_sage` resolves it for the target device.
        adapter_impl = resolve_adapter_impl(adapter_impl, next(clip.parameters()).device)

        self.clip = clip
        self.dim = visual.transformer.width
        self.num_layers = len(blocks)
        self.class_names = list(class_names)
        self.class_counts = [int(c) for c in class_counts]
        self.bottleneck = int(bottleneck) if bottleneck else lift_bottleneck(len(class_names), self.num_layers)
        self.alpha = float(alpha)
        self.fit = bool(fit)
        self.logit_scale = float(logit_scale)
        self.attention = attention
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

        if classifier_init.shape != (len(class_names), self.dim):
            raise ValueError(f"classifier_init must be ({len(class_names)}, {self.dim}), got {tuple(classifier_init.shape)}")
        self.adapter_impl = "reference"
        self.adapters = nn.ModuleList(
            SGAdapter(self.dim, self.bottleneck, self.alpha) for _ in range(self.num_layers)
        )
        if adapter_impl == "fused":
            self.set_adapter_impl("fused")
        # One finiteness check of all trainable parameters per forward (one host sync), instead of
        # one per fused adapter: NaN weights raise a clear error rather than giving NaN logits.
        self.check_finite = True
        self.block_scales = nn.Parameter(torch.ones(self.num_layers))   # LIFT: learnable, starts at 1
        self.classifier = nn.Parameter(classifier_init.detach().clone().float())
        self.register_buffer("zs_classifier", classifier_init.detach().clone().float())  # W_zs, frozen
        if self.fit:
            self.criterion = FITLoss(class_counts, mu, gamma, lambdas, backend=loss_backend)
        else:
            self.criterion = CompensatedLALoss(class_counts, mu, gamma, backend=loss_backend)
        self.clip.requires_grad_(False)

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # frozen backbone: always eval
        return self

    def set_adapter_impl(self, impl: str) -> None:
        """Swap every adapter between the fused module and the reference, keeping the weights.

        The adapters become new modules: build the optimizer after choosing the implementation.
        """
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        new = nn.ModuleList()
        for old in self.adapters:
            fresh = _make_adapter(impl, self.dim, self.bottleneck, self.alpha)
            fresh.load_state_dict(old.state_dict())
            if hasattr(fresh, "check_finite"):
                fresh.check_finite = False  # the model checks all its parameters at once per forward
            new.append(fresh.to(device=old.up.weight.device, dtype=old.up.weight.dtype))
        self.adapters = new
        self.adapter_impl = impl

    def trainable_parameters(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def trainable_state_dict(self) -> dict:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict) -> None:
        own = dict(self.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(f"trainable state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                if own[n].shape != t.shape:
                    raise ValueError(f"{n}: shape {tuple(t.shape)} does not match {tuple(own[n].shape)}")
                own[n].copy_(t)

    def check_parameters_finite(self) -> None:
        """Raise ValueError naming the first trainable parameter that holds NaN or Inf (one host sync)."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        # foreach max-abs: one fused pass over all parameters; NaN and Inf propagate into the maxima.
        maxima = torch._foreach_norm([p.detach() for _, p in named], float("inf"))
        finite = torch.isfinite(torch.stack(maxima))
        if not bool(finite.all()):
            bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
            raise ValueError(f"trainable parameters hold NaN or Inf: {', '.join(bad[:5])}")

    # -- forward ------------------------------------------------------------------------------
    def guidance(self) -> torch.Tensor:
        """g: the mean of the L2-normalised classifier rows, (d,). Gradients reach W through it."""
        return F.normalize(self.classifier, dim=-1).mean(dim=0)

    def visual_features(self, images: torch.Tensor, adapters: bool = True) -> torch.Tensor:
        """ln_post of the class token, without the visual projection: (B, d).

        adapters=False is the frozen zero-shot encoder (f_zs).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        visual = self.clip.visual
        backend = resolve_attention(self.attention, images.device)
        if adapters and self.check_finite and not torch.compiler.is_compiling():
            self.check_parameters_finite()
        x = visual._embeds(images)                                   # (B, N, d)
        g = self.guidance() if adapters else None
        for i, block in enumerate(visual.transformer.resblocks):
            if backend == "open_clip":
                attn = block.attention(block.ln_1(x))
            else:
                attn = frozen_self_attention(block.attn, block.ln_1(x), backend)
            f = x + block.ls_1(attn)                                 # f~
            mlp_out = block.ls_2(block.mlp(block.ln_2(f)))
            if adapters:
                x = self.adapters[i].forward_block(f, g, mlp_out, self.block_scales[i])
            else:
                x = f + mlp_out
        return visual.ln_post(x[:, 0])

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
        """(scalar loss, z_hat): FIT's four-term loss, or the compensated LA loss without FIT."""
        if self.fit:
            return self.criterion(out.z, out.zv, out.zt, target)
        return self.criterion(out.z, target), out.z

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """z_hat (B, C): the logits predictions take the argmax of."""
        return self(images).z_hat


# --------------------------------------------------------------------------------------------
# Classifier initialisation and the builder


@torch.no_grad()
def text_classifier(clip, tokenizer, class_names: Sequence[str], templates=TEMPLATES, batch_size: int = 256,
                    progress: bool = True) -> torch.Tensor:
    """W (C, d): per class, the mean of the normalised text embeddings of the templates, mapped into the
    visual width with the transpose of the frozen visual projection, re-normalised."""
    from tqdm.auto import tqdm

    device = next(clip.parameters()).device
    proj = getattr(clip.visual, "proj", None)
    # All prompts of all classes in batches of batch_size (iNaturalist: 8,142 x 60 prompts); each
    # normalised embedding is summed into its class's row, so memory stays at C x embed_dim.
    prompts = [(k, p) for k, name in enumerate(class_names) for p in prompts_for(name, templates)]
    sums, counts = None, torch.zeros(len(class_names), device=device)
    for start in tqdm(range(0, len(prompts), batch_size), desc="classifier init", disable=not progress,
                      unit="batch"):
        chunk = prompts[start:start + batch_size]
        labels = torch.tensor([k for k, _ in chunk], device=device)
        emb = F.normalize(clip.encode_text(tokenizer([p for _, p in chunk]).to(device)).float(), dim=-1)
        if sums is None:
            sums = torch.zeros(len(class_names), emb.shape[1], device=device)
        sums.index_add_(0, labels, emb)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
    text = F.normalize(sums / counts[:, None], dim=-1)                  # (C, embed_dim)
    if proj is not None:
        text = text @ proj.float().t()                                   # (C, d)
    return F.normalize(text, dim=-1)


@functools.lru_cache(maxsize=8)
def _tokenizer(model_name: str):
    """open_clip's tokenizer, built once per model name (loading the BPE vocabulary takes seconds)."""
    import open_clip

    return open_clip.get_tokenizer(model_name)


def build_sage(
    class_names: Sequence[str],
    class_counts: Sequence[int],
    model_name: str = "ViT-B-16-quickgelu",
    pretrained: Optional[str] = "openai",
    bottleneck: Optional[int] = None,
    alpha: float = 0.1,
    mu: float = 0.5,
    gamma: float = 0.05,
    lambdas: Sequence[float] = (0.015, 0.015, 0.4),
    fit: bool = True,
    adapter_impl: str = "auto",
    loss_backend: str = "auto",
    attention: str = "auto",
    logit_scale: float = 25.0,
    device="cpu",
    text_batch_size: int = 256,
    progress: bool = True,
) -> SageModel:
    """Build Sage on an open_clip model; see `SageModel` and SAGE.md section 1.

    adapter_impl "auto" takes the fused adapter on CUDA and the reference elsewhere.
    """
    device = torch.device(device)
    adapter_impl = resolve_adapter_impl(adapter_impl, device)
    resolve_attention(attention, device)  # fail early on a bad choice
    clip = load_clip(model_name, pretrained, device)
    tokenizer = _tokenizer(model_name)
    init = text_classifier(clip, tokenizer, class_names, batch_size=text_batch_size, progress=progress)
    model = SageModel(
        clip, class_names, class_counts, init.cpu(), bottleneck=bottleneck, alpha=alpha, mu=mu, gamma=gamma,
        lambdas=lambdas, fit=fit, adapter_impl="reference", loss_backend=loss_backend, attention=attention,
        logit_scale=logit_scale,
    ).to(device)
    if adapter_impl == "fused":
        model.set_adapter_impl("fused")
    return model
