"""A run folder (``train.output_dir``): which files it holds, who may write into it, claiming it for a run.

    .sage-fast.lock        held while a process writes into the folder (`hold_run_folder`)
    .sage-fast-run         the marker: the folder belongs to a sage-fast run (its identity, as JSON)
    config.yaml            the resolved run config, written when the run starts
    last.pt, previous.pt   the newest checkpoint and the one before it (`sage_fast.training.checkpoint`)
    adapters.safetensors   the trained parameters, written at the end (the export)
    train_log.csv, eval_log.csv, tb/    the logs (`sage_fast.training.run_log`)
    metrics.json, per_class.csv, per_class_accuracy.png    the final report (`sage_fast.training.metrics`)
    runtime.json           what ran: versions, device, each op's backend (and any fallback), the attention
    eval/                  reports of ``sage-fast eval`` (never written over the run's own)

One writer per folder: a run holds the folder's lock (`sage_fast.utils.folder_lock`: flock, naming the
holder's pid, host and start time) from before its first write until it ends, however it ends; a second
process is refused, naming the holder. Under torchrun rank 0 holds it.

A run claims only a folder that is empty or holds its own run (`run_folder_state`): the marker is the first
file a fresh run writes. A folder of a run written before the marker existed is recognised by a checkpoint
or an export that loads; it gets the marker when a run claims it. Any other folder that holds something (the
user's own files, even ones named like a run's) is refused, ``--overwrite`` or not: nothing of other origin is
ever deleted or overwritten. A fresh run refuses a folder that holds a run (`RUN_MARKERS`) unless told to
overwrite it, and then deletes what the earlier run wrote (`RUN_FILES`, its TensorBoard events and eval
reports) and nothing else. Rank 0 decides and writes; every rank then refuses or goes on together.

Errors a user can act on are `RunFolderError` (a ValueError; the command line prints it as one line, exit
status 2): a folder that holds a run, foreign files, a folder in use, and the checkpoint errors that derive
from it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from ..utils.files import TMP_NAME, atomic_write_text, remove_quietly
from ..utils.files import remove_stale_temporaries as _remove_stale
from ..utils.folder_lock import LOCK_NAME, FolderInUse, FolderLock, describe_holder, lock_holder

LAST, PREVIOUS = "last.pt", "previous.pt"
EXPORT = "adapters.safetensors"
CONFIG = "config.yaml"
RUNTIME = "runtime.json"
METRICS = "metrics.json"
PER_CLASS = "per_class.csv"
PLOT = "per_class_accuracy.png"
#: the reports of an evaluation (`metrics.write_report`)
REPORT_FILES = (METRICS, PER_CLASS, PLOT)
LOG_FILES = ("train_log.csv", "eval_log.csv")
#: the marker a run writes first: its folder belongs to a sage-fast run
MARKER = ".sage-fast-run"
MARKER_FORMAT = "sage-fast run folder"
#: files whose presence means a folder holds a run that a fresh start would destroy
RUN_MARKERS = (LAST, PREVIOUS, EXPORT, METRICS)
#: everything a run writes at the top of its folder (deleted by `clear_run_files` before a fresh start)
RUN_FILES = tuple(dict.fromkeys(RUN_MARKERS + REPORT_FILES + LOG_FILES + (CONFIG, RUNTIME)))
#: the folders a run (and ``sage-fast eval``) makes inside its folder
RUN_DIRS = ("tb", "eval")


class RunFolderError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message is one line saying what to do."""

    user_error = True  # the command line prints it as one line, exit status 2 (sage_fast.training.errors)


class RunFolderBusy(RunFolderError):
    """Another process holds the folder's lock (a run, an evaluation or a preparation writing into it)."""


# --------------------------------------------------------------------------------------------------
# One writer per folder


