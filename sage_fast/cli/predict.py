"""`sage-fast predict`: the top-k classes of images under trained Sage weights.

    sage-fast predict --weights runs/sage/adapters.safetensors photo.jpg more_photos/
    sage-fast predict --weights runs/sage/last.pt --topk 3 --json photos/ > predictions.json

Which model: the run config stored with the weights (``adapters.safetensors`` metadata or ``last.pt``),
unless ``--config`` / ``--preset`` give one; ``section.key=value`` overrides apply on top (for instance
``train.device=cpu``, ``train.eval_batch_size=64``, ``eval.tte=tencrop``). The class names are the
ones stored with the weights; weights without them (a bare state dict) take them from the config's
data set. The frozen CLIP is loaded as the config says (``model.pretrained``), so it must be the one the
weights were trained on.

Images: files, or folders (their image files, sorted by name, not recursive). Each image gets the test
transform (or the ``eval.tte`` crops), batches of ``train.eval_batch_size`` go through the model on
``train.device`` (``auto``: the GPU when there is one; bf16 there when ``train.amp``), and the
probabilities are the softmax of z^. An unreadable image is reported in the output and skipped; only
when no image can be read is it an error.

Output: a table (one row per image), or with ``--json`` a JSON list of
``{"image": path, "predictions": [{"class": name, "index": k, "probability": p}, ...]}``, or
``{"image": path, "error": message}`` for an unreadable one. Progress and warnings go to stderr, so
stdout holds only the result.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .common import (
    OVERRIDE_HELP,
    CommandError,
    CommandParser,
    add_weights_arguments,
    images_and_overrides,
    trained_model,
)


def format_table(results: Sequence[dict], topk: int) -> str:
    """One aligned row per image: the image, then class and probability for each rank."""
    head = ["image"] + [h for r in range(1, topk + 1) for h in (f"top-{r}", "p")]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["image"], f"unreadable: {r['error']}"])
        else:
            rows.append([r["image"]] + [v for p in r["predictions"] for v in (p["class"], f"{p['probability']:.4f}")])
    # the error message may be long: it is left out of the column widths
    widths = [max([len(head[c])] + [len(row[c]) for row in rows if len(row) == len(head) and c < len(row)])
              for c in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def main(argv) -> int:
    from ..training.inference import predict_images

    p = CommandParser(prog="sage-fast predict", allow_abbrev=False, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OVERRIDE_HELP,
                      usage="%(prog)s --weights W [--config C] [--topk K] [--json] [overrides] "
                            "IMAGE_OR_FOLDER [...]")
    add_weights_arguments(p)
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes per image (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args, rest = p.parse_known_args(argv)
    if args.topk < 1:
        p.error(f"--topk must be at least 1, got {args.topk}")
    paths, overrides = images_and_overrides(p, rest)
    cfg, model = trained_model(args, overrides)
    results = predict_images(model, cfg, paths, args.topk)
    bad = [r for r in results if "error" in r]
    if len(bad) == len(results):
        raise CommandError(p.prog, f"none of the {len(results)} images could be read (first: {bad[0]['image']}: "
                                   f"{bad[0]['error']})")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results, min(args.topk, model.num_classes)))
    if bad:
        print(f"{p.prog}: {len(bad)} of {len(results)} images could not be read", file=sys.stderr)
    return 0
