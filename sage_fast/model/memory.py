"""Memory of a Sage training step: a bytes model of what autograd keeps, and its measurement on CPU.

`activation_bytes` counts, tensor by tensor, what a training step holds between forward and backward
(B images, N = (S / p)^2 + 1 tokens of width d, H heads, MLP width F, adapter hidden width 2r):

* a visual block i >= 1, not checkpointed (bytes; e_c is the matmul outputs' element size, 4 in fp32,
  2 under bf16 autocast; the residual stream and LayerNorm statistics stay fp32 under autocast):
  its input 4BNd and ln_1's mean and rstd 8BN; q, k, v 3 e_c BNd (views of one in_proj output);
  the attention output e_c BNd and its log-sum-exp 4BHN (flash-style SDPA, xformers, open_clip's
  MultiheadAttention, which calls SDPA); f~ 4BNd and ln_2's statistics 8BN; the MLP's hidden layer:
  QuickGELU keeps c_fc's output and its sigmoid, 2 e_c BNF, GELU c_fc's output, e_c BNF; under
  autocast, the bf16 copies of the block's frozen linear weights (4d^2 + 2dF + 4d + F numbers: a
  frozen weight is cast at every use, never cached, and the cast is kept for the input gradient);
  and the adapter. The frozen in/out projections and c_proj keep nothing else: their weights need
  no gradient, so their inputs are not saved.
* the adapter: Triton ("fused": the kernels keep f~, which ln_2 keeps anyway, and 8 bytes of
  LayerNorm statistics per token, 8BN, plus W_cat, b_cat: 4 (2r d + 2r)); or the folded PyTorch
  form ("folded", fp32 only, the CPU path): its LayerNorm statistics 8BN, x^ 4BNd, h and the
  activation 8BN 2r, a 4BNd (for the scale's gradient) and W_cat^T 4 (2r d). Both also keep the
  fold's small vectors, 4 (4d + r + 2).
* block 0: its input needs no gradient, so its frozen layers keep nothing; only the adapter keeps
  what it needs for its weights (fused: f~ 4BNd, 8BN, W_cat, b_cat; folded: x^, h, the activation, a).
* a checkpointed block keeps only its input, 4BNd; it runs again in backward.
* after the blocks: the last block's output 4BNd (ln_post keeps a view of its class token, which
  holds the whole tensor), and the head: the guidance, ln_post, the cosine logits and the loss,
  O(Cd + BC + Bd), counted exactly for the PyTorch loss (`head_bytes`). FIT's frozen pass keeps
  nothing (it runs under no_grad).

`SavedTensorBytes` measures the same on any device with `torch.autograd.graph.saved_tensors_hooks`:
each storage saved for backward counted once, the model's parameters and buffers left out. On the
tiny model (QuickGELU) the count above is exact for the CPU paths, folded and Triton (interpreted),
with and without checkpointing (tests/model/test_grad_checkpoint.py); the GELU and bf16 terms follow
the ops' definitions and are not measured.

`training_memory` adds the rest of a step on a GPU (the frozen CLIP in fp32, the trainable
parameters with their gradients and SGD momentum, the input batch) and an estimate of the transient
peak, and `max_batch` the largest batch that fits; README "Training at scale" tabulates them. Computed,
not measured: they leave out the CUDA context, the allocator's fragmentation and cuBLAS workspaces
(`reserve_gib` stands for them), and the transient term is an estimate (one block's forward working
set, or its recomputation plus the gradients of its largest tensors).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops import lift_bottleneck
from .config import checkpoint_every

GIB = 1024 ** 3
ADAPTER_PATHS = ("fused", "folded")


@dataclass(frozen=True)
class VisionShape:
    """The numbers of an open_clip vision tower that set its activation memory.

    tokens: N = (image_size / patch)^2 + 1. clip_params: all of CLIP (vision and text), which
    training holds in fp32. block_linear_params: one block's linear weights and biases
    (4d^2 + 2dF + 4d + F), which bf16 autocast casts at each use.
    """

    name: str
    layers: int
    width: int
    heads: int
    mlp_width: int
    image_size: int
    patch_size: int
    quick_gelu: bool
    clip_params: int
    clip_buffer_bytes: int
    block_linear_params: int

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@functools.lru_cache(maxsize=16)
def vision_shape(model_name: str, image_size: Optional[int] = None) -> VisionShape:
    """`VisionShape` of an open_clip architecture, read from a model built on the meta device (no memory,
    no weights). image_size: another input resolution than the architecture's."""
    from .clip import _open_clip, model_config

    model_config(model_name)  # a clear error for an unknown name
    extra = {"force_image_size": image_size} if image_size else {}
    with torch.device("meta"):
        clip = _open_clip().create_model(model_name, pretrained=None, device="meta", **extra)
    visual = clip.visual
    block = visual.transformer.resblocks[0]
    size = visual.image_size
    patch = visual.patch_size
    linear = [block.attn.in_proj_weight, block.attn.in_proj_bias, block.attn.out_proj.weight,
              block.attn.out_proj.bias, block.mlp.c_fc.weight, block.mlp.c_fc.bias, block.mlp.c_proj.weight,
              block.mlp.c_proj.bias]
    return VisionShape(
        name=model_name,
        layers=len(visual.transformer.resblocks),
        width=visual.transformer.width,
        heads=block.attn.num_heads,
        mlp_width=block.mlp.c_fc.out_features,
        image_size=int(size[0] if isinstance(size, (tuple, list)) else size),
        patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        quick_gelu=type(block.mlp.gelu).__name__ == "QuickGELU",
        clip_params=sum(p.numel() for p in clip.parameters()),
        clip_buffer_bytes=sum(b.numel() * b.element_size() for b in clip.buffers()),
        block_linear_params=sum(t.numel() for t in linear if t is not None),
    )


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes a training step keeps between forward and backward (`saved`: blocks + tail + head), and an
    estimate of the transient peak on top of it."""

    blocks: Tuple[int, ...]
    #: the last block's output, kept by ln_post
    tail: int
    head: int
    transient: int

    @property
    def saved(self) -> int:
        return sum(self.blocks) + self.tail + self.head


def fold_bytes(d: int, r: int) -> int:
    """The SG-Adapter fold's small vectors kept for backward (W_proj on): 4 (4d + r + 2) bytes."""
    return 4 * (4 * d + r + 2)


