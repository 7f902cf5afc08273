"""`sage-fast eval`: evaluate trained weights on the test split of their data set."""
from __future__ import annotations

import json

from .common import OVERRIDE_HELP, CommandError, CommandParser, add_weights_arguments, split_arguments


def main(argv) -> int:
    p = CommandParser(prog="sage-fast eval", allow_abbrev=False,
                      epilog=OVERRIDE_HELP + " Exit status: 0 done; 1 crashed; 2 bad arguments or config, "
                             "weights that are corrupt (checksum mismatch) or unreadable.",
                      description="Evaluate trained Sage weights: overall / many / medium / few top-1, "
                                  "per-class accuracy (CSV) and plot, written to their own folder "
                                  "(--out; never over the training run's reports); the last line "
                                  "printed is JSON (null for a group without classes).")
    add_weights_arguments(p, "adapters.safetensors or a checkpoint (last.pt); verified against the checksum "
                             "stored in it")
    p.add_argument("--out", metavar="DIR", help="folder for metrics.json, per_class.csv and "
                                                "per_class_accuracy.png (default: OUTPUT_DIR/eval)")
    args, rest = p.parse_known_args(argv)
    from ..training.distributed import is_main_process
    from ..training.inference import evaluate_weights, resolve_run_config
    from ..training.metrics import ACCURACIES, format_report, json_safe
    from ..training.run_folder import RunFolderError

    # a bad config, a missing file: user errors, printed as one line by `main`
    try:
        cfg = resolve_run_config(args.weights, args.config, split_arguments(rest)[0], args.preset)
        report = evaluate_weights(cfg, args.weights, out_dir=args.out)
    except RunFolderError as e:
        raise CommandError(p.prog, e) from None
    if is_main_process():
        print(format_report(report))
        print(json.dumps(json_safe({k: report[k] for k in ACCURACIES}), allow_nan=False))
    return 0
