"""Unreadable images: the check before training (`screen_images`) and the limit during it (`UnreadableLimit`).

A wrong ``data.root`` must not "train" for hours on empty batches, and a data set with a few damaged files
must not stop a run either. So, before training, every listed image is opened and its header parsed
(``data.check_images``; no decode, in threads, sharded over the processes of a distributed run), the
unreadable ones are left out (the class counts the loss uses count only readable images) and the run stops
when more than ``data.max_unreadable`` of a split is unreadable, naming examples. Files that pass the header
check and fail to decode later (a truncated JPEG) count towards the same limit while training
(`UnreadableLimit.record`), and the run stops when it is passed.
"""
from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from PIL import Image

from ..errors import UserError
from .images import open_image_file

#: what PIL raises for a missing, truncated or corrupt file, or one that is not an image
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: files per task of the thread pool: large enough that scheduling costs nothing, small for a smooth bar
CHUNK = 256
#: files opened per split when data.check_images is false (evenly spread): enough to catch a wrong root
PROBE = 256
#: examples named in a message
EXAMPLES = 5
#: unreadable files found while training that get a warning of their own
WARN_FILES = 20


class Unreadable(NamedTuple):
    """What a data set returns instead of a `Sample` for an image it cannot read."""

    index: int
    reason: str


class UnreadableImagesError(UserError):
    """Too many images of a split cannot be read (see `UnreadableLimit`)."""


