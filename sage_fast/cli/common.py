"""What every command shares: the argument parser, the ``key=value`` overrides, the help texts, the error line.

A user error is one line on stderr, ``sage-fast: error: ...``, and exit status 2; a command's own stop is
``sage-fast: KIND: PROG: ...`` with the status it chose (`CommandError`).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

from ..training.distributed import is_main_process

#: a user error: bad arguments or config, files that cannot be used
EXIT_USER_ERROR = 2

OVERRIDE_HELP = ("overrides: any config key as section.key=value (or --section.key value), e.g. optim.lr=0.02 "
                 "data.root=/data/ImageNet_LT data.num_workers=16; values are parsed as YAML.")
PRINT_CONFIG_HELP = "Print the full config with --print-config."


def print_error(text: str, kind: str = "error", every_rank: bool = False) -> None:
    """``sage-fast: KIND: TEXT`` on stderr, on rank 0 only unless `every_rank` (a line that differs per rank)."""
    if every_rank or is_main_process():
        print(f"sage-fast: {kind}: {text}", file=sys.stderr, flush=True)


class CommandError(Exception):
    """A command's refusal or stop, reported by `sage_fast.cli.main` as ``sage-fast: KIND: PROG: message``
    and exit status `code`."""

    def __init__(self, prog: str, message, code: int = EXIT_USER_ERROR, kind: str = "error",
                 every_rank: bool = False):
        super().__init__(str(message))
        self.prog, self.code, self.kind, self.every_rank = prog, code, kind, every_rank


class CommandParser(argparse.ArgumentParser):
    """The commands' argument parser: its own mistakes (an unknown option, a bad choice) end as one line,
    ``sage-fast: error: ...``, and status 2, like every other user error (argparse prints the usage too)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"sage-fast: error: {self.prog}: {message} (see {self.prog} --help)\n")


def add_config_arguments(p: argparse.ArgumentParser, config_help: str = "YAML run config (sections data, model, "
                                                                         "optim, train, eval; optional 'preset')"):
    from ..training.config import PRESETS

    p.add_argument("--config", help=config_help)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a row of the paper's Table 8")


def add_weights_arguments(p: argparse.ArgumentParser, weights_help: str = "adapters.safetensors or a checkpoint "
                                                                           "(last.pt)", required: bool = True):
    from ..training.config import PRESETS

    p.add_argument("--weights", required=required, help=weights_help)
    p.add_argument("--config", help="YAML run config; default: the config stored with the weights")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a row of Table 8 instead of the stored config")


_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def split_arguments(tokens: Sequence[str], paths: bool = False) -> Tuple[List[str], List[str]]:
    """Leftover command-line words -> (``key=value`` overrides, other words).

    ``--key value`` and ``--key=value`` become ``key=value``. With `paths` (commands that take files),
    ``key=value`` is an override unless a file of that name exists, and every other word is a path; without
    it every word is an override (the config names one that is not ``key=value``).
    """
    overrides, others, i = [], [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and "=" not in tok and i + 1 < len(tokens):
            overrides.append(f"{tok[2:]}={tokens[i + 1]}")
            i += 2
            continue
        text = tok[2:] if tok.startswith("--") and "=" in tok else tok
        if not paths or (_OVERRIDE.match(text) and not Path(tok).exists()):
            overrides.append(text)
        else:
            others.append(tok)
        i += 1
    return overrides, others


def images_and_overrides(p: argparse.ArgumentParser, words: Sequence[str]) -> Tuple[list, List[str]]:
    """The words of a command that takes images -> (image files, ``key=value`` overrides): folders give their
    image files (`sage_fast.training.inference.collect_images`); an unknown option, no image or folder, or no
    image file in them is a one-line error."""
    from ..training.inference import collect_images

    overrides, inputs = split_arguments(words, paths=True)
    unknown = [a for a in inputs if a.startswith("-") and not Path(a).exists()]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not inputs:
        p.error("give at least one image or folder")
    paths = collect_images(inputs)
    if not paths:
        raise CommandError(p.prog, "no image files found in " + ", ".join(map(str, inputs)))
    return paths, overrides


def trained_model(args, overrides: Sequence[str]):
    """-> (run config, `SageModel` in eval mode) of ``--weights`` with ``--config`` / ``--preset`` and
    `overrides` (`sage_fast.training.inference`)."""
    from ..training.inference import load_trained, resolve_run_config

    cfg = resolve_run_config(args.weights, args.config, overrides, args.preset)
    return cfg, load_trained(args.weights, cfg)
