"""Prepared data (``sage-fast prepare``, ``data.prepared=DIR``): tar shards in the webdataset layout and a manifest.

Layout of DIR::

    manifest.json          written last: DIR is a finished preparation when it exists
    train-000000.tar ...   uncompressed POSIX tar; per sample two members, KEY.jpg (JPEG bytes) and KEY.cls
    test-000000.tar ...    (the label as ASCII digits); KEY is the sample's position in its split's listing,
                           nine digits ("000001234"). The webdataset package reads them as they are
                           (tests/training/test_prepare.py); open_clip's training filter, which keeps
                           samples with a caption (txt), would drop them all.

``manifest.json`` (format "sage-fast-prepared", version 1)::

    {"format": "sage-fast-prepared", "version": 1,
     "settings": {"short_side": 320, "quality": 90, "shard_mb": 256,
                  "source": {"dataset": ..., "root": ..., "train_split": ..., ...}},
     "class_names": [C names], "group_counts": [C ints],
     "splits": {"train": {
         "listed": int,                      images the split lists, readable or not
         "class_counts": [C ints],           images written, per class
         "unreadable": [[file, reason], ...] left out (not written)
         "shards": [{"name": "train-000000.tar", "bytes": int, "sha256": hex, "samples": int}, ...],
         "samples": {"shard": [N ints], "offset": [N ints], "size": [N ints], "label": [N ints],
                     "key": [N ints], "source": [N strings]}},   one entry per written image
       "test": {...}}}

``offset`` / ``size`` locate the JPEG bytes of KEY.jpg inside its shard (the tar member's data starts at a
512-byte-aligned offset), so `PreparedDataset` reads one sample with one ``pread``: random access, which the
seeded per-sample augmentation, `TrainSampler` and mid-epoch resume need, with no tar parsing while training.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .images import to_rgb
from .unreadable import UnreadableLimit
from .datasets import LTData, LTDataset

FORMAT = "sage-fast-prepared"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(position: int) -> str:
    return f"{position:09d}"


def read_manifest(directory) -> dict:
    """The manifest of a finished preparation in `directory`; UserError when there is none or it is not one."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"data.prepared: folder not found: {directory}")
    path = directory / MANIFEST
    if not path.is_file():
        unfinished = " (an unfinished preparation: run sage-fast prepare again to finish it)" \
            if any(directory.glob("*.tar")) else ""
        raise UserError(f"data.prepared: {directory} holds no {MANIFEST}{unfinished}; make one with "
                        f"'sage-fast prepare --out {directory} ...'")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"data.prepared: {path} cannot be read as JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"data.prepared: {path} is not a sage-fast prepare manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"data.prepared: {path} has version {manifest.get('version')}; this sage-fast reads "
                        f"version {VERSION}: prepare it again")
    return manifest


class PreparedDataset(LTDataset):
    """One split of a prepared folder: sample i is the JPEG at ``(shard, offset, size)`` of the manifest.

    Reading is one ``os.pread`` on a file descriptor kept open per shard (pread leaves the file position
    alone, so descriptors inherited by forked DataLoader workers are safe to share; they are not pickled).
    """

    def __init__(self, directory, split: dict, class_names, transform=None, raw: bool = False):
        self.directory = Path(directory)
        s = split["samples"]
        self.shard_names = [sh["name"] for sh in split["shards"]]
        self.shard = np.asarray(s["shard"], dtype=np.int32)
        self.offset = np.asarray(s["offset"], dtype=np.int64)
        self.size = np.asarray(s["size"], dtype=np.int64)
        self.sources = list(s.get("source") or [])
        self._fds: Dict[int, int] = {}
        super().__init__(s["label"], class_names, transform, raw)
        for sh in split["shards"]:
            path = self.directory / sh["name"]
            if not path.is_file():
                raise UserError(f"data.prepared: shard {path} is missing (run sage-fast prepare again to redo it)")
            if path.stat().st_size != sh["bytes"]:
                raise UserError(f"data.prepared: shard {path} has {path.stat().st_size} bytes, the manifest says "
                                f"{sh['bytes']} (run sage-fast prepare again: it verifies and redoes damaged shards)")

    def __getstate__(self):
        # also what copy.copy uses (eval.tte's view of the test set): each copy opens, and closes, its own
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def describe(self, index: int) -> str:
        where = f"{self.shard_names[self.shard[index]]} at byte {int(self.offset[index])}"
        return f"{self.sources[index]} ({where})" if self.sources else str(self.directory / where)

    def read_bytes(self, index: int) -> bytes:
        """The JPEG bytes of sample `index`, as written by prepare."""
        k = int(self.shard[index])
        fd = self._fds.get(k)
        if fd is None:
            fd = self._fds[k] = os.open(self.directory / self.shard_names[k], os.O_RDONLY)
        size = int(self.size[index])
        data = os.pread(fd, size, int(self.offset[index]))
        if len(data) != size:
            raise OSError(f"shard truncated: {len(data)} of {size} bytes")
        return data

    def open_lazy(self, index: int) -> Image.Image:
        return Image.open(io.BytesIO(self.read_bytes(index)))

    def open_image(self, index: int) -> Image.Image:
        with self.open_lazy(index) as im:
            return to_rgb(im)

    def read_raw(self, index: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.read_bytes(index)), dtype=torch.uint8)


def load_prepared(cfg, train_transform, test_transform, raw: bool) -> LTData:
    """`LTData` from ``cfg.prepared`` (a `DataConfig`): names, counts and samples from the manifest."""
    directory = Path(cfg.prepared).expanduser()
    manifest = read_manifest(directory)
    names: List[str] = manifest["class_names"]
    sets = []
    for split, tf in (("train", train_transform), ("test", test_transform)):
        entry = manifest["splits"][split]
        ds = PreparedDataset(directory, entry, names, tf, raw)
        what = "training" if split == "train" else "test"
        known = [tuple(u) for u in entry.get("unreadable", [])]
        # the images prepare could not read count against the same limit as those found while training
        UnreadableLimit(what, entry["listed"], cfg.max_unreadable, known, source=str(directory / MANIFEST),
                        stop=split == "train").bind(ds)
        sets.append(ds)
    counts = list(manifest["splits"]["train"]["class_counts"])
    empty = [k for k, c in enumerate(counts) if c == 0]
    if empty:
        raise UserError(f"data.prepared: {len(empty)} classes have no training image in {directory} (first: "
                        f"{empty[:5]}); the loss needs a positive count per class")
    group: Optional[List[int]] = manifest.get("group_counts") or counts
    source = manifest.get("settings", {}).get("source", {})
    return LTData(source.get("dataset", "prepared"), sets[0], sets[1], names, counts, list(group), len(names))
