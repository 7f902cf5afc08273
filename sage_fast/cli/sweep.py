"""`sage-fast sweep`: one training run per value of one or two config keys (the paper's Figs. 7 and 8).

    sage-fast sweep --preset imagenet_lt data.root=/data/ImageNet_LT train.output_dir=runs/alpha \\
        model.alpha=0.1,0.2,0.4,0.8,1.0
    sage-fast sweep --config run.yaml train.output_dir=runs/lambdas model.mu=0.25,0.5,1 model.gamma=0.03,0.05

An argument ``KEY=V1,V2,...`` with two or more values (a YAML flow list without its brackets, so
``model.lambdas=[0,0,1],[0.01,0.01,0.4]`` is two values) is a sweep axis; one with a single value is an
ordinary override for every run. One or two axes; with two, every pair of values is run.

Each run trains in its own folder under ``train.output_dir``, named after its values
(``model.alpha=0.4``, ``model.mu=0.5,model.gamma=0.03``). A run whose folder holds the metrics of a
finished run of the same config is not rerun; one interrupted with a checkpoint is resumed; one whose
stored config or data differs (the base config changed, data.root names another data set: its class names,
training images per class or test images differ) is trained again from scratch. So an interrupted sweep
continues where it stopped when the same command is given again. A second sweep into the same folder while
one runs is refused (exit status 2); a diverged run stops the sweep with status 3, SIGTERM / SIGUSR1 with 75.

After every run, ``train.output_dir`` gets ``sweep.csv`` (one row per run: the axis values, overall / many /
medium / few top-1 and the run folder) and ``sweep.png``: the four accuracies against the value (one key),
or one panel per accuracy with one line per value of the second key (two keys). Numeric values are drawn
on a numeric axis (logarithmic when they span two decades or more), others as categories.
``--dry-run`` lists the runs and whether each is finished, without training.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import OVERRIDE_HELP, CommandParser, add_config_arguments, split_arguments
from .train import training_outcomes


def main(argv) -> int:
    from ..training.distributed import is_main_process
    from ..training.metrics import ACCURACIES, metric_value
    from ..training.reuse import finished_report
    from ..training.sweep import plan_sweep, run_sweep, split_axes, value_text

    p = CommandParser(prog="sage-fast sweep", allow_abbrev=False, description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OVERRIDE_HELP,
                      usage="%(prog)s [--config C] [--preset P] [--dry-run] [overrides] "
                            "KEY=V1,V2,... [KEY2=W1,W2,...]")
    add_config_arguments(p, "YAML run config (sections data, model, optim, train, eval)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and which are finished; train nothing")
    args, rest = p.parse_known_args(argv)
    overrides, axes = split_axes(split_arguments(rest)[0])
    if not axes:
        p.error("give one or two keys to sweep, each with several values: KEY=V1,V2,... (e.g. model.alpha=0.1,0.5)")
    # user errors (a bad key or value, a path) are printed as one line by the command line's `main`
    base, runs = plan_sweep(args.config, overrides, axes, args.preset)
    keys = [a.key for a in axes]
    out_dir = Path(base.train.output_dir)
    if args.dry_run:
        identities: dict = {}
        for run in runs:
            state = "finished" if finished_report(run.cfg, run.folder, identities) is not None else "to run"
            print(f"{run.folder}  {state}")
        return 0
    with training_outcomes(p.prog):
        done = run_sweep(runs, out_dir, keys)
    if is_main_process():
        print()
        head = keys + list(ACCURACIES)
        table = [[value_text(r.assignment[k]) for k in keys] + [f"{metric_value(rep.get(m)):.2f}" for m in ACCURACIES]
                 for r, rep, _ in done]
        widths = [max(len(h), *(len(row[c]) for row in table)) for c, h in enumerate(head)]
        for row in [head] + table:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        trained = sum(s != "reused" for _, _, s in done)
        print(f"{len(done)} runs ({trained} trained, {len(done) - trained} finished earlier); "
              f"{out_dir / 'sweep.csv'}, {out_dir / 'sweep.png'}")
    return 0
