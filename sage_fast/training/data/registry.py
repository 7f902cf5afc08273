"""The data sets a run can name (``data.dataset``), each built from the config by a registered builder.

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

This registry is the one list of data-set names: the run config validates ``data.dataset`` against
`dataset_names()`. A new data set is a function ``fn(ctx: BuildContext) -> LTData`` decorated with
``@register_dataset("name")``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cifar import cifar100_lt_indices, cifar_lt_counts, load_cifar100
from .class_names import names_from_paths, places_names, read_class_names, synset_names
from .datasets import ArrayDataset, ImageListDataset, LTData
from .inaturalist import read_inat_categories, read_inat_json
from .split_files import read_split_file
from .transforms import build_transform

Samples = List[Tuple[str, int]]


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets from `build_data`: the config, the checked root, transforms and the user's names."""

    #: the registered name (``cfg.dataset``)
    name: str
    #: the run config's ``data`` section (`sage_fast.training.config.DataConfig`)
    cfg: object
    #: ``cfg.root`` with ``~`` expanded; it exists
    root: Path
    #: PIL image -> (3, S, S) tensor; None when `raw`
    train_transform: Optional[Callable]
    test_transform: Optional[Callable]
    #: no transform: samples hold file bytes (or HWC pixels) for `GpuBatchTransform`
    raw: bool
    #: from ``cfg.class_names``; they win over the data set's own names
    user_names: Optional[List[str]]

    def path(self, given: str, default: str) -> Path:
        """`given` (or `default` when empty), relative to the root unless absolute."""
        return _resolve(self.root, given, default)


