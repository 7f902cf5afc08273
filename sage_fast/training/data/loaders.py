"""Samplers, the collate function that drops unreadable images, DataLoaders and their throughput."""
from __future__ import annotations

import time
from typing import Dict, NamedTuple, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from ..errors import UserError
from .unreadable import Unreadable, UnreadableLimit
from .datasets import Sample
from .transforms import sample_seed


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
            per = f" per process ({num_replicas} processes)" if num_replicas > 1 else ""
            raise UserError(f"optim.batch_size={self.batch_size * num_replicas} is larger than the training set: "
                            f"{len(dataset)} readable training images give {self.num_samples}{per}, fewer than "
                            f"one batch of {self.batch_size}{per} (epochs drop the last incomplete batch); "
                            "lower optim.batch_size")

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
    unreadable: Tuple[Tuple[int, str], ...] = ()  # (data-set index, reason) of the dropped ones, where known


def collate_skip(items: Sequence[Union[Sample, Unreadable, None]]) -> Batch:
    """Stack the readable samples; unreadable ones (`Unreadable`, or None) are dropped and counted."""
    good = [s for s in items if isinstance(s, Sample)]
    skipped = len(items) - len(good)
    unreadable = tuple((int(s.index), s.reason) for s in items if isinstance(s, Unreadable))
    if not good:
        empty = torch.empty(0, dtype=torch.int64)
        return Batch(None, empty, empty, empty, skipped, unreadable)
    raw = not torch.is_floating_point(good[0].image)
    images = [s.image for s in good] if raw else torch.stack([s.image for s in good])
    return Batch(
        images,
        torch.tensor([s.label for s in good], dtype=torch.int64),
        torch.tensor([s.index for s in good], dtype=torch.int64),
        torch.tensor([s.seed for s in good], dtype=torch.int64),
        skipped,
        unreadable,
    )


class CheckedLoader:
    """A DataLoader whose batches' unreadable images are counted against the data set's `UnreadableLimit`.

    Iterating raises `UnreadableImagesError` (training split) once more images than ``data.max_unreadable``
    allows turned out unreadable; everything else is the wrapped DataLoader's (``.loader``).
    """

    def __init__(self, loader: DataLoader, limit: UnreadableLimit):
        self.loader, self.limit = loader, limit

    def __iter__(self):
        for batch in self.loader:
            if batch.unreadable:
                self.limit.record(batch.unreadable)
            self.limit.last_batch = batch
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name in ("loader", "limit"):  # not set yet (unpickling, copying): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def unreadable_limit(dataset, cfg, train: bool) -> UnreadableLimit:
    """The data set's `UnreadableLimit` (`build_data` sets it); one from `cfg` for a data set built otherwise."""
    limit = getattr(dataset, "unreadable", None)
    if limit is None:
        split = "training" if train else "test"
        describe = getattr(dataset, "describe", None)
        limit = UnreadableLimit(split, len(dataset), getattr(cfg, "max_unreadable", 0.01), describe=describe,
                                stop=train)
        try:
            dataset.unreadable = limit  # one count for all of the data set's loaders
        except AttributeError:
            pass
    return limit


def build_loader(dataset, batch_size: int, sampler, cfg, pin_memory: bool, train: bool) -> CheckedLoader:
    """A DataLoader with the `DataConfig`'s workers, pinned memory, persistent workers and prefetching,
    checking the unreadable images it meets against ``cfg.max_unreadable`` (`CheckedLoader`)."""
    workers = int(cfg.num_workers)
    kw = {}
    if workers > 0:
        kw = dict(persistent_workers=bool(cfg.persistent_workers), prefetch_factor=int(cfg.prefetch_factor))
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=train,
        collate_fn=collate_skip,
        **kw,
    )
    return CheckedLoader(loader, unreadable_limit(dataset, cfg, train))


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


def batch_on_device(batch: Batch, device: torch.device, gpu_transform=None):
    """-> (images (B, 3, S, S) on `device`, or None when no image of the batch is left; labels (B,) on `device`).

    gpu_transform: the split's `GpuBatchTransform` when ``data.gpu_decode`` (the batch then holds raw bytes;
    images that fail to decode are dropped with their labels)."""
    labels, images = batch.labels, batch.images
    if images is not None and gpu_transform is not None:
        images, keep = gpu_transform(images, batch.seeds)
        labels = labels[keep]
    if images is None or len(labels) == 0:
        return None, labels.to(device)
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def bench_input_pipeline(data, batch_size: int, data_cfg, seed: int = 0, num_batches: int = 50) -> Dict[str, float]:
    """Images/s of the training input pipeline alone (read, decode, augment, collate; no model) over `data`
    (an `LTData`), as one process with the run's loader settings (`data_cfg`, ``cfg.data``)."""
    sampler = TrainSampler(data.train, batch_size, 1, 0, seed)
    loader = build_loader(data.train, batch_size, sampler, data_cfg, pin_memory=False, train=True)
    return measure_input_pipeline(loader, num_batches)