def block_bytes(shape: VisionShape, batch: int, bottleneck: int, *, first: bool, amp: bool, adapter: str) -> int:
    """Bytes a block that is not checkpointed keeps for backward (module docstring)."""
    if adapter not in ADAPTER_PATHS:
        raise ValueError(f"adapter must be one of {ADAPTER_PATHS}, got {adapter!r}")
    if adapter == "folded" and amp:
        raise ValueError("the folded adapter is modelled in fp32 only (under autocast on CUDA the Triton kernels run)")
    bn, d, f, h = batch * shape.tokens, shape.width, shape.mlp_width, 2 * bottleneck
    e_c = 2 if amp else 4
    fold = fold_bytes(d, bottleneck)
    if adapter == "fused":
        own = 8 * bn + 4 * (d * h + h) + fold
        if first:
            return 4 * bn * d + own                 # f~ itself: ln_2 keeps nothing in block 0
    else:
        acts = 4 * bn * d + 8 * bn * h + 4 * bn * d + fold   # x^, h and the activation, a
        if first:
            return acts
        own = acts + 8 * bn + 4 * d * h              # the LayerNorm statistics, W_cat^T
    frozen = (4 * bn * d + 8 * bn                                    # input, ln_1 statistics
              + 3 * e_c * bn * d + e_c * bn * d + 4 * batch * shape.heads * shape.tokens  # q, k, v; out, lse
              + 4 * bn * d + 8 * bn                                  # f~, ln_2 statistics
              + (2 if shape.quick_gelu else 1) * e_c * bn * f)        # the MLP's hidden layer
    if amp:
        frozen += 2 * shape.block_linear_params
    return frozen + own


def head_bytes(batch: int, num_classes: int, d: int, fit: bool) -> int:
    """The guidance, ln_post, the cosine logits and the PyTorch loss (fp32; targets int64)."""
    b, c, k = batch, num_classes, int(fit)
    return (4 * c * d * (1 + k) + 16 * c + 8 * c * k + 8 * b * d + 4 * b * d * k + 24 * b + 8 * b * k
            + 8 * b * c + 20 * b * c * k + 4 * d + 4 + 12 * k)


def activation_bytes(shape: VisionShape, batch: int, *, num_classes: int, bottleneck: Optional[int] = None,
                     amp: bool = False, adapter: str = "fused", grad_checkpoint=False,
                     fit: bool = True) -> ActivationBytes:
    """The bytes model of one Sage training step (module docstring): SG-Adapter with W_proj.

    amp: bf16 autocast (the CUDA recipe) rather than fp32. adapter: "fused" (Triton; CUDA, or the
    interpreter) or "folded" (the PyTorch fold, fp32). grad_checkpoint: `ModelConfig.grad_checkpoint`.
    bottleneck: None is LIFT's rule.
    """
    r = bottleneck or lift_bottleneck(num_classes, shape.layers)
    every = checkpoint_every(grad_checkpoint)
    bn, d, e_c = batch * shape.tokens, shape.width, 2 if amp else 4
    blocks = []
    checkpointed = False
    for i in range(shape.layers):
        if every and (i + 1) % every == 0:
            blocks.append(4 * bn * d)
            checkpointed = True
        else:
            blocks.append(block_bytes(shape, batch, r, first=i == 0, amp=amp, adapter=adapter))
    # Transient, estimated: a block's forward temporaries (the FIT pass's too), or the backward of one
    # block: its recomputation when checkpointed, plus the gradients of its MLP hidden layer and stream.
    forward_work = bn * (12 * d + e_c * (4 * d + 3 * shape.mlp_width))
    recompute = block_bytes(shape, batch, r, first=False, amp=amp, adapter=adapter) if checkpointed else 0
    backward_work = recompute + bn * (8 * d + 3 * e_c * shape.mlp_width)
    return ActivationBytes(blocks=tuple(blocks), tail=4 * bn * d, head=head_bytes(batch, num_classes, d, fit),
                           transient=max(forward_work, backward_work))


