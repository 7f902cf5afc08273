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
and left out; only when none can be read is it an error. How the maps are computed:
`sage_fast.model.attention_maps`.
"""
from __future__ import annotations

import argparse
import sys

from .common import OVERRIDE_HELP, CommandParser, add_weights_arguments, images_and_overrides, trained_model


def main(argv) -> int:
    from ..training.attention_figure import render

    p = CommandParser(prog="sage-fast attention", allow_abbrev=False, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OVERRIDE_HELP,
                      usage="%(prog)s --weights W [--config C] --images IMG [IMG ...] --out FILE.png "
                            "[--block K] [--heads] [overrides]")
    add_weights_arguments(p)
    p.add_argument("--images", nargs="+", required=True, metavar="IMG", help="image files or folders")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--block", type=int, default=-1, metavar="K",
                   help="the block whose attention is drawn: 0-based, negative from the end (default: the last)")
    p.add_argument("--heads", action="store_true", help="draw every head, not only their mean (Fig. 2)")
    args, rest = p.parse_known_args(argv)
    # --images takes every later word: overrides written after it are picked out again here
    paths, overrides = images_and_overrides(p, list(args.images) + rest)
    cfg, model = trained_model(args, overrides)
    info = render(model, cfg, paths, args.out, args.block, args.heads)
    for path, err in info["unreadable"]:
        print(f"{p.prog}: skipped unreadable image {path}: {err}", file=sys.stderr)
    print(f"wrote {args.out}: {len(info['images'])} images, block {info['block']}, "
          f"{info['rows']} x {info['cols']} panels")
    return 0
