"""Long-tailed data sets, CLIP transforms, samplers and loaders.

Data sets (SAGE.md section 4), all built by `build_data(cfg.data, image_size)`:

* ``cifar100_lt``: from the standard CIFAR-100 python archive (``cifar-100-python/{train,test,meta}``);
  class k keeps ``int(500 * ratio ** (-k / 99))`` training images, chosen with a seeded generator.
* ``imagenet_lt`` / ``places_lt``: OLTR split files (``ImageNet_LT_train.txt`` ...) plus an image root.
* ``inat2018``: the official ``train2018.json`` / ``val2018.json`` (or LIFT-style ``iNaturalist18_*.txt``
  lists) plus an image root.
* ``folder``: any image root plus two split files of ``relative/path label`` lines.

Class names come from the data set's metadata (CIFAR ``meta``, iNaturalist ``categories.json`` in the
root, else the JSON's ``categories``, a Places365 category file, an ImageNet synset file, or a
``class_names`` file given by the user), else from the image directories, else ``class k``. Class counts
are counted on the training split.

Determinism: the training sampler hands each sample a seed made from (run seed, epoch, index), and the
random augmentation of that sample is drawn from that seed. Which worker, which rank, how many
processes and whether the run was resumed therefore do not change what a sample looks like: resumed and
distributed runs see exactly the images of an uninterrupted single-process run.

Unreadable images (missing, truncated, not an image) are skipped with a warning and counted; the
collate function drops them, and the trainer reports the count at the end of each epoch.
"""
from __future__ import annotations

import json
import math
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

# CLIP's normalisation (open_clip.OPENAI_DATASET_MEAN / STD), repeated to keep this module import-light.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------------
# Transforms


def test_resize_size(image_size: int) -> int:
    """LIFT's test resize: 256 for 224 crops, scaled for other sizes."""
    return int(image_size * 256 / 224)


def build_transform(image_size: int, train: bool, crop_scale: Sequence[float] = (0.08, 1.0),
                    augment: str = "crop_flip") -> Callable:
    """PIL image -> (3, S, S) float CLIP-normalised tensor.

    train: RandomResizedCrop(S, scale=crop_scale) + RandomHorizontalFlip (augment="crop_flip"), or the test
    transform + RandomHorizontalFlip (augment="flip"); test: Resize(S * 256 / 224) + CenterCrop(S).
    """
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if train and augment == "flip":
        return T.Compose([T.Resize(test_resize_size(image_size), interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(image_size), T.RandomHorizontalFlip()] + norm)
    if augment not in ("crop_flip", "flip"):
        raise ValueError(f"augment must be 'crop_flip' or 'flip', got {augment!r}")
    if train:
        ops = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), interpolation=T.InterpolationMode.BICUBIC),
               T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(test_resize_size(image_size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose(ops + norm)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch (splitmix64 of the three numbers)."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + 1) & mask
    for _ in range(2):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x >> 1


# --------------------------------------------------------------------------------------------------
# Data sets


class Sample(NamedTuple):
    image: torch.Tensor  # (3, S, S) float; or raw uint8 bytes (1-D) / HWC pixels when the data set is raw
    label: int
    index: int
    seed: int  # the augmentation seed, -1 when none was given


class LTDataset(Dataset):
    """Base: `samples` of (source, label); subclasses say how to open a source.

    Indexing with an int uses the global torch RNG for augmentation; indexing with ``(index, seed)``
    (what `TrainSampler` yields) draws it from `seed`. Returns a `Sample`, or None for an unreadable image.
    With ``raw=True`` no transform runs: the sample holds the file's bytes, for decoding on the GPU.
    """

    def __init__(self, labels: Sequence[int], class_names: Sequence[str], transform: Optional[Callable] = None, raw: bool = False):
        self.targets = [int(t) for t in labels]
        self.class_names = list(class_names)
        self.transform = transform
        self.raw = raw
        bad = [t for t in self.targets if not 0 <= t < len(self.class_names)]
        if bad:
            raise ValueError(f"labels must lie in [0, {len(self.class_names)}), found {bad[0]}")

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def open_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def read_raw(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key) -> Optional[Sample]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), -1)
        try:
            if self.raw:
                image = self.read_raw(index)
            else:
                image = self.open_image(index)
                if self.transform is not None:
                    if seed >= 0:
                        # fork_rng: the main process's RNG stream must not depend on the data (num_workers=0)
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            image = self.transform(image)
                    else:
                        image = self.transform(image)
        except _READ_ERRORS as e:
            warnings.warn(f"skipping unreadable image ({self.describe(index)}): {type(e).__name__}: {e}", stacklevel=2)
            return None
        return Sample(image, self.targets[index], index, seed)


