"""The `sage-fast` command: `sage-fast demo`, `sage-fast train`, `sage-fast eval`."""
from __future__ import annotations

import argparse
import sys


def _demo(argv):
    from .demo import main as demo_main

    return demo_main(argv)


COMMANDS = {
    "demo": (_demo, "train Sage on a tiny generated long-tailed data set, on CPU, in about a minute"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="sage-fast", description="Sage on CLIP for long-tailed recognition")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    return int(COMMANDS[args.command][0](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
