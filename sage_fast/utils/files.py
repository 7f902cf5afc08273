"""Atomic, durable file writes: the one way this package writes a file that a reader or a later run trusts.

A write goes to a temporary file beside its target, ``.NAME.PID.tmp``, which is flushed to disk (fsync)
and renamed over the target, and the rename itself is made durable (fsync of the folder). Readers see the
old file or the whole new one, never a part; a crash, kill -9 or Ctrl-C during the write leaves the old
file whole, plus at most the temporary file, which `remove_stale_temporaries` deletes when the next run
starts in that folder. The process id in the name keeps concurrent writers (other processes) apart.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

PathLike = Union[str, os.PathLike]

#: the temporary files `atomic_path` creates: ``.NAME.PID.tmp``
TMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.tmp")


def temporary_name(path: PathLike) -> Path:
    """The temporary file `atomic_path` writes for `path` in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(folder: PathLike) -> None:
    """Make a rename in `folder` durable (best effort: some platforms and file systems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def remove_quietly(path: PathLike) -> None:
    """Delete `path` if it is there; errors are ignored (cleaning up must not hide the error that led to it)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, fsync it and rename it over `path`
    (then fsync the folder); when it fails, remove it and keep `path` as it was.

    durable=False skips both fsyncs: still atomic for readers, but a power loss may lose the new file
    (for files rewritten often whose loss costs nothing, such as a progress log rewritten every step).
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: PathLike, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` through `atomic_path`."""
    path = Path(path)
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: PathLike, text: str, durable: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` through `atomic_path`."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_torch_save(obj, path: PathLike) -> Path:
    """``torch.save(obj)`` through `atomic_path`: a checkpoint is whole or absent, even after a crash."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    return path


def remove_stale_temporaries(folder: PathLike, names: Optional[Iterable[str]] = None) -> List[Path]:
    """Delete the ``.NAME.PID.tmp`` files that a killed `atomic_path` left in `folder` (only those for NAME
    in `names`, when given). Call it only where no other process writes into `folder`."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    wanted = None if names is None else set(names)
    for p in folder.iterdir():
        m = TMP_NAME.fullmatch(p.name)
        if m and (wanted is None or m["name"] in wanted) and p.is_file():
            remove_quietly(p)
            removed.append(p)
    return removed