class ImageListDataset(LTDataset):
    """Images on disk: ``root / relative_path`` for each (relative_path, label) of a split file."""

    def __init__(self, root, samples: Sequence[Tuple[str, int]], class_names, transform=None, raw=False):
        self.root = Path(root)
        self.paths = [p for p, _ in samples]
        super().__init__([t for _, t in samples], class_names, transform, raw)

    def describe(self, index: int) -> str:
        return str(self.root / self.paths[index])

    def open_image(self, index: int) -> Image.Image:
        with Image.open(self.root / self.paths[index]) as im:
            return im.convert("RGB")  # convert() forces the full decode, so truncation raises here

    def read_raw(self, index: int) -> torch.Tensor:
        data = (self.root / self.paths[index]).read_bytes()
        if not data:
            raise OSError("empty file")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class ArrayDataset(LTDataset):
    """Decoded images in memory: uint8 (N, H, W, 3) (CIFAR)."""

    def __init__(self, images: np.ndarray, labels, class_names, transform=None, raw=False):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = images
        super().__init__(labels, class_names, transform, raw)
        if len(self.images) != len(self.targets):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} labels")

    def open_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def read_raw(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index]))  # (H, W, 3): already decoded


# --------------------------------------------------------------------------------------------------
# CIFAR-100-LT


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


# --------------------------------------------------------------------------------------------------
# Split files and metadata


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


def read_inat_json(path) -> Tuple[List[Tuple[str, int]], Dict[int, str]]:
    """iNaturalist 2018 official JSON -> ([(file_name, category_id)], {category_id: name})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"iNaturalist annotation file not found: {path}")
    with open(path) as f:
        d = json.load(f)
    try:
        files = {im["id"]: im["file_name"] for im in d["images"]}
        samples = [(files[a["image_id"]], int(a["category_id"])) for a in d["annotations"]]
        cats = {int(c["id"]): str(c["name"]) for c in d.get("categories", [])}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not in the iNaturalist format (images / annotations / categories): {e}") from None
    return samples, cats


def read_inat_categories(path) -> Dict[int, str]:
    """iNaturalist's ``categories.json`` (a list of ``{"id", "name", ...}``) -> {category_id: name}."""
    path = Path(path)
    try:
        return {int(c["id"]): str(c["name"]) for c in json.loads(path.read_text())}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an iNaturalist categories list ([{{'id': ..., 'name': ...}}]): {e}") from None


def read_class_names(path) -> List[str]:
    """One class name per line, in label order. A line ``n01440764 tench, Tinca tinca`` gives ``tench``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-names file not found: {path}")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    return [_strip_synset(n) for n in names]


def _strip_synset(line: str) -> str:
    head, _, rest = line.partition(" ")
    if rest and head[:1] == "n" and head[1:].isdigit():
        return rest.split(",")[0].strip()
    return line


def _names_from_paths(samples: Sequence[Tuple[str, int]], num_classes: int, drop_letter: bool = False) -> List[Optional[str]]:
    """Each class's name from the directory of its first sample, minus the leading directories all classes share."""
    dirs: Dict[int, List[str]] = {}
    for p, t in samples:
        if t not in dirs:
            dirs[t] = Path(p).parent.parts
    if len(dirs) < 2:
        return [None] * num_classes
    common = 0
    parts = list(dirs.values())
    while all(len(d) > common + 1 for d in parts) and len({d[common] for d in parts}) == 1:
        common += 1
    out: List[Optional[str]] = [None] * num_classes
    for t, d in dirs.items():
        rest = list(d[common:])
        if drop_letter and len(rest) > 1 and len(rest[0]) == 1:
            rest = rest[1:]  # Places365 keeps categories under their first letter: data_256/a/airfield/...
        if rest:
            out[t] = " ".join(rest)
    return out


def _synset_names(root: Path) -> Optional[Dict[str, str]]:
    for fname in ("LOC_synset_mapping.txt", "synset_words.txt"):
        f = root / fname
        if f.is_file():
            out = {}
            for ln in f.read_text().splitlines():
                wnid, _, rest = ln.strip().partition(" ")
                if rest:
                    out[wnid] = rest.split(",")[0].strip()
            return out
    return None


def _places_names(root: Path) -> Optional[Dict[int, str]]:
    f = root / "categories_places365.txt"
    if not f.is_file():
        return None
    out = {}
    for ln in f.read_text().splitlines():
        if ln.strip():
            cat, label = ln.rsplit(None, 1)
            out[int(label)] = " ".join(cat.strip("/").split("/")[1:])  # "/a/apartment_building/outdoor"
    return out


