"""Split files of the OLTR / LIFT format: one ``relative/path label`` line per sample.

ImageNet-LT (``ImageNet_LT_{train,test}.txt``), Places-LT (``Places_LT_{train,test}.txt``), LIFT's
iNaturalist lists (``iNaturalist18_{train,val}.txt``) and the generic ``folder`` data set use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Tuple

import numpy as np

from ..errors import UserError


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


def read_split_file(path) -> SampleList:
    """``relative/path label`` lines (OLTR / LIFT format) -> [(path, label)], a `SampleList` that knows each
    sample's line. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    out, lines = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
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
