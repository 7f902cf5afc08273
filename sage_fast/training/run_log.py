"""A training run's logs, written by rank 0: ``train_log.csv``, ``eval_log.csv`` and TensorBoard under ``tb/``.

The CSV files are append-only; a resume drops the rows past the checkpoint's step (and a row a kill tore),
so a resumed run's logs read like an uninterrupted run's.
"""
from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

from ..utils.files import atomic_path

#: the columns of each log
FIELDS = {
    "train": ("step", "epoch", "loss", "lr", "images_per_s"),
    "eval": ("step", "epoch", "overall", "many", "medium", "few", "skipped"),
}


class RunLog:
    """The logs of the run in `out_dir`; a no-op where `enabled` is False (ranks other than 0, or before the
    run opened its folder). resume_step: the checkpoint's global step on resume, else None (fresh logs)."""

    def __init__(self, out_dir=None, enabled: bool = False, tensorboard: bool = False,
                 resume_step: Optional[int] = None):
        self._csv: Dict[str, CSVLog] = {}
        self._tb = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        for kind, fields in FIELDS.items():
            self._csv[kind] = CSVLog(out_dir / f"{kind}_log.csv", fields, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: no TensorBoard log (pip install tensorboard)")
            else:
                self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step)

    def write(self, kind: str, **row) -> None:
        """One row of the ``kind`` log ("train" or "eval"; columns `FIELDS`), and its numbers to TensorBoard."""
        if kind in self._csv:
            self._csv[kind].write(**row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class CSVLog:
    """Append-only CSV with a fixed header; on resume, rows past the checkpoint's step are dropped.

    A kill can tear the last row (or leave NUL bytes where the file system had not written it yet): rows
    that are not whole (no line end, another number of fields, no integer step) are dropped on resume.
    """

    def __init__(self, path: Path, fields: Sequence[str], resume_step: Optional[int] = None):
        self.path, self.fields = Path(path), list(fields)
        if resume_step is not None and self.path.is_file():
            self._rewrite([r for r in self._whole_rows() if int(r["step"]) <= resume_step])
        else:
            self._rewrite([])

    def _whole_rows(self) -> list:
        text = self.path.read_bytes().replace(b"\0", b"").decode("utf-8", errors="replace")
        lines = text.splitlines(keepends=True)
        rows = []
        for line in lines[1:]:
            if not line.endswith("\n"):
                continue
            try:
                (values,) = list(csv.reader([line]))
            except (csv.Error, ValueError):
                continue
            if len(values) != len(self.fields):
                continue
            row = dict(zip(self.fields, values))
            try:
                int(row["step"])
            except ValueError:
                continue
            rows.append(row)
        return rows

    def _rewrite(self, rows) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, self.fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, **row) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, self.fields).writerow({k: _fmt(row.get(k, "")) for k in self.fields})


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v