# --------------------------------------------------------------------------------------------------
# Building a data set from the config


@dataclass
class LTData:
    """Train and test sets of one long-tailed data set.

    class_counts: training images per class (the loss's prior); group_counts: the counts that define the
    many / medium / few groups (the same, except CIFAR-100-LT ratios 50 and 10, which use ratio 100's).
    """

    name: str
    train: LTDataset
    test: LTDataset
    class_names: List[str]
    class_counts: List[int]
    group_counts: List[int]
    num_classes: int


_DEFAULT_SPLITS = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_test.txt"),
    "places_lt": ("Places_LT_train.txt", "Places_LT_test.txt"),
    "folder": ("train.txt", "test.txt"),
}


def _resolve(root: Path, given: str, default: str) -> Path:
    p = Path(given or default)
    return p if p.is_absolute() else root / p


def _counts(labels: Sequence[int], num_classes: int, name: str) -> List[int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    empty = [k for k, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"{name}: {len(empty)} classes have no training image (first: {empty[:5]}); "
                         "the loss needs a positive count per class")
    return counts


def build_data(cfg, image_size: int, raw: bool = False) -> LTData:
    """Build the train / test sets described by a `DataConfig` (see the module docstring)."""
    if not cfg.root:
        raise ValueError("data.root is empty: set it to the data set's image root (or the CIFAR-100 directory)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root does not exist: {root}")
    train_tf = None if raw else build_transform(image_size, train=True, crop_scale=cfg.crop_scale,
                                                augment=cfg.train_augment)
    test_tf = None if raw else build_transform(image_size, train=False)
    user_names = read_class_names(_resolve(root, cfg.class_names, "")) if cfg.class_names else None

    if cfg.dataset == "cifar100_lt":
        images, labels, names = load_cifar100(root, "train")
        keep = cifar100_lt_indices(labels, cfg.imbalance_ratio, cfg.subsample_seed, num_classes=len(names))
        test_images, test_labels, _ = load_cifar100(root, "test")
        names = user_names or names
        train_labels = [labels[i] for i in keep]
        train = ArrayDataset(images[keep], train_labels, names, train_tf, raw)
        test = ArrayDataset(test_images, test_labels, names, test_tf, raw)
        counts = _counts(train_labels, len(names), "CIFAR-100-LT")
        group = cifar_lt_counts(100.0, len(names), int(np.bincount(labels).max()))
        return LTData("cifar100_lt", train, test, names, counts, group, len(names))

    if cfg.dataset == "inat2018":
        tr_path = _resolve(root, cfg.train_split, "train2018.json")
        te_path = _resolve(root, cfg.test_split, "val2018.json")
        if not cfg.train_split and not tr_path.is_file():
            tr_path = _resolve(root, "", "iNaturalist18_train.txt")
            te_path = _resolve(root, cfg.test_split, "iNaturalist18_val.txt")
        cats: Dict[int, str] = {}
        if tr_path.suffix == ".json":
            tr_samples, cats = read_inat_json(tr_path)
        else:
            tr_samples = read_split_file(tr_path)
        te_samples = read_inat_json(te_path)[0] if te_path.suffix == ".json" else read_split_file(te_path)
        # the 2018 release's train2018.json may carry obfuscated category names (the ids as text); the real
        # names were published as categories.json, which LIFT reads: it wins whenever it is there
        if (root / "categories.json").is_file():
            cats = {**cats, **read_inat_categories(root / "categories.json")}
        # category ids are 0..8141 in 2018; a sparse id set is mapped to 0..C-1 in id order
        ids = sorted(set(cats) | {t for _, t in tr_samples} | {t for _, t in te_samples})
        remap = {cid: k for k, cid in enumerate(ids)}
        tr_samples = [(p, remap[t]) for p, t in tr_samples]
        te_samples = [(p, remap[t]) for p, t in te_samples]
        names = user_names or [cats.get(cid, f"class {k}") for k, cid in enumerate(ids)]
        if user_names is None and sum(n.strip().isdigit() for n in names) > len(names) / 2:
            warnings.warn(f"iNaturalist: most class names are just numbers (obfuscated categories in {tr_path.name}?); "
                          "the text classifier needs the species names: put the 2018 categories.json in "
                          f"{root} or set data.class_names")
    else:
        default_tr, default_te = _DEFAULT_SPLITS[cfg.dataset]
        tr_samples = read_split_file(_resolve(root, cfg.train_split, default_tr))
        te_samples = read_split_file(_resolve(root, cfg.test_split, default_te))
        num = max(max(t for _, t in tr_samples), max(t for _, t in te_samples)) + 1
        if user_names is not None:
            names = user_names
        else:
            found: List[Optional[str]] = [None] * num
            if cfg.dataset == "imagenet_lt":
                synsets = _synset_names(root)
                if synsets:
                    wnids = {t: Path(p).parent.name for p, t in tr_samples}
                    found = [synsets.get(wnids.get(k, ""), None) for k in range(num)]
            elif cfg.dataset == "places_lt":
                places = _places_names(root)
                if places:
                    found = [places.get(k) for k in range(num)]
            if any(n is None for n in found):
                derived = _names_from_paths(tr_samples, num, drop_letter=cfg.dataset == "places_lt")
                found = [f if f is not None else d for f, d in zip(found, derived)]
            if any(n is None for n in found) or (cfg.dataset == "imagenet_lt" and not _synset_names(root)):
                warnings.warn(
                    f"{cfg.dataset}: no class-name metadata found in {root}; names come from directories or are "
                    "'class k'. CLIP's zero-shot classifier init needs real names: set data.class_names.",
                    stacklevel=2,
                )
            names = [n if n is not None else f"class {k}" for k, n in enumerate(found)]

    num_classes = len(names)
    counts = _counts([t for _, t in tr_samples], num_classes, cfg.dataset)
    train = ImageListDataset(root, tr_samples, names, train_tf, raw)
    test = ImageListDataset(root, te_samples, names, test_tf, raw)
    return LTData(cfg.dataset, train, test, names, counts, counts, num_classes)


# --------------------------------------------------------------------------------------------------
# Samplers, collate, loaders


class TrainSampler(DistributedSampler):
    """`DistributedSampler` (shuffle, drop_last) that yields ``(index, augmentation seed)`` and can start mid-epoch.

    With R processes of per-process batch b, step t's R local batches are together exactly the global
    batch t (of size R * b) of a single-process run with the same seed: rank r takes every R-th index of
    one permutation. `set_epoch(epoch, start_batch)` skips the first `start_batch` batches (resume).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = int(batch_size)
        self.start_batch = 0
        if self.num_samples < self.batch_size:
            raise ValueError(f"{len(dataset)} training images give {self.num_samples} per process, "
                             f"fewer than one batch of {self.batch_size}")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_batch = int(start_batch)

    def __iter__(self):
        indices = list(super().__iter__())[self.start_batch * self.batch_size:]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return max(self.num_samples - self.start_batch * self.batch_size, 0)

    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size


class ShardSampler(Sampler):
    """Evaluation: rank r reads indices r, r + R, r + 2R, ... (no padding, no sample seen twice)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, n, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class Batch(NamedTuple):
    images: object  # (B, 3, S, S) float, or a list of B raw uint8 tensors; None when every image was unreadable
    labels: torch.Tensor  # (B,) int64
    indices: torch.Tensor  # (B,) int64
    seeds: torch.Tensor  # (B,) int64, -1 without augmentation seed
    skipped: int  # unreadable images dropped from this batch


def collate_skip(items: Sequence[Optional[Sample]]) -> Batch:
    """Stack the readable samples; unreadable ones (None) are dropped and counted."""
    good = [s for s in items if s is not None]
    skipped = len(items) - len(good)
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(None, empty, empty, empty, skipped)
    raw = not torch.is_floating_point(good[0].image)
    images = [s.image for s in good] if raw else torch.stack([s.image for s in good])
    return Batch(
        images,
        torch.tensor([s.label for s in good], dtype=torch.int64),
        torch.tensor([s.index for s in good], dtype=torch.int64),
        torch.tensor([s.seed for s in good], dtype=torch.int64),
        skipped,
    )


def build_loader(dataset, batch_size: int, sampler, cfg, pin_memory: bool, train: bool) -> DataLoader:
    """A DataLoader with the `DataConfig`'s workers, pinned memory, persistent workers and prefetching."""
    workers = int(cfg.num_workers)
    kw = {}
    if workers > 0:
        kw = dict(persistent_workers=bool(cfg.persistent_workers), prefetch_factor=int(cfg.prefetch_factor))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        collate_fn=collate_skip,
        **kw,
    )


