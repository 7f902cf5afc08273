"""CLIP preprocessing on the CPU (PIL), and the per-sample augmentation seeds.

Determinism: the training sampler hands each sample a seed made from (run seed, epoch, index) by
`sample_seed`, and the random augmentation of that sample is drawn from that seed. Which worker, which
rank, how many processes and whether the run was resumed therefore do not change what a sample looks
like: resumed and distributed runs see exactly the images of an uninterrupted single-process run.
"""
from __future__ import annotations

from typing import Callable, Sequence

# CLIP's normalisation (open_clip.OPENAI_DATASET_MEAN / STD), repeated to keep this module import-light.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
