"""`sage-fast demo`: Sage end to end on a tiny generated data set, on CPU, in about a minute."""
from __future__ import annotations

import time

from .common import CommandParser


def main(argv) -> int:
    from ..training import demo

    parser = CommandParser(prog="sage-fast demo", description=demo.__doc__.splitlines()[0])
    parser.add_argument("--out", default="sage_runs/demo", help="folder for the generated data set and the run "
                                                                "(default %(default)s)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="higher than the paper's 0.01: random weights, few epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default %(default)s)")
    args = parser.parse_args(argv)
    start = time.time()
    report = demo.run_demo(args.out, args.epochs, args.batch_size, args.lr, args.seed, args.workers)
    print(f"test accuracy: overall {report['overall']:.1f}%  many {report['many']:.1f}%  "
          f"medium {report['medium']:.1f}%  few {report['few']:.1f}%   ({time.time() - start:.0f} s)")
    return 0
