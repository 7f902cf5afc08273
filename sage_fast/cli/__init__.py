"""The ``sage-fast`` command line, above the library: ``sage-fast COMMAND [options] [section.key=value ...]``.

The only part of the package that parses arguments, prints user errors and decides exit statuses: the
library (`sage_fast.training` and below) raises, and `main` maps. A user error (an exception the library
marks, `sage_fast.training.errors.user_error_message`) is one line ``sage-fast: error: ...`` and status 2;
a command's own stop (`common.CommandError`: a diverged run, 3; a preempted one, 75) is one line with its
status; anything else is a bug and keeps its traceback (status 1).

| module      | command                                                                     |
| ----------- | --------------------------------------------------------------------------- |
| `demo`      | ``sage-fast demo``: a tiny generated data set, trained on CPU               |
| `train`     | ``sage-fast train``: a run from a config / preset (torchrun for many GPUs)  |
| `evaluate`  | ``sage-fast eval``: trained weights (or zero-shot CLIP) on the test split   |
| `prepare`   | ``sage-fast prepare``: a data set into tar shards                           |
| `predict`   | ``sage-fast predict``: top-k classes of images                              |
| `attention` | ``sage-fast attention``: class-token attention maps as a PNG                |
| `sweep`     | ``sage-fast sweep``: one run per value of one or two keys                   |
| `ablate`    | ``sage-fast ablate``: the ladder of Tables 5 and 6                          |
| `info`      | ``sage-fast info`` (and ``--version``): what runs on this machine and why   |
| `common`    | the parser, the overrides, the help texts, the error line                   |
"""
from __future__ import annotations

import importlib
import os
import sys

from .common import CommandError, CommandParser, print_error

#: command -> (module of sage_fast.cli with a ``main(argv)``, one line of help)
COMMANDS = {
    "demo": ("demo", "train Sage on a tiny generated long-tailed data set, on CPU, in about a minute"),
    "train": ("train", "train Sage from a config / preset (torchrun for several GPUs or nodes)"),
    "eval": ("evaluate", "evaluate trained weights (or zero-shot CLIP): overall, many, medium, few and per-class "
                         "top-1"),
    "prepare": ("prepare", "decode, check and resize a data set once into tar shards + manifest (data.prepared)"),
    "predict": ("predict", "top-k classes and probabilities of images (files or folders), as a table or JSON"),
    "attention": ("attention", "class-token attention maps of zero-shot CLIP and the fine-tuned model, as a PNG"),
    "sweep": ("sweep", "one training run per value of one or two config keys; sweep.csv and sweep.png"),
    "ablate": ("ablate", "zero-shot CLIP and the component ladder of Tables 5 and 6 (baseline, +SG, +Init, +CF, "
                         "+FIT), one run per row; ablation.md and ablation.csv"),
    "info": ("info", "versions, device, and what each op and the attention run here and why (paste it into a bug "
                     "report)"),
}

TRACEBACK_ENV = "SAGE_FAST_TRACEBACK"


def main(argv=None) -> int:
    """Run a command; returns its exit status. A user error ends as one line on stderr and status 2; its
    traceback only with ``--traceback`` (anywhere on the command line) or ``SAGE_FAST_TRACEBACK=1``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # taken out before the commands parse: their leftover arguments are config overrides
    show_traceback = "--traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--traceback"]
    parser = CommandParser(prog="sage-fast", description="Sage on CLIP for long-tailed recognition",
                           epilog="Mistakes in the config, paths or files end in one line "
                                  "'sage-fast: error: ...' (exit status 2); add --traceback, or set "
                                  f"{TRACEBACK_ENV}=1, to see where they were raised.")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    parser.add_argument("--traceback", action="store_true", help="print the traceback of a user error too")
    parser.add_argument("--version", action="store_true", help="print the versions of sage-fast, torch, Triton and "
                                                                 "open_clip and exit")
    if argv[:1] in (["--version"], ["-V"]):
        from .info import version_line

        print(version_line())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    command = importlib.import_module(f"{__name__}.{COMMANDS[args.command][0]}")
    try:
        return int(command.main(argv[1:]) or 0)
    except CommandError as e:
        _traceback(show_traceback)
        print_error(f"{e.prog}: {e}", e.kind, e.every_rank)
        return e.code
    except Exception as e:  # noqa: BLE001 - only user errors are caught; anything else is re-raised below
        from ..training.errors import user_error_message

        message = user_error_message(e)
        if message is None:
            raise
        _traceback(show_traceback)
        print_error(message, every_rank=True)
        return 2


def _traceback(show: bool) -> None:
    if show:
        import traceback

        traceback.print_exc()
