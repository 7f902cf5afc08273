"""The data sets a run can name (``data.dataset``), each built from the config by a registered builder.

* ``cifar100_lt``: from the standard CIFAR-100 python archive (``cifar-100-python/{train,test,meta}``);
  class k keeps ``int(500 * ratio ** (-k / 99))`` training images, chosen with a seeded generator.
* ``imagenet_lt`` / ``places_lt``: OLTR split files (``ImageNet_LT_train.txt`` ...) plus an image root.
* ``inat2018``: the official ``train2018.json`` / ``val2018.json`` (or LIFT-style ``iNaturalist18_*.txt``
  lists) plus an image root.
* ``folder``: any image root plus two split files of ``relative/path label`` lines.

With ``data.prepared=DIR`` none of these is read: the samples, class names and counts come from the
manifest of ``sage-fast prepare`` (`sage_fast.training.data.shards`).

Class names come from the data set's metadata (CIFAR ``meta``, iNaturalist ``categories.json`` in the
root, else the JSON's ``categories``, a Places365 category file, an ImageNet synset file, or a
``class_names`` file given by the user), else from the image directories, else ``class k``. Class counts
are counted on the training split, over the images that can be read.

Before anything is trained the builders check what the user gave: every label is a class index (an error
names the split file and line, or the iNaturalist annotation), no image is listed twice in a split or in both
splits and no two classes of a ``class_names`` file share a name (unless ``data.allow_duplicates``; repeated
names from the data set's own metadata only warn), every class has a training image, and the images can be
read (`sage_fast.training.data.unreadable.screen_images`: ``data.check_images``,
``data.max_unreadable``). A mistake raises `sage_fast.training.errors.UserError` (or FileNotFoundError for
a missing root or split file), which the command prints as one line.

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

from ..errors import UserError
from .unreadable import screen_images
from .cifar import cifar100_lt_indices, cifar_lt_counts, load_cifar100
from .class_names import names_from_paths, places_names, read_class_names, synset_names
from .datasets import ArrayDataset, ImageListDataset, LTData
from .inaturalist import read_inat_categories, read_inat_json
from .split_files import SampleList, first_repeat, first_shared, read_split_file, where
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
    #: a progress bar while the images are checked (`sage_fast.training.data.unreadable`)
    progress: bool = False

    def path(self, given: str, default: str) -> Path:
        """`given` (or `default` when empty), relative to the root unless absolute."""
        return _resolve(self.root, given, default)

    def split_path(self, key: str, default: str) -> Path:
        """The split file ``data.<key>`` (train_split / test_split) names, or `default`; it must exist."""
        given = getattr(self.cfg, key)
        path = self.path(given, default)
        if not path.exists():
            how = f"data.{key}={given}" if given else f"data.{key} is empty: {self.name}'s default {default}"
            raise FileNotFoundError(f"split file not found: {path} ({how}; relative paths are resolved against "
                                    "data.root)")
        return path

    @property
    def names_from(self) -> str:
        """Where the number of classes comes from, for messages."""
        return f"data.class_names ({self.cfg.class_names}) lists" if self.user_names is not None else "there are"


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


def build_data(cfg, image_size: int, raw: bool = False, progress: bool = False) -> LTData:
    """Build the train / test sets a `DataConfig` describes, with the builder registered for ``cfg.dataset``.

    image_size: the side S of the (3, S, S) images the transforms produce; raw: no transform (see
    `BuildContext.raw`); progress: a progress bar while the images are checked.
    """
    fast = bool(getattr(cfg, "fast_decode", False))
    if getattr(cfg, "prepared", ""):
        from .shards import load_prepared

        train_tf = None if raw else build_transform(image_size, train=True, crop_scale=cfg.crop_scale,
                                                    augment=cfg.train_augment, fast_decode=fast)
        test_tf = None if raw else build_transform(image_size, train=False, fast_decode=fast)
        return load_prepared(cfg, train_tf, test_tf, raw)  # data.dataset, root and splits: the manifest's
    builder = _BUILDERS.get(cfg.dataset)
    if builder is None:
        raise UserError(f"data.dataset: expected one of {' | '.join(map(repr, _BUILDERS))}, got {cfg.dataset!r}")
    if not cfg.root:
        raise UserError("data.root is empty: set it to the data set's image root (or the CIFAR-100 directory)")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root does not exist: {root}")
    if not root.is_dir():
        raise UserError(f"data.root is a file, not a folder: {root}")
    user_names = None
    if cfg.class_names:
        names_file = _resolve(root, cfg.class_names, "")
        if not names_file.exists():
            raise FileNotFoundError(f"data.class_names: file not found: {names_file} (relative paths are resolved "
                                    "against data.root)")
        user_names = read_class_names(names_file, allow_duplicates=bool(getattr(cfg, "allow_duplicates", False)))
    train_tf = None if raw else build_transform(image_size, train=True, crop_scale=cfg.crop_scale,
                                                augment=cfg.train_augment, fast_decode=fast)
    test_tf = None if raw else build_transform(image_size, train=False, fast_decode=fast)
    return builder(BuildContext(cfg.dataset, cfg, root, train_tf, test_tf, raw, user_names, progress))


def _resolve(root: Path, given: str, default: str) -> Path:
    p = Path(given or default)
    return p if p.is_absolute() else root / p


def _class_counts(labels: Sequence[int], num_classes: int, name: str) -> List[int]:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    empty = [k for k, c in enumerate(counts) if c == 0]
    if empty:
        raise UserError(f"{name}: {len(empty)} classes have no training image (first: {empty[:5]}); "
                        "the loss needs a positive count per class")
    return counts


def _labels(samples: Samples) -> np.ndarray:
    return np.fromiter((t for _, t in samples), dtype=np.int64, count=len(samples))


def check_labels(samples: Samples, num_classes: Optional[int], names_from: str = "there are",
                 shown: Callable[[int], str] = lambda t: f"label {t}") -> None:
    """Every label a class index in [0, num_classes) (None: only >= 0); an error names the sample's file and
    line (`SampleList`). names_from: "data.class_names (...) lists" or "there are", for the message."""
    labels = _labels(samples)
    bad = np.flatnonzero((labels < 0) | (labels >= (num_classes if num_classes is not None else np.inf)))
    if not len(bad):
        return
    i = int(bad[0])
    t = int(labels[i])
    if t < 0:
        reason = "is negative: labels are class indices 0, 1, ..."
    else:
        reason = f"is not a class index: {names_from} {num_classes} classes (labels 0..{num_classes - 1})"
    more = f" ({len(bad) - 1} more samples have such labels)" if len(bad) > 1 else ""
    raise UserError(f"{where(samples, i)}: {shown(t)} {reason}{more}")


def _checked_counts(ctx: BuildContext, train: Samples, test: Samples, names: List[str],
                    unreadable: Optional[Samples] = None, num_from: str = "") -> List[int]:
    """Training images per class; a class without any is an error naming why (only in the test split, in no
    split file, or its images unreadable), since the loss needs a positive count per class."""
    num = len(names)
    counts = np.bincount(_labels(train), minlength=num).tolist()
    empty = [k for k, c in enumerate(counts) if c == 0]
    if not empty:
        return counts
    lost = np.bincount(_labels(unreadable), minlength=num) if unreadable else np.zeros(num, np.int64)
    in_test: Dict[int, int] = {}
    wanted = set(empty)
    for i, (_, t) in enumerate(test):
        if t in wanted and t not in in_test:
            in_test[t] = i
    parts = []
    for k in empty[:5]:
        if lost[k]:
            parts.append(f"class {k} ({names[k]!r}): its {lost[k]} listed images cannot be read")
        elif k in in_test:
            parts.append(f"class {k} ({names[k]!r}) is only in the test split ({where(test, in_test[k])})")
        else:
            parts.append(f"class {k} ({names[k]!r}) is in neither split")
    more = f"; and {len(empty) - 5} more" if len(empty) > 5 else ""
    source = getattr(train, "source", None) or f"{ctx.name}'s training split"
    raise UserError(f"{len(empty)} of the {num} classes have no {'readable ' if unreadable else ''}training image in "
                    f"{source}: {'; '.join(parts)}{more}. The loss needs at least one image per class{num_from}")


_ALLOW = "set data.allow_duplicates=true to use the lists as they are"


def check_repeats(train: Samples, test: Samples, allow: bool = False) -> None:
    """Refuse (UserError) a file listed twice in a split, or in both splits, naming the first case's places.

    A repeated line trains (or evaluates) on its image twice, silently reweighting the classes the loss's counts
    describe; a test image that is also a training image makes the test accuracy a training accuracy. `allow`
    (``data.allow_duplicates``): accept both.
    """
    if allow:
        return
    for split, samples in (("training", train), ("test", test)):
        found = first_repeat(samples)
        if found is not None:
            i, j, n = found
            labels = samples[i][1], samples[j][1]
            differ = f" with another label ({labels[1]}, there {labels[0]})" if labels[0] != labels[1] else ""
            more = f"; {n} lines of the {split} split repeat an earlier one" if n > 1 else ""
            raise UserError(f"{where(samples, j)}: {samples[j][0]!r} is listed again{differ}, first at "
                            f"{where(samples, i)}{more}: each would count twice in the {split} split. Remove the "
                            f"repeated lines, or {_ALLOW}")
    found = first_shared(train, test)
    if found is not None:
        i, j, n = found
        raise UserError(f"{where(test, j)}: test image {test[j][0]!r} is also a training image ({where(train, i)}); "
                        f"{n} of the {len(test)} test images are: the test accuracy would be measured on training "
                        f"images. Use disjoint splits, or {_ALLOW}")


def _warn_repeated_names(names: Sequence[str], source: str) -> None:
    """Names found in the data set's metadata (not the user's file) that two classes share: a warning, since the
    user cannot fix the metadata (ImageNet's first synset names hold "crane" twice) but can set data.class_names."""
    first: Dict[str, int] = {}
    shared = []
    for k, name in enumerate(names):
        j = first.setdefault(name, k)
        if j != k:
            shared.append(f"{name!r} (classes {j} and {k})")
    if shared:
        warnings.warn(f"{source}: {len(shared)} class names are shared by two classes: {', '.join(shared[:5])}"
                      f"{' ...' if len(shared) > 5 else ''}; such classes start from the same text classifier row. "
                      "Give each a distinct name in a data.class_names file", stacklevel=4)


def _image_lists(ctx: BuildContext, train: Samples, test: Samples, names: List[str], num_from: str = "") -> LTData:
    """Check labels, repeated files, classes and images (`screen_images`), then build the two `ImageListDataset`s.

    num_from: how the number of classes was found, when it is the largest label + 1 (for messages).
    """
    for samples in (train, test):
        check_labels(samples, len(names), ctx.names_from)
    _checked_counts(ctx, train, test, names, num_from=num_from)  # before spending time on the images
    check_repeats(train, test, bool(getattr(ctx.cfg, "allow_duplicates", False)))
    if ctx.user_names is None:
        _warn_repeated_names(names, ctx.name)
    datasets, train_kept, lost = [], train, None
    for split, samples, tf in (("training", train, ctx.train_transform), ("test", test, ctx.test_transform)):
        keep, limit = screen_images(ctx.root, samples, split, ctx.cfg, str(getattr(samples, "source", "") or ""),
                                    ctx.progress)
        kept = samples
        if len(keep) < len(samples):
            kept = samples.subset(keep) if isinstance(samples, SampleList) else [samples[i] for i in keep]
            if split == "training":
                left = set(keep)
                train_kept, lost = kept, [s for i, s in enumerate(samples) if i not in left]
        ds = ImageListDataset(ctx.root, kept, names, tf, ctx.raw)
        limit.bind(ds)
        datasets.append(ds)
    counts = _checked_counts(ctx, train_kept, test, names, unreadable=lost, num_from=num_from)
    return LTData(ctx.name, datasets[0], datasets[1], names, counts, counts, len(names))


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
    train = read_split_file(ctx.split_path("train_split", default_train))
    test = read_split_file(ctx.split_path("test_split", default_test))
    for samples in (train, test):
        check_labels(samples, None)  # a negative label first: the largest label sets the number of classes
    num_from = ""
    if ctx.user_names is not None:
        names = ctx.user_names
    else:
        tr, te = _labels(train), _labels(test)
        top, i = (train, int(tr.argmax())) if tr.max() >= te.max() else (test, int(te.argmax()))
        num = int(max(tr.max(), te.max())) + 1
        num_from = (f" (without data.class_names the number of classes is the largest label + 1: {num}, from "
                    f"{where(top, i)})")
        names = _split_file_names(ctx, train, num, metadata, dirs_are_names, drop_letter)
    return _image_lists(ctx, train, test, names, num_from)


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
    defaults = ("train2018.json", "val2018.json")
    if not cfg.train_split and not ctx.path("", defaults[0]).is_file():
        defaults = ("iNaturalist18_train.txt", "iNaturalist18_val.txt")  # LIFT's lists
        if not ctx.path("", defaults[0]).is_file():
            raise FileNotFoundError(f"split file not found: neither train2018.json nor iNaturalist18_train.txt is in "
                                    f"data.root={root} (or set data.train_split)")
    tr_path = ctx.split_path("train_split", defaults[0])
    te_path = ctx.split_path("test_split", defaults[1])
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
    for samples in (tr_samples, te_samples):
        check_labels(samples, None, shown=lambda t: f"category_id {t}")
    # category ids are 0..8141 in 2018; a sparse id set is mapped to 0..C-1 in id order
    ids = sorted(set(cats) | {t for _, t in tr_samples} | {t for _, t in te_samples})
    remap = {cid: k for k, cid in enumerate(ids)}
    tr_samples = tr_samples.relabeled(remap[t] for _, t in tr_samples)
    te_samples = te_samples.relabeled(remap[t] for _, t in te_samples)
    names = ctx.user_names or [cats.get(cid, f"class {k}") for k, cid in enumerate(ids)]
    for samples in (tr_samples, te_samples):
        check_labels(samples, len(names), ctx.names_from,
                     shown=lambda k: f"category_id {ids[k]} (class {k}: the ids in increasing order)")
    if ctx.user_names is None and sum(n.strip().isdigit() for n in names) > len(names) / 2:
        warnings.warn(f"iNaturalist: most class names are just numbers (obfuscated categories in {tr_path.name}?); "
                      "the text classifier needs the species names: put the 2018 categories.json in "
                      f"{root} or set data.class_names")
    return _image_lists(ctx, tr_samples, te_samples, names)


@register_dataset("folder")
def build_folder(ctx: BuildContext) -> LTData:
    return _split_file_data(ctx, "train.txt", "test.txt")
