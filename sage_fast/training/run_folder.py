"""A run folder (``train.output_dir``): which files it holds, claiming it for a fresh run, and its errors.

    config.yaml            the resolved run config, written when the run starts
    last.pt, previous.pt   the newest checkpoint and the one before it (`sage_fast.training.checkpoint`)
    adapters.safetensors   the trained parameters, written at the end (the export)
    train_log.csv, eval_log.csv, tb/    the logs (`sage_fast.training.run_log`)
    metrics.json, per_class.csv, per_class_accuracy.png    the final report (`sage_fast.training.metrics`)
    runtime.json           what ran: versions, device, each op's backend (and any fallback), the attention
    eval/                  reports of ``sage-fast eval`` (never written over the run's own)

A fresh run refuses a folder that holds a run (`RUN_MARKERS`) unless told to overwrite it, and then deletes
what the earlier run wrote (`RUN_FILES`) so that nothing of it, a stale previous.pt above all, is taken
for part of the new run. Only rank 0 of a distributed run decides and writes; every rank then refuses or
goes on together.

Errors a user can act on are `RunFolderError` (a ValueError; the command line prints it as one line, exit
status 2): a folder that already holds a run, and the checkpoint errors that derive from it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from ..utils.files import remove_quietly
from ..utils.files import remove_stale_temporaries as _remove_stale

LAST, PREVIOUS = "last.pt", "previous.pt"
EXPORT = "adapters.safetensors"
CONFIG = "config.yaml"
RUNTIME = "runtime.json"
REPORT_FILES = ("metrics.json", "per_class.csv", "per_class_accuracy.png")
LOG_FILES = ("train_log.csv", "eval_log.csv")
#: files whose presence means a folder holds a run that a fresh start would destroy
RUN_MARKERS = (LAST, PREVIOUS, EXPORT, "metrics.json")
#: everything a run writes at the top of its folder (deleted by `clear_run_files` before a fresh start)
RUN_FILES = tuple(dict.fromkeys(RUN_MARKERS + REPORT_FILES + LOG_FILES + (CONFIG, RUNTIME)))


class RunFolderError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message is one line saying what to do."""

    user_error = True  # the command line prints it as one line, exit status 2 (sage_fast.training.errors)


def run_markers(folder) -> List[str]:
    """The `RUN_MARKERS` present in `folder`: a fresh run there would destroy a run."""
    folder = Path(folder)
    return [n for n in RUN_MARKERS if (folder / n).exists()]


def holds_training_run(folder) -> bool:
    """Whether `folder` holds a training run's checkpoint or log (an evaluation must not write there)."""
    folder = Path(folder)
    return (folder / LAST).exists() or (folder / "train_log.csv").exists()


def folder_in_use_error(folder, found: Sequence[str]) -> RunFolderError:
    return RunFolderError(f"{folder} already holds a run ({', '.join(found)}): continue it with --resume, start "
                          "over with --overwrite (deletes it), or choose another train.output_dir")


def refuse_if_in_use(folder) -> None:
    """Raise `folder_in_use_error` when `folder` holds a run (before anything is built for a fresh start)."""
    found = run_markers(folder)
    if found:
        raise folder_in_use_error(folder, found)


def claim_for_fresh_run(folder, overwrite: bool, dist) -> None:
    """A fresh run: refuse a folder holding a run unless `overwrite`; clear what an earlier run left there.

    dist: the process's `DistInfo`. Rank 0 decides (other nodes may not see the folder); every rank then
    raises or goes on together (one all-reduce)."""
    from .distributed import reduce_sum

    found = run_markers(folder) if dist.is_main else []
    refuse = bool(found) and not overwrite
    if dist.distributed:
        refuse = reduce_sum(dist, float(refuse)) > 0
    if refuse:
        raise folder_in_use_error(folder, found) if found else RunFolderError(
            f"{folder} already holds a run (rank 0 refused to overwrite it)")
    if dist.is_main:
        clear_run_files(folder)


def clear_run_files(folder) -> None:
    """Delete what an earlier run wrote in `folder` (`RUN_FILES`, TensorBoard events, eval/ reports)."""
    folder = Path(folder)
    for n in RUN_FILES:
        remove_quietly(folder / n)
    for p in (folder / "tb").glob("events.out.tfevents.*"):
        remove_quietly(p)
    for n in REPORT_FILES + (RUNTIME,):
        remove_quietly(folder / "eval" / n)


def remove_stale_temporaries(folder, names: Sequence[str] = RUN_FILES) -> List[Path]:
    """Delete the temporary files that a kill during a write left beside the run's files (`RUN_FILES`)."""
    return _remove_stale(folder, names)


def write_runtime_record(folder, model) -> str:
    """``runtime.json`` in `folder`: what `model` ran (`sage_fast.model.runtime.run_record`); -> its one-line
    summary, for the log."""
    import json

    from ..model.runtime import run_record, summary_line
    from ..utils.files import atomic_write_text

    record = run_record(model)
    atomic_write_text(Path(folder) / RUNTIME, json.dumps(record, indent=2) + "\n")
    return summary_line(record)
