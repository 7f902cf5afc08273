"""Data set classes: images on disk (`ImageListDataset`) or in memory (`ArrayDataset`), and `LTData`.

Unreadable images (missing, truncated, not an image): indexing returns an `Unreadable` (index, reason)
instead of a `Sample`, `sage_fast.training.data.loaders.collate_skip` drops and counts them, and the
loader counts them against ``data.max_unreadable`` (`sage_fast.training.data.unreadable`); the trainer
reports the count at the end of each epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .images import open_image_file, read_image_bytes, to_rgb
from .unreadable import READ_ERRORS, Unreadable, UnreadableLimit, read_error_reason


class Sample(NamedTuple):
    image: torch.Tensor  # (3, S, S) float; or raw uint8 bytes (1-D) / HWC pixels when the data set is raw
    label: int
    index: int
    seed: int  # the augmentation seed, -1 when none was given


class LTDataset(Dataset):
    """Base: `samples` of (source, label); subclasses say how to open a source.

    Indexing with an int uses the global torch RNG for augmentation; indexing with ``(index, seed)``
    (what `TrainSampler` yields) draws it from `seed`. Returns a `Sample`, or an `Unreadable` for an image
    that cannot be read. With ``raw=True`` no transform runs: the sample holds the file's bytes, for
    decoding on the GPU.
    """

    #: the split's unreadable-image count and limit (set by `build_data`; the loaders check it)
    unreadable: Optional[UnreadableLimit] = None

    def __init__(self, labels: Sequence[int], class_names: Sequence[str], transform: Optional[Callable] = None, raw: bool = False):
        self.targets = [int(t) for t in labels]
        self.class_names = list(class_names)
        self.transform = transform
        self.raw = raw
        bad = [i for i, t in enumerate(self.targets) if not 0 <= t < len(self.class_names)]
        if bad:
            # the builders in `registry` name the split file and line first; this is the last line of defence
            raise UserError(f"labels must lie in [0, {len(self.class_names)}) ({len(self.class_names)} class names), "
                            f"found {self.targets[bad[0]]} ({self.describe(bad[0])})")

    def __len__(self) -> int:
        return len(self.targets)

    def describe(self, index: int) -> str:
        return f"sample {index}"

    def open_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def open_lazy(self, index: int) -> Image.Image:
        """The image opened but not decoded where the format allows it (a transform with ``lazy = True``
        decodes it, e.g. at reduced scale: `sage_fast.training.data.transforms.ReducedDecode`)."""
        return self.open_image(index)

    def read_raw(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key) -> Union[Sample, Unreadable]:
        index, seed = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), -1)
        try:
            if self.raw:
                image = self.read_raw(index)
            else:
                lazy = getattr(self.transform, "lazy", False)
                image = self.open_lazy(index) if lazy else self.open_image(index)
                if self.transform is not None:
                    if seed >= 0:
                        # fork_rng: the main process's RNG stream must not depend on the data (num_workers=0)
                        with torch.random.fork_rng(devices=[]):
                            torch.manual_seed(seed)
                            image = self.transform(image)
                    else:
                        image = self.transform(image)
        except READ_ERRORS as e:
            # no warning here: in a worker process it could not be counted; the loader warns and counts
            return Unreadable(index, read_error_reason(e))
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
        with open_image_file(self.root / self.paths[index]) as im:
            return to_rgb(im)  # the full decode, so truncation raises here

    def open_lazy(self, index: int) -> Image.Image:
        return open_image_file(self.root / self.paths[index])  # PIL closes the file once it has decoded it

    def read_raw(self, index: int) -> torch.Tensor:
        data = read_image_bytes(self.root / self.paths[index])
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
