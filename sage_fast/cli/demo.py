"""`sage-fast demo`: Sage end to end on a tiny generated data set, on CPU, in about a minute."""
from __future__ import annotations

import time

from .common import CommandParser
from .train import EXIT_DIVERGED, EXIT_PREEMPTED, training_outcomes

EXIT_HELP = (
    "Exit status: 0 finished; 1 crashed; 2 refused: bad arguments, an --out that holds an earlier demo (without "
    f"--overwrite) or that another process is writing into; {EXIT_DIVERGED} diverged (NaN/Inf weights); "
    f"{EXIT_PREEMPTED} stopped by SIGTERM / SIGUSR1 with a checkpoint: continue with sage-fast train --config "
    "OUT/run/config.yaml --resume.")


def main(argv) -> int:
    from ..training import demo

    parser = CommandParser(prog="sage-fast demo", description=demo.__doc__.splitlines()[0],
                           epilog=EXIT_HELP)
    parser.add_argument("--out", default="sage_runs/demo", help="folder for the generated data set and the run "
                                                                "(default %(default)s)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="higher than the paper's 0.01: random weights, few epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier demo in --out (its data set and run); without it such a folder "
                             "is refused")
    args = parser.parse_args(argv)
    start = time.time()
    with training_outcomes(parser.prog):
        report = demo.run_demo(args.out, args.epochs, args.batch_size, args.lr, args.seed, args.workers,
                               overwrite=args.overwrite)
    print(f"test accuracy: overall {report['overall']:.1f}%  many {report['many']:.1f}%  "
          f"medium {report['medium']:.1f}%  few {report['few']:.1f}%   ({time.time() - start:.0f} s)")
    return 0