# --------------------------------------------------------------------------------------------------
# GPU decoding


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args, **kwargs)


class GpuBatchTransform:
    """Raw batch (file bytes, or HWC uint8 pixels) -> (B, 3, S, S) float CLIP-normalised on `device`.

    JPEGs are decoded with ``torchvision.io.decode_jpeg(..., device=device)`` (nvJPEG on CUDA), other
    formats on the CPU. Augmentation matches `build_transform` in kind (random resized crop with the
    same scale / ratio ranges, flip; or resize + center crop), drawn from each sample's seed, with
    bilinear antialiased resizing (so pixels differ slightly from the PIL bicubic path).
    """

    def __init__(self, image_size: int, train: bool, device, crop_scale: Sequence[float] = (0.08, 1.0),
                 augment: str = "crop_flip"):
        self.size, self.train, self.device = int(image_size), bool(train), torch.device(device)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop = self.train and augment == "crop_flip"
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    def _decode(self, raws: Sequence[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        with warnings.catch_warnings():
            # torchvision >= 0.29 flags its decoders as deprecated in favour of torchcodec; they still work
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        out: List[Optional[torch.Tensor]] = [None] * len(raws)
        jpeg = [i for i, r in enumerate(raws) if r.ndim == 1 and r.numel() > 2 and r[0] == 0xFF and r[1] == 0xD8]
        if jpeg:
            try:
                dec = _quiet(decode_jpeg, [raws[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
                for i, im in zip(jpeg, dec):
                    out[i] = im
            except RuntimeError:
                pass  # one bad file fails the batched call: fall back to one at a time below
        for i, r in enumerate(raws):
            if out[i] is not None:
                continue
            try:
                if r.ndim == 3:
                    out[i] = r.permute(2, 0, 1).to(self.device)
                else:
                    out[i] = _quiet(decode_image, r, mode=ImageReadMode.RGB).to(self.device)
            except RuntimeError as e:
                warnings.warn(f"skipping undecodable image in batch position {i}: {e}", stacklevel=2)
        return out

    def _crop_params(self, h: int, w: int, seed: int) -> Tuple[int, int, int, int, bool]:
        if not self.train:
            return -1, -1, -1, -1, False
        g = torch.Generator().manual_seed(int(seed)) if seed >= 0 else None
        area = h * w
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.crop_scale, generator=g).item()
            ar = math.exp(torch.empty(1).uniform_(*log_ratio, generator=g).item())
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                i = int(torch.randint(0, h - ch + 1, (1,), generator=g))
                j = int(torch.randint(0, w - cw + 1, (1,), generator=g))
                break
        else:
            ch, cw = min(h, w), min(h, w)
            i, j = (h - ch) // 2, (w - cw) // 2
        flip = bool(torch.rand(1, generator=g) < 0.5)
        return i, j, ch, cw, flip

    def __call__(self, raws: Sequence[torch.Tensor], seeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (images (B', 3, S, S), keep (B,) bool): B' <= B images that decoded."""
        import torch.nn.functional as F

        decoded = self._decode(raws)
        keep = torch.tensor([d is not None for d in decoded], dtype=torch.bool)
        outs = []
        for im, seed in zip(decoded, seeds.tolist()):
            if im is None:
                continue
            x = im.unsqueeze(0).float()
            h, w = x.shape[-2:]
            if self.crop:
                i, j, ch, cw, flip = self._crop_params(h, w, seed)
                x = F.interpolate(x[..., i:i + ch, j:j + cw], size=(self.size, self.size), mode="bilinear",
                                  antialias=True, align_corners=False)
                if flip:
                    x = x.flip(-1)
            else:
                short = test_resize_size(self.size)
                nh, nw = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
                top, left = (nh - self.size) // 2, (nw - self.size) // 2
                x = x[..., top:top + self.size, left:left + self.size]
                if self.train:  # augment="flip"
                    g = torch.Generator().manual_seed(int(seed)) if seed >= 0 else None
                    if bool(torch.rand(1, generator=g) < 0.5):
                        x = x.flip(-1)
            outs.append(x)
        if not outs:
            return torch.empty(0, 3, self.size, self.size, device=self.device), keep
        x = torch.cat(outs).clamp_(0, 255).div_(255.0)
        return (x - self.mean) / self.std, keep


# --------------------------------------------------------------------------------------------------
# Throughput


def measure_input_pipeline(loader: DataLoader, num_batches: int = 50, warmup: int = 2) -> Dict[str, float]:
    """Images per second the loader delivers (decode + augment + collate), after `warmup` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it, None)
    n_img = n_batch = skipped = 0
    t0 = time.perf_counter()
    for batch in it:
        n_img += len(batch.labels)
        skipped += batch.skipped
        n_batch += 1
        if n_batch >= num_batches:
            break
    dt = time.perf_counter() - t0
    return {"images": n_img, "batches": n_batch, "seconds": dt, "images_per_s": n_img / dt if dt > 0 else float("nan"),
            "skipped": skipped}
