"""The figure of ``sage-fast attention``: class-token attention of zero-shot CLIP and the fine-tuned model.

For each image: the test crop the models see, then the class token's attention over the patches in one block
(`sage_fast.model.attention_maps`), drawn over the image, for zero-shot CLIP (the frozen encoder without
adapters and the template classifier W_zs) and for the fine-tuned model (adapters, trained classifier; its
prediction is the argmax of z^). Each panel's title holds the model's predicted class and probability.
Default: the mean over heads, one row per image (image | zero-shot CLIP | fine-tuned). ``heads=True``: every
head separately, as in the paper's Fig. 2: two rows per image (zero-shot CLIP, fine-tuned), each image |
mean over heads | head 1 .. head H. Colours are scaled per panel (the maps' ranges differ between blocks
and heads).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from ..model.attention_maps import block_index, compare
from .distributed import autocast
from .errors import UserError
from .metrics import new_figure, save_png

# figure layout: every panel is PANEL_IN x (PANEL_IN + TITLE_IN) inches at DPI dots per inch, under a
# HEADER_IN-inch band for the figure's title
PANEL_IN, TITLE_IN, HEADER_IN, DPI = 2.2, 0.5, 0.4, 100


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
    num_heads = result["zero_shot"][0].shape[1]
    rows, cols = grid_shape(len(rgbs), num_heads, heads)
    height = _height_in(rows)
    fig = new_figure(figsize=(cols * PANEL_IN, height), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
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
    save_png(fig, path, dpi=DPI)
    return rows, cols


def load_images(paths: Sequence[Path], image_size: int):
    """-> (tensors (B, 3, S, S) of the readable images, their RGB crops for display, their paths,
    [(path, error)] of the others)."""
    from .data import CLIP_MEAN, CLIP_STD, build_transform
    from .inference import ImageFiles

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

    -> {"rows", "cols", "block", "images": [written paths], "unreadable": [(path, error)]}; UserError when
    no image can be read.
    """
    index = block_index(model, block)
    images, rgbs, good, bad = load_images([Path(p) for p in paths], model.image_size)
    if images is None:
        raise UserError(f"none of the {len(bad)} images could be read (first: {bad[0][0]}: {bad[0][1]})")
    device = next(model.parameters()).device
    with autocast(device, cfg.train.amp):
        result = compare(model, images.to(device), index)
    result = {k: tuple(t.float().cpu() for t in v) for k, v in result.items()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # folder/name: images of different folders often share a file name
    rows, cols = draw(out, rgbs, [str(Path(p.parent.name) / p.name) for p in good], result, model.class_names,
                      heads, index)
    return {"rows": rows, "cols": cols, "block": index, "images": [str(p) for p in good], "unreadable": bad}
