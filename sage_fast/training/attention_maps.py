"""`sage-fast attention`: where the class token looks, in zero-shot CLIP and in the fine-tuned model.

    sage-fast attention --weights runs/sage/adapters.safetensors --images a.jpg b.jpg --out attention.png
    sage-fast attention --weights runs/sage/last.pt --images a.jpg --out heads.png --block 5 --heads

For each image: the test crop the models see, then the class token's attention over the patches in one
block (the last by default; ``--block K`` counts from 0, negative from the end), drawn over the image,
for zero-shot CLIP (the frozen encoder without adapters and the template classifier W_zs) and for the
fine-tuned model (adapters, trained classifier; its prediction is the argmax of z^). Each panel's title
holds the model's predicted class and probability. Default: the mean over heads, one row per image
(image | zero-shot CLIP | fine-tuned). ``--heads``: every head separately, as in the paper's Fig. 2: two
rows per image (zero-shot CLIP, fine-tuned), each image | mean over heads | head 1 .. head H. Colours are
scaled per panel (the maps' ranges differ between blocks and heads). The adapters act after each block, so
block 0 attends alike in both models: its maps differ only in the predictions.

The model, classes and overrides are chosen as in ``sage-fast predict``. Unreadable images are reported
and left out; only when none can be read is it an error.

How the maps are computed: a forward hook on the chosen block's ``ln_1`` keeps its output h = ln_1(x)
during the normal forward (fast attention stays on for every block); then only the class token's query
is formed, q = W_q h_0 + b_q, and its scores against all tokens come from one small matmul,
h (W_k^T q) / sqrt(hd) per head; b_k adds the same number to every score of a head, which the softmax
removes. The result equals row 0 of softmax(Q K^T / sqrt(hd)).
"""
from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .errors import CommandParser

# figure layout: every panel is PANEL_IN x (PANEL_IN + TITLE_IN) inches at DPI dots per inch, under a
# HEADER_IN-inch band for the figure's title
PANEL_IN, TITLE_IN, HEADER_IN, DPI = 2.2, 0.5, 0.4, 100


# --------------------------------------------------------------------------------------------------
# Class-token attention


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


def _blocks(model):
    return model.clip.visual.transformer.resblocks


def block_index(model, block: int) -> int:
    """`block` (negative: from the end) as an index in [0, number of blocks); ValueError when out of range."""
    n = len(_blocks(model))
    if not -n <= block < n:
        raise ValueError(f"--block {block}: the model has {n} blocks (0 .. {n - 1}, or -1 .. -{n})")
    return block % n