@contextlib.contextmanager
def hold_run_folder(folder, enabled: bool = True, what: str = "train.output_dir",
                    wait: float = 0.0) -> Iterator[FolderLock]:
    """Hold `folder`'s lock for the block (a no-op where not `enabled`: ranks other than 0). The folder is made
    when missing, and removed again at the end when the block left it empty. A folder another process holds
    (still after `wait` seconds) raises `RunFolderBusy` naming it; a lock left by a dead process is taken over
    with a warning. `what`: the option that names the folder, for the message."""
    lock = FolderLock(folder, enabled, wait)
    try:
        lock.acquire()
    except FolderInUse as e:
        raise busy_error(folder, e.holder, what, e.checked) from None
    try:
        yield lock
    finally:
        lock.release()


def refuse_if_held(folder, what: str = "--out") -> None:
    """Raise `RunFolderBusy` when another process holds `folder` now (a check before long work; the writes then
    take the lock themselves)."""
    holder = lock_holder(folder)
    if holder is not None:
        raise busy_error(folder, holder, what)


def busy_error(folder, holder: dict, what: str, checked: bool = True) -> RunFolderBusy:
    text = f"{what}={folder} is in use by {describe_holder(holder)} (lock file {Path(folder) / LOCK_NAME})"
    if checked:
        return RunFolderBusy(f"{text}: wait for it to end, or choose another {what}")
    return RunFolderBusy(f"{text}, whose process cannot be checked from this host (no flock on this file system): "
                         f"wait for it to end, delete the lock file if it is gone, or choose another {what}")


# --------------------------------------------------------------------------------------------------
# What a folder holds


def read_marker(folder) -> Optional[dict]:
    """The marker's content ({} when unreadable), or None when `folder` has no marker."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def read_report(folder) -> Optional[dict]:
    """The ``metrics.json`` in `folder` as a dict, or None when it is absent or unreadable."""
    try:
        report = json.loads((Path(folder) / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def write_marker(folder) -> dict:
    """Mark `folder` as a run's, with a new identity: {"format", "version", "run", "created", "host", "pid"}."""
    marker = {"format": MARKER_FORMAT, "version": 1, "run": uuid.uuid4().hex,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
              "pid": os.getpid()}
    atomic_write_text(Path(folder) / MARKER, json.dumps(marker) + "\n")
    return marker


def _own_temporary(name: str) -> bool:
    m = TMP_NAME.fullmatch(name)
    return bool(m) and m["name"] in RUN_FILES + (MARKER,)


def folder_entries(folder) -> List[str]:
    """The names in `folder` other than its lock file and the temporaries a killed write of a run left."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME and not _own_temporary(p.name))


def _loads_as_checkpoint(path: Path) -> bool:
    import torch

    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
        except RuntimeError:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any file that does not load is simply not a checkpoint
        return False
    return isinstance(ckpt, dict) and {"version", "trainable", "config"} <= set(ckpt)


def _loads_as_export(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - as above
        return False
    return str(meta.get("format", "")).startswith("sage-fast adapters") and "config" in meta


def is_unmarked_run(folder) -> bool:
    """Whether `folder`, without the marker, holds a run written before the marker existed: a checkpoint or an
    export that loads (read, not verified: the resume verifies)."""
    folder = Path(folder)
    return any(_loads_as_checkpoint(folder / n) for n in (LAST, PREVIOUS) if (folder / n).is_file()) or \
        ((folder / EXPORT).is_file() and _loads_as_export(folder / EXPORT))


def run_folder_state(folder) -> Tuple[str, List[str]]:
    """-> (state, names): "empty" (missing, or nothing but a lock or a killed write's temporaries), "run" (the
    marker), "unmarked run" (an older run: `is_unmarked_run`), or "foreign" with the names it holds."""
    entries = folder_entries(folder)
    if not entries:
        return "empty", []
    if MARKER in entries:
        return "run", entries
    if is_unmarked_run(folder):
        return "unmarked run", entries
    return "foreign", entries


def run_markers(folder) -> List[str]:
    """The `RUN_MARKERS` present in `folder`: a fresh run there would destroy a run."""
    folder = Path(folder)
    return [n for n in RUN_MARKERS if (folder / n).exists()]


def holds_training_run(folder) -> bool:
    """Whether `folder` holds a training run's marker, checkpoint or log (an evaluation must not write there)."""
    folder = Path(folder)
    return any((folder / n).exists() for n in (MARKER, LAST, PREVIOUS, "train_log.csv"))


