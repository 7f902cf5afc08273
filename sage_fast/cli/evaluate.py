"""`sage-fast eval`: evaluate trained weights on the test split of their data set, or zero-shot CLIP."""
from __future__ import annotations

import json

from .common import OVERRIDE_HELP, CommandError, CommandParser, add_weights_arguments, split_arguments


def main(argv) -> int:
    p = CommandParser(prog="sage-fast eval", allow_abbrev=False,
                      epilog=OVERRIDE_HELP + " Exit status: 0 done; 1 crashed; 2 bad arguments or config, "
                             "settings or class names that differ from the weights' (without --force-config), an --out "
                             "that holds reports already (without --overwrite), "
                             "weights that are corrupt (checksum mismatch) or unreadable; 130 SIGINT (Ctrl-C), "
                             "75 SIGTERM / SIGUSR1: stopped, nothing written.",
                      description="Evaluate trained Sage weights: overall / many / medium / few top-1, "
                                  "per-class accuracy (CSV) and plot, written to their own folder "
                                  "(--out; never over the training run's reports); the last line "
                                  "printed is JSON (null for a group without classes). With --zero-shot: "
                                  "CLIP before any training (the frozen encoder and the template "
                                  "classifier), for the data set and model of --config / --preset and "
                                  "overrides; no weights.")
    add_weights_arguments(p, "adapters.safetensors or a checkpoint (last.pt); verified against the checksum "
                             "stored in it", required=False)
    p.add_argument("--zero-shot", action="store_true",
                   help="evaluate zero-shot CLIP instead of trained weights: cosine of the frozen image "
                        "features with the template classifier (model.classifier_init), no adapters")
    p.add_argument("--out", metavar="DIR", help="folder for metrics.json, per_class.csv and "
                                                "per_class_accuracy.png (default: OUTPUT_DIR/eval, with "
                                                "--zero-shot OUTPUT_DIR/zero-shot, which also gets config.yaml)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the reports that --out holds already (an earlier evaluation's); without it, a "
                        "folder that holds any of the files written is refused")
    args, rest = p.parse_known_args(argv)
    if args.zero_shot and args.weights:
        p.error("--zero-shot evaluates CLIP without trained weights: leave out --weights (the config comes "
                "from --config / --preset and overrides)")
    if not args.zero_shot and not args.weights:
        p.error("the following arguments are required: --weights (or --zero-shot)")
    from ..training.distributed import is_main_process
    from ..training.config import build_config
    from ..training.inference import evaluate_weights, read_trained, resolve_run_config
    from ..training.metrics import ACCURACIES, format_report, json_safe
    from ..training.run_folder import RunFolderError

    # a bad config, a missing file: user errors, printed as one line by `main`
    try:
        overrides = split_arguments(rest)[0]
        if args.zero_shot:
            weights, cfg = None, build_config(args.config, overrides, preset=args.preset)
        else:
            weights = read_trained(args.weights)
            cfg = resolve_run_config(weights, args.config, overrides, args.preset, args.force_config)
        report = evaluate_weights(cfg, weights, out_dir=args.out, force=args.force_config, overwrite=args.overwrite)
    except RunFolderError as e:
        raise CommandError(p.prog, e) from None
    if is_main_process():
        print(format_report(report))
        print(json.dumps(json_safe({k: report[k] for k in ACCURACIES}), allow_nan=False))
    return 0
