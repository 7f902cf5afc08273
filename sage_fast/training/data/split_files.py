"""Split files of the OLTR / LIFT format: one ``relative/path label`` line per sample.

ImageNet-LT (``ImageNet_LT_{train,test}.txt``), Places-LT (``Places_LT_{train,test}.txt``), LIFT's
iNaturalist lists (``iNaturalist18_{train,val}.txt``) and the generic ``folder`` data set use it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from ..errors import UserError
from .text_files import read_lines


class SampleList(list):
    """[(relative path, label)] that remembers where each sample was declared, so that an error about a
    sample can name the file and line (or the annotation) the user has to fix.

    source: the file; locate: sample position -> its place in the file ("12" for line 12); None: the file only.
    """

    def __init__(self, items: Iterable[Tuple[str, int]] = (), source=None,
                 locate: Optional[Callable[[int], str]] = None, sep: str = ":"):
        super().__init__(items)
        self.source, self.locate, self.sep = source, locate, sep

    def where(self, i: int) -> str:
        """``train.txt:12``: where sample `i` comes from."""
        if self.source is None:
            return f"sample {i}"
        if self.locate is None:
            return str(self.source)
        return f"{self.source}{self.sep}{self.locate(i)}"

    def relabeled(self, labels: Iterable[int]) -> "SampleList":
        """The same samples and places with other labels (iNaturalist's category ids -> 0..C-1)."""
        return SampleList(((p, int(t)) for (p, _), t in zip(self, labels)), self.source, self.locate, self.sep)

    def subset(self, positions) -> "SampleList":
        """The samples at `positions`, still located in the file (unreadable images left out)."""
        positions = list(positions)
        locate = self.locate
        return SampleList((self[i] for i in positions), self.source,
                          (lambda j: locate(positions[j])) if locate is not None else None, self.sep)


def where(samples, i: int) -> str:
    """Where sample `i` of `samples` was declared, when they know (`SampleList`); else ``sample i``."""
    return samples.where(i) if isinstance(samples, SampleList) else f"sample {i}"


def same_file_key(path: str) -> str:
    """What two listed paths share when they name one file: ``a/./b.png`` and ``a//b.png`` are ``a/b.png``."""
    return os.path.normpath(path)


def first_repeat(samples: Sequence[Tuple[str, int]]) -> Optional[Tuple[int, int, int]]:
    """(first position, repeated position, number of repeats) of the first file listed twice in `samples`, or
    None when every file is listed once."""
    seen: Dict[str, int] = {}
    found, repeats = None, 0
    for j, (p, _) in enumerate(samples):
        key = same_file_key(p)
        i = seen.setdefault(key, j)
        if i != j:
            repeats += 1
            if found is None:
                found = (i, j)
    return None if found is None else (*found, repeats)


def first_shared(train: Sequence[Tuple[str, int]], test: Sequence[Tuple[str, int]]) -> Optional[Tuple[int, int, int]]:
    """(train position, test position, number of test samples in the training split) of the first test file that
    the training split lists too, or None."""
    in_train: Dict[str, int] = {}
    for i, (p, _) in enumerate(train):
        in_train.setdefault(same_file_key(p), i)
    found, shared = None, 0
    for j, (p, _) in enumerate(test):
        i = in_train.get(same_file_key(p))
        if i is not None:
            shared += 1
            if found is None:
                found = (i, j)
    return None if found is None else (*found, shared)


def read_split_file(path) -> SampleList:
    """``relative/path label`` lines (OLTR / LIFT format, UTF-8) -> [(path, label)], a `SampleList` that knows
    each sample's line. Blank lines are ignored."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"split file not found: {path}")
    out, lines = [], []
    for n, line in enumerate(read_lines(path, "split file"), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        try:
            out.append((parts[0], int(parts[1])))
        except (IndexError, ValueError):
            raise UserError(f"{path}:{n}: expected 'relative/path label' (an integer label), got {line!r}") from None
        lines.append(n)
    if not out:
        raise UserError(f"split file {path} holds no samples")
    line_of = np.asarray(lines, dtype=np.int64)  # 8 bytes a sample: iNaturalist's lists hold 437k
    return SampleList(out, path, lambda i: str(int(line_of[i])))