Builder = Callable[[BuildContext], LTData]
_BUILDERS: Dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator: the function builds the data set `name` (``data.dataset=name`` in a run config)."""

    def register(fn: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"data set {name!r} is already registered (by {_BUILDERS[name].__qualname__})")
        _BUILDERS[name] = fn
        return fn

    return register


def dataset_names() -> Tuple[str, ...]:
    """The registered data-set names, in registration order."""
    return tuple(_BUILDERS)


def build_data(cfg, image_size: int, raw: bool = False) -> LTData:
    """Build the train / test sets a `DataConfig` describes, with the builder registered for ``cfg.dataset``.

    image_size: the side S of the (3, S, S) images the transforms produce; raw: no transform (see
    `BuildContext.raw`).
    """
    builder = _BUILDERS.get(cfg.dataset)
    if builder is None:
        raise ValueError(f"data.dataset: expected one of {' | '.join(map(repr, _BUILDERS))}, got {cfg.dataset!r}")
    if not cfg.root:
        raise ValueError("data.root is empty: set it to the data set's image root (or the CIFAR-100 directory)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root does not exist: {root}")
    train_tf = None if raw else build_transform(image_size, train=True, crop_scale=cfg.crop_scale,
                                                augment=cfg.train_augment)
    test_tf = None if raw else build_transform(image_size, train=False)
    user_names = read_class_names(_resolve(root, cfg.class_names, "")) if cfg.class_names else None
    return builder(BuildContext(cfg.dataset, cfg, root, train_tf, test_tf, raw, user_names))


def _resolve(root: Path, given: str, default: str) -> Path:
    p = Path(given or default)
    return p if p.is_absolute() else root / p


def _class_counts(labels: Sequence[int], num_classes: int, name: str) -> List[int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    empty = [k for k, c in enumerate(counts) if c == 0]
    if empty:
        raise ValueError(f"{name}: {len(empty)} classes have no training image (first: {empty[:5]}); "
                         "the loss needs a positive count per class")
    return counts


def _image_lists(ctx: BuildContext, train: Samples, test: Samples, names: List[str]) -> LTData:
    counts = _class_counts([t for _, t in train], len(names), ctx.name)
    return LTData(ctx.name, ImageListDataset(ctx.root, train, names, ctx.train_transform, ctx.raw),
                  ImageListDataset(ctx.root, test, names, ctx.test_transform, ctx.raw), names, counts, counts,
                  len(names))


# --------------------------------------------------------------------------------------------------
# The data sets


@register_dataset("cifar100_lt")
def build_cifar100_lt(ctx: BuildContext) -> LTData:
    images, labels, names = load_cifar100(ctx.root, "train")
    keep = cifar100_lt_indices(labels, ctx.cfg.imbalance_ratio, ctx.cfg.subsample_seed, num_classes=len(names))
    test_images, test_labels, _ = load_cifar100(ctx.root, "test")
    names = ctx.user_names or names
    train_labels = [labels[i] for i in keep]
    train = ArrayDataset(images[keep], train_labels, names, ctx.train_transform, ctx.raw)
    test = ArrayDataset(test_images, test_labels, names, ctx.test_transform, ctx.raw)
    counts = _class_counts(train_labels, len(names), "CIFAR-100-LT")
    # the paper groups the classes of every ratio (50 and 10 too) by ratio 100's counts
    group = cifar_lt_counts(100.0, len(names), int(np.bincount(labels).max()))
    return LTData("cifar100_lt", train, test, names, counts, group, len(names))


def _split_file_names(ctx: BuildContext, train: Samples, num: int,
                      metadata: Optional[Callable[[Path, Samples, int], Optional[List[Optional[str]]]]],
                      dirs_are_names: bool, drop_letter: bool = False) -> List[str]:
    """Names from `metadata` (None: no metadata file), gaps filled from the directories, else ``class k``.

    dirs_are_names: False where the directories hold ids rather than names (ImageNet's wnids), so a
    missing metadata file deserves a warning even when every class got a directory name.
    """
    found = metadata(ctx.root, train, num) if metadata else None
    no_metadata = found is None
    if found is None:
        found = [None] * num
    if any(n is None for n in found):
        derived = names_from_paths(train, num, drop_letter=drop_letter)
        found = [f if f is not None else d for f, d in zip(found, derived)]
    if any(n is None for n in found) or (no_metadata and not dirs_are_names):
        warnings.warn(
            f"{ctx.name}: no class-name metadata found in {ctx.root}; names come from directories or are "
            "'class k'. CLIP's zero-shot classifier init needs real names: set data.class_names.",
            stacklevel=5,  # the caller of build_data
        )
    return [n if n is not None else f"class {k}" for k, n in enumerate(found)]


def _split_file_data(ctx: BuildContext, default_train: str, default_test: str, metadata=None,
                     dirs_are_names: bool = True, drop_letter: bool = False) -> LTData:
    train = read_split_file(ctx.path(ctx.cfg.train_split, default_train))
    test = read_split_file(ctx.path(ctx.cfg.test_split, default_test))
    num = max(max(t for _, t in train), max(t for _, t in test)) + 1
    if ctx.user_names is not None:
        names = ctx.user_names
    else:
        names = _split_file_names(ctx, train, num, metadata, dirs_are_names, drop_letter)
    return _image_lists(ctx, train, test, names)


def _imagenet_metadata(root: Path, train: Samples, num: int) -> Optional[List[Optional[str]]]:
    synsets = synset_names(root)
    if not synsets:
        return None
    wnids = {t: Path(p).parent.name for p, t in train}
    return [synsets.get(wnids.get(k, ""), None) for k in range(num)]


def _places_metadata(root: Path, train: Samples, num: int) -> Optional[List[Optional[str]]]:
    places = places_names(root)
    if not places:
        return None
    return [places.get(k) for k in range(num)]


@register_dataset("imagenet_lt")
def build_imagenet_lt(ctx: BuildContext) -> LTData:
    return _split_file_data(ctx, "ImageNet_LT_train.txt", "ImageNet_LT_test.txt", _imagenet_metadata,
                            dirs_are_names=False)


@register_dataset("places_lt")
def build_places_lt(ctx: BuildContext) -> LTData:
    return _split_file_data(ctx, "Places_LT_train.txt", "Places_LT_test.txt", _places_metadata, drop_letter=True)


@register_dataset("inat2018")
def build_inat2018(ctx: BuildContext) -> LTData:
    cfg, root = ctx.cfg, ctx.root
    tr_path = ctx.path(cfg.train_split, "train2018.json")
    te_path = ctx.path(cfg.test_split, "val2018.json")
    if not cfg.train_split and not tr_path.is_file():
        tr_path = ctx.path("", "iNaturalist18_train.txt")
        te_path = ctx.path(cfg.test_split, "iNaturalist18_val.txt")
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
    names = ctx.user_names or [cats.get(cid, f"class {k}") for k, cid in enumerate(ids)]
    if ctx.user_names is None and sum(n.strip().isdigit() for n in names) > len(names) / 2:
        warnings.warn(f"iNaturalist: most class names are just numbers (obfuscated categories in {tr_path.name}?); "
                      "the text classifier needs the species names: put the 2018 categories.json in "
                      f"{root} or set data.class_names")
    return _image_lists(ctx, tr_samples, te_samples, names)


@register_dataset("folder")
def build_folder(ctx: BuildContext) -> LTData:
    return _split_file_data(ctx, "train.txt", "test.txt")
