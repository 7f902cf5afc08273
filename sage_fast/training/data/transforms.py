"""CLIP preprocessing on the CPU (PIL), and the per-sample augmentation seeds.

Determinism: the training sampler hands each sample a seed made from (run seed, epoch, index) by
`sample_seed`, and the random augmentation of that sample is drawn from that seed. Which worker, which
rank, how many processes and whether the run was resumed therefore do not change what a sample looks
like: resumed and distributed runs see exactly the images of an uninterrupted single-process run.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

# CLIP's normalisation (open_clip.OPENAI_DATASET_MEAN / STD), repeated to keep this module import-light.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_resize_size(image_size: int) -> int:
    """LIFT's test resize: 256 for 224 crops, scaled for other sizes."""
    return int(image_size * 256 / 224)


def build_transform(image_size: int, train: bool, crop_scale: Sequence[float] = (0.08, 1.0),
                    augment: str = "crop_flip", fast_decode: bool = False) -> Callable:
    """PIL image -> (3, S, S) float CLIP-normalised tensor.

    train: RandomResizedCrop(S, scale=crop_scale) + RandomHorizontalFlip (augment="crop_flip"), or the test
    transform + RandomHorizontalFlip (augment="flip"); test: Resize(S * 256 / 224) + CenterCrop(S).
    fast_decode: the same, as a `ReducedDecode` that decodes JPEGs at a reduced scale where the crop allows.
    """
    from torchvision import transforms as T

    if fast_decode:
        return ReducedDecode(image_size, train, crop_scale, augment)

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


#: libjpeg's DCT scaling factors (PIL's ``Image.draft``)
DCT_SCALES = (8, 4, 2, 1)


def dct_scale(width: float, height: float, need: float) -> int:
    """The largest DCT reduction r (8, 4, 2 or 1) keeping a width x height region at least `need` px on both sides."""
    return next((r for r in DCT_SCALES if min(width, height) / r >= need), 1)


class ReducedDecode:
    """`build_transform`'s transform, decoding a JPEG at 1/2, 1/4 or 1/8 scale when the output allows it.

    Called on a PIL image that is opened but not decoded yet (``lazy = True`` tells `LTDataset` to hand it
    over so). The geometry is chosen first on the full size, from the same random draws in the same order as
    the torchvision transform (RandomResizedCrop's box, then the flip), so the sample seed gives the same crop
    and flip; then ``Image.draft`` lets libjpeg decode at the largest DCT scale r that keeps the crop at least
    the output size (S for the training crop; the test resize's short side for the test transform), and the
    crop box, divided by r, is resized from the reduced image. The result is a resize of the same region, from
    a pre-shrunk (DCT-averaged) image: a few grey levels off a full decode (see the README). With r = 1
    (small images, small crops, not a JPEG) the ops are torchvision's own: bitwise the same tensor.
    """

    lazy = True

    def __init__(self, image_size: int, train: bool, crop_scale: Sequence[float] = (0.08, 1.0),
                 augment: str = "crop_flip"):
        from torchvision import transforms as T

        if augment not in ("crop_flip", "flip"):
            raise ValueError(f"augment must be 'crop_flip' or 'flip', got {augment!r}")
        self.size = int(image_size)
        self.crop = train and augment == "crop_flip"
        self.flip = bool(train)
        self.scale = tuple(float(c) for c in crop_scale)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.resize = test_resize_size(image_size)
        self.finish = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, im):
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F
        from torchvision.transforms import RandomResizedCrop

        from .images import to_rgb

        bicubic = InterpolationMode.BICUBIC
        w, h = im.size
        if self.crop:
            top, left, ch, cw = RandomResizedCrop.get_params(im, list(self.scale), list(self.ratio))
            r = _draft(im, dct_scale(cw, ch, self.size))
            im = to_rgb(im)
            if r == 1:
                out = F.resized_crop(im, top, left, ch, cw, [self.size, self.size], bicubic, antialias=True)
            else:
                box = (left / r, top / r, (left + cw) / r, (top + ch) / r)
                out = im.resize((self.size, self.size), Image.BICUBIC, box=box)
        else:
            r = _draft(im, dct_scale(w, h, self.resize))
            im = to_rgb(im)
            if r == 1:
                out = F.resize(im, self.resize, bicubic, antialias=True)
            else:
                out = im.resize(_resized_size(w, h, self.resize), Image.BICUBIC, box=(0, 0, w / r, h / r))
            out = F.center_crop(out, self.size)
        if self.flip and torch_rand() < 0.5:
            out = F.hflip(out)
        return self.finish(out)


def torch_rand() -> float:
    import torch

    return float(torch.rand(1))  # RandomHorizontalFlip's draw: same generator, same order


def _resized_size(w: int, h: int, short: int) -> Tuple[int, int]:
    """torchvision Resize(short)'s (width, height) for a w x h image."""
    return (short, int(short * h / w)) if w <= h else (int(short * w / h), short)


def _draft(im, r: int) -> int:
    """Ask libjpeg for 1/r scale; the scale it gave (1 for anything but a JPEG)."""
    if r == 1 or getattr(im, "format", None) != "JPEG":
        return 1
    w, h = im.size
    im.draft("RGB", (w // r, h // r))  # PIL picks the largest s in 8, 4, 2, 1 with size // s >= the request: r
    if im.size == (w, h):
        return 1  # already decoded: draft does nothing
    if im.size != (math.ceil(w / r), math.ceil(h / r)):  # pragma: no cover - a PIL that scales otherwise
        raise RuntimeError(f"JPEG draft gave {im.size} for {w}x{h} at 1/{r}")
    return r