def _listed(names: Sequence[str], at_most: int = 6) -> str:
    shown = ", ".join(names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def foreign_folder_error(folder, entries: Sequence[str], what: str = "train.output_dir") -> RunFolderError:
    like_a_run = [n for n in entries if n in RUN_FILES or n in RUN_DIRS]
    if like_a_run:
        why = (f"{folder} is not a sage-fast run folder: it holds {_listed(list(entries))}, named like a run's "
               f"files, but no {MARKER} marker and no checkpoint or export that loads, so they may be files of "
               "your own")
    else:
        why = f"{folder} holds files that are not a sage-fast run's ({_listed(list(entries))})"
    return RunFolderError(f"{why}: a run starts only in an empty folder or continues its own, and --overwrite "
                          f"deletes only a run's files; move them, or choose another {what}")


def folder_in_use_error(folder, found: Sequence[str]) -> RunFolderError:
    return RunFolderError(f"{folder} already holds a run ({', '.join(found)}): continue it with --resume, start "
                          "over with --overwrite (deletes it), or choose another train.output_dir")


def check_claim(folder, fresh: bool, overwrite: bool = False, what: str = "train.output_dir") -> str:
    """Raise `RunFolderError` unless a run may claim `folder`: empty, or a run's (fresh: one without results
    unless `overwrite`). Reads only. -> the folder's state (`run_folder_state`)."""
    state, entries = run_folder_state(folder)
    if state == "foreign":
        raise foreign_folder_error(folder, entries, what)
    if fresh and not overwrite and state != "empty":
        found = run_markers(folder)
        if found:
            raise folder_in_use_error(folder, found)
    return state


def claim_run_folder(folder, dist, fresh: bool, overwrite: bool = False) -> None:
    """Claim `folder` for a run (fresh, or a resume: `check_claim`), on rank 0: clear an earlier run's files
    for a fresh start, delete a killed write's temporaries, write the marker (a new identity for a fresh run;
    kept on resume, written where an older run had none). Every rank then raises or goes on together (one
    all-reduce); the caller holds the folder's lock."""
    from .distributed import reduce_sum

    error = None
    if dist.is_main:
        try:
            state = check_claim(folder, fresh, overwrite)
        except RunFolderError as e:
            error = e
    refuse = error is not None
    if dist.distributed:
        refuse = reduce_sum(dist, float(refuse)) > 0
    if refuse:
        raise error or RunFolderError(f"{folder}: rank 0 refused to claim it (see its message)")
    if not dist.is_main:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fresh and state != "empty":
        clear_run_files(folder)
    remove_stale_temporaries(folder)
    if fresh or read_marker(folder) is None:
        write_marker(folder)


def clear_run_files(folder) -> None:
    """Delete what an earlier run wrote in `folder` (`RUN_FILES`, TensorBoard events, eval/ reports)."""
    folder = Path(folder)
    for n in RUN_FILES:
        remove_quietly(folder / n)
    for p in (folder / "tb").glob("events.out.tfevents.*"):
        remove_quietly(p)
    for n in REPORT_FILES + (RUNTIME,):
        remove_quietly(folder / "eval" / n)


def remove_stale_temporaries(folder, names: Sequence[str] = RUN_FILES + (MARKER,)) -> List[Path]:
    """Delete the temporary files that a kill during a write left beside the run's files (`RUN_FILES`)."""
    return _remove_stale(folder, names)


def write_runtime_record(folder, model) -> str:
    """``runtime.json`` in `folder`: what `model` ran (`sage_fast.model.runtime.run_record`); -> its one-line
    summary, for the log."""
    from ..model.runtime import run_record, summary_line

    record = run_record(model)
    atomic_write_text(Path(folder) / RUNTIME, json.dumps(record, indent=2) + "\n")
    return summary_line(record)
