"""Split files of the OLTR / LIFT format: one ``relative/path label`` line per sample.

ImageNet-LT (``ImageNet_LT_{train,test}.txt``), Places-LT (``Places_LT_{train,test}.txt``), LIFT's
iNaturalist lists (``iNaturalist18_{train,val}.txt``) and the generic ``folder`` data set use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple


def read_split_file(path) -> List[Tuple[str, int]]:
    """``relative/path label`` lines (OLTR / LIFT format) -> [(path, label)]. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            try:
                out.append((parts[0], int(parts[1])))
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{n}: expected 'relative/path label', got {line!r}") from None
    if not out:
        raise ValueError(f"split file {path} holds no samples")
    return out