@dataclass(frozen=True)
class TrainingMemory:
    """GPU memory of a training step, bytes: `total` = the parts below. Computed, not measured."""

    clip: int            # the frozen CLIP (vision and text towers) in fp32, with its buffers
    trainable: int       # trainable parameters, their gradients and SGD momentum (3 x 4 bytes each)
    inputs: int          # the batch of fp32 images
    activations: ActivationBytes = field(repr=False)

    @property
    def total(self) -> int:
        return self.clip + self.trainable + self.inputs + self.activations.saved + self.activations.transient


def trainable_parameters(shape: VisionShape, num_classes: int, bottleneck: int, fit: bool = True) -> int:
    """L ((5r + d + 4) d + 3r + 2) + C d + 2 (FIT's s1, s2): `SageModel.num_trainable_parameters`."""
    d = shape.width
    return shape.layers * ((5 * bottleneck + d + 4) * d + 3 * bottleneck + 2) + num_classes * d + 2 * int(fit)


def training_memory(model_name: str, batch: int, *, num_classes: int, bottleneck: Optional[int] = None,
                    image_size: Optional[int] = None, grad_checkpoint=False, fit: bool = True) -> TrainingMemory:
    """A step of the CUDA recipe (bf16 autocast, Triton adapters, SGD with momentum) on `model_name`."""
    shape = vision_shape(model_name, image_size)
    r = bottleneck or lift_bottleneck(num_classes, shape.layers)
    acts = activation_bytes(shape, batch, num_classes=num_classes, bottleneck=r, amp=True, adapter="fused",
                            grad_checkpoint=grad_checkpoint, fit=fit)
    return TrainingMemory(
        clip=4 * shape.clip_params + shape.clip_buffer_bytes + 4 * num_classes * shape.width,  # + W_zs
        trainable=12 * trainable_parameters(shape, num_classes, r, fit),
        inputs=4 * batch * 3 * shape.image_size ** 2,
        activations=acts,
    )


def max_batch(model_name: str, memory_gib: float, *, reserve_gib: float = 1.0, limit: int = 1 << 16,
              **kwargs) -> int:
    """The largest batch whose `training_memory` fits in `memory_gib` GiB less `reserve_gib` (CUDA context,
    fragmentation, workspaces); 0 when not even one image fits. kwargs: as `training_memory`."""
    budget = (memory_gib - reserve_gib) * GIB

    def fits(b: int) -> bool:
        return training_memory(model_name, b, **kwargs).total <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


class SavedTensorBytes:
    """Bytes of the tensors autograd saves for backward inside the context: each storage once, the parameters
    and buffers of `exclude` (modules) left out.

        with SavedTensorBytes(model) as saved:
            loss = model.loss(model(images), target)[0]
        saved.bytes
    """

    def __init__(self, *exclude: nn.Module):
        self._skip = {t.untyped_storage().data_ptr() for m in exclude for t in (*m.parameters(), *m.buffers())}
        self._sizes: dict = {}
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._skip:
            self._sizes[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


#: the README's table (section "Training at scale"): (label, open_clip name, classes)
TABLE_CASES = (
    ("ViT-B/16", "ViT-B-16-quickgelu", 1000),
    ("ViT-B/16", "ViT-B-16-quickgelu", 8142),
    ("ViT-L/14", "ViT-L-14-quickgelu", 1000),
    ("ViT-L/14", "ViT-L-14-quickgelu", 8142),
    ("ViT-L/14-336", "ViT-L-14-336-quickgelu", 8142),
)


def batch_table(cases=TABLE_CASES, memories_gib=(24, 40, 80), batch: int = 128) -> str:
    """A markdown table: per model, class count and checkpointing, the computed memory of a `batch` step
    and the largest batch that fits in each of `memories_gib` (`max_batch`, 1 GiB reserved)."""
    head = ["model", "C (r)", "`model.grad_checkpoint`", f"batch {batch} needs (GiB)"]
    head += [f"{g} GB" for g in memories_gib]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, name, classes in cases:
        r = lift_bottleneck(classes, vision_shape(name).layers)
        for ck in (False, True):
            need = training_memory(name, batch, num_classes=classes, grad_checkpoint=ck).total / GIB
            fits = [f"{max_batch(name, g, num_classes=classes, grad_checkpoint=ck):,}" for g in memories_gib]
            row = [label, f"{classes:,} ({r})", str(ck).lower(), f"{need:.1f}"] + fits
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
