"""Data sets on disk for the tests: images, split files, class-name files, iNaturalist JSON, a CIFAR-100 archive.

Everything is deterministic: the same arguments write the same bytes. Paths may be str or Path; parent
folders are created.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import struct
import zlib
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

Samples = Sequence[Tuple[str, int]]  # (path relative to the image root, label)


def save_image(path, pixels: np.ndarray, fmt: Optional[str] = None) -> Path:
    """Write uint8 (H, W, 3) `pixels` to `path` (format from the suffix unless `fmt`, e.g. "JPEG")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def save_png16(path, values: np.ndarray) -> Path:
    """A 16-bit PNG of `values` (ints in 0..65535): (H, W) greyscale, (H, W, 3) RGB or (H, W, 4) RGBA.

    Written by hand (PIL writes no 16-bit RGB, and tests must not need pypng): one IDAT chunk, filter 0.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    v = np.asarray(values).astype(">u2")
    colour_type = {2: 0, 3: {3: 2, 4: 6}.get(v.shape[-1])}[v.ndim]
    h, w = v.shape[:2]
    raw = b"".join(b"\x00" + v[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def write_image(path, value: int = 0, size: int = 32, fmt: Optional[str] = None) -> Path:
    """A size x size noise image drawn from `value` (other values, other pixels; brighter for larger ones)."""
    rng = np.random.default_rng(value)
    pixels = np.clip(rng.integers(0, 60, (size, size, 3)) + value, 0, 255).astype(np.uint8)
    return save_image(path, pixels, fmt)


def write_images(root, samples: Samples, size: int = 32, fmt: Optional[str] = None) -> None:
    """`write_image(root / path, value=i)` for the i-th (path, label) of `samples`."""
    for i, (rel, _) in enumerate(samples):
        write_image(Path(root) / rel, i, size, fmt)


def write_split_file(path, samples: Iterable[Tuple[str, int]]) -> Path:
    """A split file: one ``relative/path label`` line per sample (the OLTR / LIFT / folder format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{rel} {label}\n" for rel, label in samples))
    return path


def write_class_names(path, names: Iterable[str]) -> Path:
    """One class name per line, in label order (``data.class_names``)."""
    path = Path(path)
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def make_image_folder(root, counts: Sequence[int], test: int = 4, size: int = 32, seed: int = 0) -> Path:
    """The generic ``folder`` data set: class k has counts[k] training and `test` test PNGs of one noisy colour.

    Writes ``{train,test}/c{k}/{i}.png``, ``train.txt`` / ``test.txt`` and ``classnames.txt``
    (``colour_{k}``) under `root`; returns `root`.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    splits = {"train": [], "test": []}
    for k, n in enumerate(counts):
        colour = np.array([(k * 70) % 256, (k * 150 + 40) % 256, (k * 30 + 120) % 256])
        for split, m in (("train", n), ("test", test)):
            for i in range(m):
                pixels = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                rel = f"{split}/c{k}/{i}.png"
                save_image(root / rel, pixels)
                splits[split].append((rel, k))
    for split, samples in splits.items():
        write_split_file(root / f"{split}.txt", samples)
    write_class_names(root / "classnames.txt", (f"colour_{k}" for k in range(len(counts))))
    return root


def write_inat_json(path, files: Samples, categories: Sequence[Tuple[int, str]]) -> Path:
    """An iNaturalist 2018 annotation file (``train2018.json`` format) for (file_name, category_id) pairs."""
    path = Path(path)
    images = [{"id": 100 + i, "file_name": f, "width": 32, "height": 32} for i, (f, _) in enumerate(files)]
    anns = [{"id": i, "image_id": 100 + i, "category_id": c} for i, (_, c) in enumerate(files)]
    cats = [{"id": c, "name": n, "supercategory": "x"} for c, n in categories]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def write_cifar100_archive(root, train_per_class: int = 500, test_per_class: int = 100) -> Path:
    """A fake CIFAR-100 python archive in the official format (Python-2-style pickles, bytes keys).

    Writes ``root/cifar-100-python/{train,test,meta}``; returns `root`. Pixel (0, 0) of each image encodes
    its label (R) and its position in the split modulo 251 (G); its B is 7 for every image, which shows
    whether the reader takes the channel-major rows apart correctly. Class names are ``name_{k}``.
    """
    root = Path(root)
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        rng.shuffle(labels)
        data = np.zeros((len(labels), 3072), np.uint8)
        data[:, 0] = labels
        data[:, 1024] = np.arange(len(labels)) % 251
        data[:, 2048] = 7
        obj = {b"filenames": [b"x.png"] * len(labels), b"batch_label": split.encode(),
               b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": data}
        with open(d / split, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    meta = {b"fine_label_names": [f"name_{k}".encode() for k in range(100)], b"coarse_label_names": []}
    with open(d / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


@contextlib.contextmanager
def fifo_watchdog(fifo, seconds: int = 60):
    """Fail (AssertionError) instead of hanging when something opens the FIFO `fifo` for reading and blocks.

    After `seconds` a SIGALRM opens the FIFO's write end and closes it, which lets a blocked reader (in any
    thread) go on to an empty file, then raises in the main thread. Unix only (os.mkfifo, SIGALRM).
    """
    def unblock_and_fail(*_):
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        raise AssertionError(f"opening the FIFO {fifo} blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, unblock_and_fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