def read_error_reason(e: BaseException) -> str:
    """A short reason for a read failure: "file not found", "not an image", or the exception's text."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "a directory, not a file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(e, OSError) and e.errno is None:
        return str(e)  # PIL's own: "image file is truncated (3 bytes not processed)"
    return f"{type(e).__name__}: {e}"


def image_problem(path) -> Optional[str]:
    """Why `path` cannot be used as an image (None: it can): open it and parse its header, no decode.
    A FIFO, socket or device is not opened (a FIFO would block): "not a regular file: a FIFO (named pipe)"."""
    try:
        with open_image_file(path) as im:
            w, h = im.size
        if not (w > 0 and h > 0):
            return f"image of size {w}x{h}"
    except READ_ERRORS as e:
        return read_error_reason(e)
    return None


def _dist_world():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def find_unreadable(paths: Sequence[str], what: str = "images", progress: bool = False,
                    threads: Optional[int] = None) -> Dict[int, str]:
    """{position in `paths`: reason} for the files `image_problem` rejects.

    Threads, since the work is waiting on the file system (PIL's header parsers release little CPU). In a
    distributed run every process checks its share and the answers are gathered, so all processes leave
    out the same images; every process must call this (it is a collective then).
    """
    world, rank = _dist_world()
    n = len(paths)
    chunks = [range(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)][rank::world]
    found: Dict[int, str] = {}

    def check(chunk: range) -> Tuple[Dict[int, str], int]:
        out = {}
        for i in chunk:
            reason = image_problem(paths[i])
            if reason is not None:
                out[i] = reason
        return out, len(chunk)

    if chunks:
        from tqdm.auto import tqdm

        workers = threads or min(32, 4 * (os.cpu_count() or 1))
        ex = ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks))), thread_name_prefix="image-check")
        bar = tqdm(total=sum(len(c) for c in chunks), disable=not progress or rank != 0, desc=f"checking {what}",
                   unit="img", dynamic_ncols=True, smoothing=0.05)
        try:
            for part, size in ex.map(check, chunks):
                found.update(part)
                bar.update(size)
        finally:
            bar.close()
            ex.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: do not wait for the queued chunks
    if world > 1:
        import torch.distributed as dist

        parts: List[Optional[Dict[int, str]]] = [None] * world
        dist.all_gather_object(parts, found)
        found = {i: r for part in parts for i, r in (part or {}).items()}
    return found


def _examples(items: Sequence[Tuple[str, str]]) -> str:
    shown = "; ".join(f"{where} ({reason})" for where, reason in items[:EXAMPLES])
    more = len(items) - EXAMPLES
    return shown + (f"; and {more} more" if more > 0 else "")


class UnreadableLimit:
    """The unreadable images of one split, counted against ``data.max_unreadable``.

    total: the images the split lists (readable or not); known: those found unreadable before training
    ((file, reason) pairs, already left out of the data set); describe: data-set index -> file, for those
    found while loading. `record` takes a batch's unreadable images and raises `UnreadableImagesError` once
    more than the limit are known (for the training split; the test split warns instead, since stopping at
    the final evaluation would throw away a finished training: its report counts them as "skipped").

    In a distributed run each process sees 1/R of every epoch's images, so it extrapolates its own finds
    times R: the process that passes the limit stops, and with it the job.
    """

    def __init__(self, split: str, total: int, max_fraction: float, known: Sequence[Tuple[str, str]] = (),
                 describe: Optional[Callable[[int], str]] = None, source: str = "", stop: bool = True):
        self.split, self.total, self.max_fraction = split, int(total), float(max_fraction)
        self.known = list(known)
        self._describe = describe  # a bound method of the data set: worker processes may pickle this object
        self.source = source
        self.stop = stop
        self.found: Dict[int, str] = {}  # data-set index -> reason, found while loading
        self.last_batch = None  # the batch the loader yielded last (see `record_position`)
        self._warned = False

    def __getstate__(self):
        return {**self.__dict__, "last_batch": None}

    def bind(self, dataset) -> None:
        """Count for `dataset`: its loaders check this limit, its files name the images found while loading."""
        self._describe = dataset.describe
        dataset.unreadable = self

    def describe(self, index: int) -> str:
        return self._describe(index) if self._describe is not None else f"sample {index}"

    @property
    def allowed(self) -> int:
        return int(math.floor(self.max_fraction * self.total + 1e-9))

    def count(self) -> int:
        world, _ = _dist_world()
        return len(self.known) + len(self.found) * world

    def examples(self) -> List[Tuple[str, str]]:
        return self.known + [(self.describe(i), r) for i, r in self.found.items()]

    def message(self, skipped: bool = False) -> str:
        n, total = self.count(), self.total
        listed = f" listed in {self.source}" if self.source else ""
        return (f"{n} of the {total} {self.split} images{listed} ({n / max(total, 1):.1%}) cannot be read, more than "
                f"data.max_unreadable={self.max_fraction:g} allows ({self.allowed}): {_examples(self.examples())}. "
                + ("They are skipped. " if skipped else "")
                + "Replace or remove them, or raise data.max_unreadable to go on without them")

    def check(self) -> None:
        """Raise (training split) or warn once (test split) when more images than allowed are unreadable."""
        if self.count() <= self.allowed:
            return
        if self.stop:
            raise UnreadableImagesError(self.message())
        if not self._warned:
            self._warned = True
            warnings.warn(self.message(skipped=True), stacklevel=3)

    def record(self, unreadable: Sequence[Tuple[int, str]]) -> None:
        """Images the loader could not read (data-set index, reason); each is counted once, however often seen."""
        new = [(int(i), r) for i, r in unreadable if int(i) not in self.found]
        for i, r in new:
            self.found[i] = r
            # one line per file, up to a point: a limit of 1% of iNaturalist would allow thousands
            if len(self.found) <= WARN_FILES:
                more = " (further ones are counted, not listed)" if len(self.found) == WARN_FILES else ""
                warnings.warn(f"skipping unreadable {self.split} image {self.describe(i)}: {r}{more}", stacklevel=3)
        if new:
            self.check()

    def record_position(self, position: int, seeds, reason: str) -> None:
        """An image of the last batch, at `position`, that failed to decode after loading (``data.gpu_decode``).

        The transform sees the batch's images and seeds, not its indices: `seeds` being the last batch's
        own tensor identifies the batch, whose indices then name the file.
        """
        b = self.last_batch
        if b is not None and b.seeds is seeds and position < len(b.indices):
            self.record([(int(b.indices[position]), reason)])
            return
        self.found[-1 - len(self.found)] = reason  # unknown file: still counted
        self.check()


def _probe_positions(n: int) -> List[int]:
    if n <= PROBE:
        return list(range(n))
    return sorted({round(k * (n - 1) / (PROBE - 1)) for k in range(PROBE)})


def screen_images(root: Path, samples: Sequence[Tuple[str, int]], split: str, cfg, source: str = "",
                  progress: bool = False) -> Tuple[List[int], UnreadableLimit]:
    """The positions of `samples` whose images can be read, and the split's `UnreadableLimit`.

    cfg: the run's `DataConfig` (check_images, max_unreadable). Raises `UnreadableImagesError` when no image
    can be read, or more than the limit cannot.
    """
    base = str(root)
    paths = [os.path.join(base, p) for p, _ in samples]  # str, not Path: 437k of them for iNaturalist
    n = len(paths)
    if cfg.check_images:
        bad = find_unreadable(paths, f"{split} images", progress)
        checked = n
    else:
        probe = _probe_positions(n)
        part = find_unreadable([paths[i] for i in probe], f"{split} images (sample)", False)
        bad = {probe[j]: r for j, r in part.items()}
        checked = len(probe)
    known = [(paths[i], bad[i]) for i in sorted(bad)]
    limit = UnreadableLimit(split, n, cfg.max_unreadable, known, source=source, stop=(split == "training"))
    if checked and len(bad) == checked:
        listed = f" listed in {source}" if source else ""
        sampled = "" if checked == n else f"{checked} sampled of the "
        hint = ""
        if all(r == "file not found" for r in bad.values()):
            hint = f" Is data.root={root} the folder the paths in the split file are relative to?"
        raise UnreadableImagesError(f"none of the {sampled}{n} {split} images{listed} can be read: "
                                    f"{_examples(known)}.{hint}")
    if len(bad) > limit.allowed:
        raise UnreadableImagesError(limit.message())
    if bad:
        warnings.warn(f"{len(bad)} of the {n} {split} images cannot be read and are left out "
                      f"(data.max_unreadable={cfg.max_unreadable:g} allows {limit.allowed}): {_examples(known)}",
                      stacklevel=2)
    return [i for i in range(n) if i not in bad], limit