@contextlib.contextmanager
def capture_block_input(model, block: int):
    """Yield a list that receives ln_1(x) (B, N, d) of `block` at each visual forward inside the context.

    A forward hook on the block's ``ln_1``: every attention backend of `SageModel.visual_features` applies
    ln_1 once per block and forward, so the normal (fast) forward runs unchanged.
    """
    seen: List[torch.Tensor] = []
    handle = _blocks(model)[block_index(model, block)].ln_1.register_forward_hook(
        lambda mod, inp, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


def patch_grid(model) -> Tuple[int, int]:
    size = model.clip.visual.grid_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


@torch.no_grad()
def attention_maps(model, images: torch.Tensor, block: int = -1, adapters: bool = True):
    """Class-token attention over the patches, and the features, of one visual forward.

    -> (maps (B, H, gh, gw), features (B, d)): adapters=True is the fine-tuned encoder, False the frozen
    zero-shot one. The class token's attention to itself is left out of the maps.
    """
    attn = _blocks(model)[block_index(model, block)].attn
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


# --------------------------------------------------------------------------------------------------
# The figure


def grid_shape(num_images: int, num_heads: int, heads: bool) -> Tuple[int, int]:
    """(rows, columns) of the figure: (B, 3), or with `heads` (2B, 2 + H)."""
    return (2 * num_images, 2 + num_heads) if heads else (num_images, 3)


def figure_pixels(rows: int, cols: int) -> Tuple[int, int]:
    """(width, height) in pixels of a figure of rows x cols panels."""
    return round(cols * PANEL_IN * DPI), round(_height_in(rows) * DPI)


def _height_in(rows: int) -> float:
    return rows * (PANEL_IN + TITLE_IN) + HEADER_IN


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _show_image(ax, rgb, title: str) -> None:
    ax.imshow(rgb, interpolation="bilinear")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _overlay(ax, rgb, amap: torch.Tensor, title: str) -> None:
    size = rgb.shape[:2]
    up = F.interpolate(amap[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = float(up.min()), float(up.max())
    up = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    ax.imshow(rgb, interpolation="bilinear")
    ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def draw(path, rgbs: Sequence, names: Sequence[str], result: dict, class_names: Sequence[str],
         heads: bool, block: int) -> Tuple[int, int]:
    """Write the PNG (see the module docstring); -> (rows, columns) of panels."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from ..utils.files import atomic_path

    num_heads = result["zero_shot"][0].shape[1]
    rows, cols = grid_shape(len(rgbs), num_heads, heads)
    height = _height_in(rows)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_IN, height), dpi=DPI, squeeze=False)
    labels = {"zero_shot": "zero-shot CLIP", "fine_tuned": "fine-tuned"}
    for i, (rgb, name) in enumerate(zip(rgbs, names)):
        for m, key in enumerate(("zero_shot", "fine_tuned")):
            maps, probs, classes = result[key]
            pred = f"{_short(class_names[int(classes[i])])} ({100 * float(probs[i]):.0f}%)"
            if not heads:
                if m == 0:
                    _show_image(axes[i, 0], rgb, _short(name, 28))
                _overlay(axes[i, 1 + m], rgb, maps[i].mean(dim=0), f"{labels[key]}: {pred}")
                continue
            row = axes[2 * i + m]
            _show_image(row[0], rgb, f"{_short(name, 20)}\n{labels[key]}")
            _overlay(row[1], rgb, maps[i].mean(dim=0), f"mean of heads\n{pred}")
            for h in range(num_heads):
                _overlay(row[2 + h], rgb, maps[i, h], f"head {h + 1}")
    fig.suptitle(f"class-token attention over the patches, block {block}", fontsize=9,
                 y=1 - 0.15 / height, va="top")
    # titles sit above each panel: the top row's need TITLE_IN below the header band
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02 / height, top=1 - (HEADER_IN + TITLE_IN) / height,
                        wspace=0.05, hspace=TITLE_IN / PANEL_IN)
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return rows, cols


def load_images(paths: Sequence[Path], image_size: int):
    """-> (tensors (B, 3, S, S) of the readable images, their RGB crops for display, their paths,
    [(path, error)] of the others)."""
    from .data import CLIP_MEAN, CLIP_STD, build_transform
    from .predict import ImageFiles

    transform = build_transform(image_size, train=False)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    tensors, rgbs, good, bad = [], [], [], []
    files = ImageFiles(paths, transform)  # the reading and its error messages of `sage-fast predict`
    for i, p in enumerate(paths):
        x = files[i][1]
        if isinstance(x, str):
            bad.append((p, x))
            continue
        tensors.append(x)
        rgbs.append((x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        good.append(p)
    return (torch.stack(tensors) if tensors else None), rgbs, good, bad


def render(model, cfg, paths: Sequence, out, block: int = -1, heads: bool = False) -> dict:
    """Load `paths`, compute both models' maps in `block`, write the PNG `out`.

    -> {"rows", "cols", "block", "images": [written paths], "unreadable": [(path, error)]}; ValueError when
    no image can be read.
    """
    from .predict import autocast

    index = block_index(model, block)
    images, rgbs, good, bad = load_images([Path(p) for p in paths], model.image_size)
    if images is None:
        raise ValueError(f"none of the {len(bad)} images could be read (first: {bad[0][0]}: {bad[0][1]})")
    device = next(model.parameters()).device
    with autocast(cfg, device):
        result = compare(model, images.to(device), index)
    result = {k: tuple(t.float().cpu() for t in v) for k, v in result.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # folder/name: images of different folders often share a file name
    rows, cols = draw(out, rgbs, [str(Path(p.parent.name) / p.name) for p in good], result, model.class_names,
                      heads, index)
    return {"rows": rows, "cols": cols, "block": index, "images": [str(p) for p in good], "unreadable": bad}


# --------------------------------------------------------------------------------------------------
# The command


def main(argv=None) -> int:
    import sys

    from .config import ConfigError
    from .predict import (add_model_arguments, collect_images, fail, load_trained, overrides_help,
                          resolve_run_config, split_overrides)

    p = CommandParser(prog="sage-fast attention", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=overrides_help(),
                                usage="%(prog)s --weights W [--config C] --images IMG [IMG ...] --out FILE.png "
                                      "[--block K] [--heads] [overrides]")
    add_model_arguments(p)
    p.add_argument("--images", nargs="+", required=True, metavar="IMG", help="image files or folders")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--block", type=int, default=-1, metavar="K",
                   help="the block whose attention is drawn: 0-based, negative from the end (default: the last)")
    p.add_argument("--heads", action="store_true", help="draw every head, not only their mean (Fig. 2)")
    args, rest = p.parse_known_args(argv)
    # --images takes every later word: overrides written after it are picked out again here
    inputs, overrides = split_overrides(list(args.images) + rest)
    unknown = [a for a in inputs if a.startswith("-") and not Path(a).exists()]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    paths = collect_images(inputs)
    if not paths:
        return fail(p.prog, "no image files found in " + ", ".join(inputs))
    try:
        cfg = resolve_run_config(args.weights, args.config, overrides, args.preset)
        model = load_trained(args.weights, cfg)
        info = render(model, cfg, paths, args.out, args.block, args.heads)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        return fail(p.prog, e)
    for path, err in info["unreadable"]:
        print(f"{p.prog}: skipped unreadable image {path}: {err}", file=sys.stderr)
    print(f"wrote {args.out}: {len(info['images'])} images, block {info['block']}, "
          f"{info['rows']} x {info['cols']} panels")
    return 0
