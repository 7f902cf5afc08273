"""CIFAR-100-LT from the standard CIFAR-100 python archive (``cifar-100-python/{train,test,meta}``).

Class k keeps ``int(500 * ratio ** (-k / 99))`` training images, chosen with a seeded generator; the
test split is the full balanced one (100 images per class).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np


def cifar_lt_counts(ratio: float, num_classes: int = 100, max_count: int = 500) -> List[int]:
    """Class k keeps int(max_count * ratio ** (-k / (num_classes - 1))) images (10,847 for ratio 100)."""
    return [int(max_count * ratio ** (-k / (num_classes - 1))) for k in range(num_classes)]


class _CifarUnpickler(pickle.Unpickler):
    """Reads the CIFAR python archive without running arbitrary code.

    The archive is pickled dicts of lists, bytes and numpy arrays; only the globals that rebuild a numpy
    array (and ``_codecs.encode``, which Python 3 protocol-2 pickles use for bytes) are allowed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR archive refers to {module}.{name}, which is not allowed")
        if module == "_codecs":
            import codecs

            return codecs.encode
        core = np._core if hasattr(np, "_core") else np.core
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        return getattr(core.numeric if name == "_frombuffer" else core.multiarray, name)


def _load_cifar_file(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-100 archive file not found: {path}")
    with open(path, "rb") as f:
        # encoding="bytes": the official files were written by Python 2 (cPickle)
        obj = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_dir(root) -> Path:
    root = Path(root)
    if (root / "cifar-100-python").is_dir():
        return root / "cifar-100-python"
    return root


def load_cifar100(root, split: str) -> Tuple[np.ndarray, List[int], List[str]]:
    """(images uint8 (N, 32, 32, 3), fine labels, the 100 fine class names) of ``train`` or ``test``."""
    d = _cifar_dir(root)
    data = _load_cifar_file(d / split)
    meta = _load_cifar_file(d / "meta")
    raw, labels = np.asarray(data.get("data")), data.get("fine_labels")
    if raw.ndim != 2 or raw.shape[1] != 3072 or labels is None or len(labels) != raw.shape[0]:
        raise ValueError(f"{d / split}: expected 'data' (N, 3072) and N 'fine_labels', got {raw.shape}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
    images = raw.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), [int(t) for t in labels], names


def cifar100_lt_indices(labels: Sequence[int], ratio: float, seed: int = 0, num_classes: int = 100) -> np.ndarray:
    """Indices of the long-tailed subset: class k keeps `cifar_lt_counts(ratio)[k]` images, seeded choice."""
    labels = np.asarray(labels)
    per_class = np.bincount(labels, minlength=num_classes)
    max_count = int(per_class.max())
    counts = cifar_lt_counts(ratio, num_classes, max_count)
    rng = np.random.default_rng(seed)
    keep = []
    for k, n in enumerate(counts):
        idx = np.flatnonzero(labels == k)
        if len(idx) < n:
            raise ValueError(f"class {k} has {len(idx)} training images, fewer than the {n} CIFAR-100-LT keeps")
        keep.append(np.sort(rng.choice(idx, size=n, replace=False)))
    return np.concatenate(keep)
