"""Where the class token looks: attention maps of the visual encoder, zero-shot CLIP against the fine-tuned model.

A forward hook on the chosen block's ``ln_1`` keeps its output h = ln_1(x) during the normal forward (fast
attention stays on for every block); then only the class token's query is formed, q = W_q h_0 + b_q, and its
scores against all tokens come from one small matmul, h (W_k^T q) / sqrt(hd) per head; b_k adds the same
number to every score of a head, which the softmax removes. The result equals row 0 of
softmax(Q K^T / sqrt(hd)). The adapters act after each block, so block 0 attends alike in both models.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F


class BlockIndexError(ValueError):
    """A block index outside the model."""

    user_error = True  # printed by the `sage-fast` command as one line (model does not import training)


def cls_attention(attn: torch.nn.MultiheadAttention, h: torch.Tensor) -> torch.Tensor:
    """(B, H, N) attention probabilities of token 0 (the class token) over all N tokens, per head.

    attn: the block's frozen ``nn.MultiheadAttention`` (its packed ``in_proj_weight`` / ``in_proj_bias``);
    h: the block's attention input ln_1(x), (B, N, d). Computed in fp32.
    """
    b, n, d = h.shape
    heads = attn.num_heads
    hd = d // heads
    h = h.float()
    w = attn.in_proj_weight.float()
    bias = attn.in_proj_bias.float() if attn.in_proj_bias is not None else None
    q = F.linear(h[:, 0], w[:d], None if bias is None else bias[:d]).view(b, heads, hd)      # (B, H, hd)
    # q . (W_k h_j + b_k) = h_j . (W_k^T q) + q . b_k: the second term is the same for every token j of a
    # head, so the softmax drops it, and the per-head key projection folds into one (d x H) vector set
    wk = w[d:2 * d].view(heads, hd, d)
    u = torch.einsum("bhe,hed->bdh", q, wk)                                                  # (B, d, H)
    scores = torch.bmm(h, u) / math.sqrt(hd)                                                 # (B, N, H)
    return scores.transpose(1, 2).softmax(dim=-1)


def visual_blocks(model):
    """The residual blocks of a `SageModel`'s frozen visual encoder."""
    return model.clip.visual.transformer.resblocks


def block_index(model, block: int) -> int:
    """`block` (negative: from the end) as an index in [0, number of blocks); `BlockIndexError` when out of range."""
    n = len(visual_blocks(model))
    if not -n <= block < n:
        raise BlockIndexError(f"--block {block}: the model has {n} blocks (0 .. {n - 1}, or -1 .. -{n})")
    return block % n


@contextlib.contextmanager
def capture_block_input(model, block: int):
    """Yield a list that receives ln_1(x) (B, N, d) of `block` at each visual forward inside the context.

    Every attention backend of `SageModel.visual_features` applies ln_1 once per block and forward, so the
    normal (fast) forward runs unchanged.
    """
    seen: List[torch.Tensor] = []
    handle = visual_blocks(model)[block_index(model, block)].ln_1.register_forward_hook(
        lambda mod, inp, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


def patch_grid(model) -> Tuple[int, int]:
    """(rows, columns) of image patches."""
    size = model.clip.visual.grid_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


@torch.no_grad()
def attention_maps(model, images: torch.Tensor, block: int = -1, adapters: bool = True):
    """Class-token attention over the patches, and the features, of one visual forward.

    -> (maps (B, H, gh, gw), features (B, d)): adapters=True is the fine-tuned encoder, False the frozen
    zero-shot one. The class token's attention to itself is left out of the maps.
    """
    attn = visual_blocks(model)[block_index(model, block)].attn
    with capture_block_input(model, block) as seen:
        feats = model.visual_features(images, adapters=adapters)
    if len(seen) != 1:
        raise RuntimeError(f"expected one pass through block {block}, saw {len(seen)}")
    probs = cls_attention(attn, seen[0])[..., 1:]
    gh, gw = patch_grid(model)
    return probs.reshape(*probs.shape[:2], gh, gw), feats


@torch.no_grad()
def zero_shot_logits(model, feats_zs: torch.Tensor) -> torch.Tensor:
    """Zero-shot CLIP's logits: the cosine of the frozen features with the template classifier W_zs."""
    w_zs = F.normalize(model.zs_classifier.float(), dim=-1)
    return model.logit_scale * F.normalize(feats_zs.float(), dim=-1) @ w_zs.t()


@torch.no_grad()
def compare(model, images: torch.Tensor, block: int = -1) -> dict:
    """Both models on `images` (B, 3, S, S): maps (B, H, gh, gw) and (probabilities, class indices) (B,)."""
    maps_zs, feats_zs = attention_maps(model, images, block, adapters=False)
    maps_ft, _ = attention_maps(model, images, block, adapters=True)
    p_zs = zero_shot_logits(model, feats_zs).softmax(dim=-1).max(dim=-1)
    p_ft = model.predict(images).float().softmax(dim=-1).max(dim=-1)  # the whole model: z^ with FIT
    return {"zero_shot": (maps_zs, p_zs.values, p_zs.indices), "fine_tuned": (maps_ft, p_ft.values, p_ft.indices)}
