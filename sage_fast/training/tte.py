"""Test-time ensembling (``eval.tte``), as in LIFT: several fixed crops per test image, logits averaged.

* ``none``: the plain test transform (`build_transform`: Resize(S * 256 / 224) + CenterCrop(S)), one view;
* ``fivecrop``: Resize(S + 24) of the short side (248 for S = 224), then the four corner crops and the
  centre crop of S x S (torchvision's ``FiveCrop``);
* ``tencrop``: those five and their horizontal flips (``TenCrop``).

The crops are cut per image on the CPU (in the loader's workers) and stacked, so a batch is
(B, n, 3, S, S); `tte_logits` sends all B * n crops through the model in one forward and averages the n
logits z^ of each image. No random operation is involved: the result is deterministic.

Resizing is bicubic, like this package's plain test transform (LIFT uses torchvision's default,
bilinear). Used by `Trainer.evaluate` (so by ``sage-fast eval`` and the evaluation at the end of
training) and by ``sage-fast predict``. With ``data.gpu_decode`` the test images are decoded on the GPU,
where no crops are cut: the config refuses that combination.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

TTE_MODES = ("none", "fivecrop", "tencrop")
#: LIFT's ``expand``: the test images are resized to image_size + TTE_EXPAND before cropping
TTE_EXPAND = 24
_VIEWS = {"none": 1, "fivecrop": 5, "tencrop": 10}


def num_views(mode: str) -> int:
    """How many views `mode` averages (1, 5 or 10)."""
    _check(mode)
    return _VIEWS[mode]


def _check(mode: str) -> None:
    if mode not in TTE_MODES:
        raise ValueError(f"eval.tte must be one of {' | '.join(TTE_MODES)}, got {mode!r}")


class _StackCrops:
    """Crops (PIL images) -> (n, 3, S, S) CLIP-normalised. A class, not a lambda: DataLoader workers that
    are spawned (not forked) must pickle the transform."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, crops) -> torch.Tensor:
        from torchvision.transforms import functional as TF

        return torch.stack([TF.normalize(TF.to_tensor(c), self.mean, self.std) for c in crops])


def tte_transform(image_size: int, mode: str) -> Callable:
    """PIL image -> (3, S, S) for ``none`` (the plain test transform), else (n, 3, S, S) crops."""
    from torchvision import transforms as T

    from .data import CLIP_MEAN, CLIP_STD, build_transform

    _check(mode)
    if mode == "none":
        return build_transform(image_size, train=False)
    crop = T.FiveCrop(image_size) if mode == "fivecrop" else T.TenCrop(image_size)
    return T.Compose([T.Resize(image_size + TTE_EXPAND, interpolation=T.InterpolationMode.BICUBIC), crop,
                      _StackCrops(CLIP_MEAN, CLIP_STD)])


def tte_dataset(dataset, mode: str, image_size: int):
    """`dataset` itself for ``none``; otherwise a shallow copy whose samples are the (n, 3, S, S) crops.

    The copy shares the file list and labels; the original keeps its transform.
    """
    _check(mode)
    if mode == "none":
        return dataset
    if getattr(dataset, "raw", False):
        raise ValueError(f"eval.tte={mode!r} needs decoded test images: set data.gpu_decode=false")
    view = copy.copy(dataset)
    view.transform = tte_transform(image_size, mode)
    return view


@torch.no_grad()
def tte_logits(model, images: torch.Tensor) -> torch.Tensor:
    """z^ (B, C) of `images`: (B, 3, S, S) -> ``model.predict(images)``; (B, n, 3, S, S) crops -> the mean of
    the n crops' z^, all B * n crops in one forward."""
    if images.ndim == 4:
        return model.predict(images)
    if images.ndim != 5:
        raise ValueError(f"images must be (B, 3, S, S) or (B, n, 3, S, S) crops, got {tuple(images.shape)}")
    b, n = images.shape[:2]
    return model.predict(images.flatten(0, 1)).float().view(b, n, -1).mean(dim=1)
