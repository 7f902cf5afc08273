"""Decoding and augmentation on the GPU (``data.gpu_decode``): the workers only read file bytes."""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from .images import tensor_to_8bit
from .unreadable import UnreadableLimit
from .transforms import CLIP_MEAN, CLIP_STD, test_resize_size


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args, **kwargs)


class GpuBatchTransform:
    """Raw batch (file bytes, or HWC uint8 pixels) -> (B, 3, S, S) float CLIP-normalised on `device`.

    JPEGs are decoded with ``torchvision.io.decode_jpeg(..., device=device)`` (nvJPEG on CUDA), other
    formats on the CPU. Augmentation matches `build_transform` in kind (random resized crop with the
    same scale / ratio ranges, flip; or resize + center crop), drawn from each sample's seed, with
    bilinear antialiased resizing (so pixels differ slightly from the PIL bicubic path). Images that fail
    to decode are dropped (``keep``) and, given the split's `UnreadableLimit`, counted against it.
    """

    def __init__(self, image_size: int, train: bool, device, crop_scale: Sequence[float] = (0.08, 1.0),
                 augment: str = "crop_flip", unreadable: Optional[UnreadableLimit] = None):
        self.size, self.train, self.device = int(image_size), bool(train), torch.device(device)
        #: the split's limit: images that fail to decode here count towards data.max_unreadable
        self.unreadable = unreadable
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop = self.train and augment == "crop_flip"
        self.mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    def _decode(self, raws: Sequence[torch.Tensor], seeds: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
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
                    # 16-bit PNGs decode to uint16: scaled to 0..255 like the CPU path (data.images)
                    out[i] = tensor_to_8bit(_quiet(decode_image, r, mode=ImageReadMode.RGB)).to(self.device)
            except RuntimeError as e:
                if self.unreadable is not None:
                    self.unreadable.record_position(i, seeds, f"cannot decode: {e}")
                else:
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

        decoded = self._decode(raws, seeds)
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
