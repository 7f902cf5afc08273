"""`sage-fast prepare`: decode, check and resize a data set once into tar shards (``data.prepared``)."""
from __future__ import annotations

import os

from .common import OVERRIDE_HELP, CommandParser, add_config_arguments, split_arguments


def main(argv) -> int:
    from ..training.config import ConfigError, build_config
    from ..training.data.prepare import DEFAULT_QUALITY, DEFAULT_SHARD_MB, DEFAULT_SHORT_SIDE, format_summary, prepare

    p = CommandParser(
        prog="sage-fast prepare", allow_abbrev=False, epilog=OVERRIDE_HELP,
        description="Decode, check and resize every image of both splits once, into tar shards (webdataset "
                    "layout: KEY.jpg + KEY.cls) and DIR/manifest.json; train and evaluate on them with "
                    "data.prepared=DIR. Run the same command again to resume an interrupted preparation.")
    add_config_arguments(p, "YAML run config (its data section names the data set)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and manifest.json")
    p.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE, metavar="N",
                   help=f"resize so the short side is N px, never enlarging (default {DEFAULT_SHORT_SIDE}: "
                        "headroom for RandomResizedCrop at 224 px); 0 keeps the original size")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                   help=f"JPEG quality of re-encoded images, 1..95 (default {DEFAULT_QUALITY})")
    p.add_argument("--shard-size", type=float, default=DEFAULT_SHARD_MB, metavar="MB",
                   help=f"target shard size in MiB (default {DEFAULT_SHARD_MB:g})")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes (default: all CPU cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = p.parse_known_args(argv)
    try:
        cfg = build_config(args.config, split_arguments(rest)[0], preset=args.preset)
    except ConfigError as e:
        p.error(str(e))
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    from ..training.run_folder import RunFolderError, hold_run_folder, holds_training_run

    if os.path.isdir(args.out) and holds_training_run(args.out):
        raise RunFolderError(f"--out={args.out} holds a training run: prepare the data set into a folder of its own")
    # one writer: a second preparation into the same folder is refused (it would delete this one's temporaries)
    with hold_run_folder(args.out, what="--out"):
        summary = prepare(cfg.data, args.out, short_side=args.short_side, quality=args.quality,
                          shard_mb=args.shard_size, workers=args.workers, progress=not args.no_progress)
    if not summary["done_before"]:
        print(format_summary(summary))
    return 0
