"""Opening image files and converting them to 8-bit RGB: the one place every reader goes through.

* `open_image_file(path)`: PIL's lazy open (header only), after checking that `path` is a regular file: a FIFO
  named in a split file would block the reader forever (opening a FIFO waits for a writer), a device would be
  read without end. A non-regular file raises `NotRegularFileError`, an OSError that the data sets and the
  header check count as an unreadable image (`sage_fast.training.data.unreadable`), naming the file.
* `to_rgb(im)`: the decoded image as 8-bit RGB with its full range. PIL's ``convert("RGB")`` clips 16-bit
  greyscale (modes ``I;16*`` and ``I``, e.g. a 16-bit PNG) to [0, 255], which turns almost every pixel white;
  here 16-bit values v become round(v / 257), the 8-bit value of the same intensity (65535 -> 255). Palette
  images keep their colours (``convert`` looks them up), 16-bit RGB(A) is reduced by PIL itself (the high byte,
  within one grey level of the rounded value). Float images (mode ``F``) keep PIL's conversion (their range
  is not known).
* `open_rgb(path)`: both, fully decoded (a truncated file raises here): for a reader that needs pixels now.
* `tensor_to_8bit(t)`: the same 16-bit rule for a uint16 tensor of ``torchvision.io.decode_image``
  (`sage_fast.training.data.gpu_decode`).

The training and test data sets, the header check, ``sage-fast prepare`` and the prepared shards use these;
``sage-fast predict`` / ``attention`` should too (`open_rgb`).
"""
from __future__ import annotations

import errno
import os
import stat

import numpy as np
from PIL import Image

#: 16-bit to 8-bit: v16 = 257 * v8 maps 0..255 onto 0..65535 exactly (0xFF -> 0xFFFF)
_SCALE_16_TO_8 = 257


class NotRegularFileError(OSError):
    """A path that is not a regular file (FIFO, socket, device): never opened as an image."""


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a file"


def check_regular_file(path) -> None:
    """Raise unless `path` (symbolic links followed) is a regular file: FileNotFoundError / PermissionError from
    the stat, IsADirectoryError for a folder, `NotRegularFileError` for anything else. One stat, no open."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    raise NotRegularFileError(f"not a regular file: {_kind(mode)}")


def open_image_file(path) -> Image.Image:
    """``Image.open(path)`` (lazy: the header is parsed, the pixels are not decoded) of a regular file."""
    check_regular_file(path)
    return Image.open(path)


def read_image_bytes(path) -> bytes:
    """The file's bytes (for decoding elsewhere, e.g. on the GPU), of a regular file; OSError when empty."""
    check_regular_file(path)
    with open(path, "rb") as fh:
        data = fh.read()
    if not data:
        raise OSError("empty file")
    return data


def to_rgb(im: Image.Image) -> Image.Image:
    """`im` decoded as a new 8-bit RGB image, 16-bit greyscale scaled rather than clipped (see the module doc)."""
    if im.mode == "I" or im.mode.startswith("I;16"):
        # "I;16", "I;16B", "I;16L", "I;16N": 16-bit PNG / TIFF greyscale; "I" (32-bit) is what older Pillows
        # and some TIFFs give for the same, so it is read as 16-bit too (values outside 0..65535 are clipped)
        v = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        grey = ((2 * v + _SCALE_16_TO_8) // (2 * _SCALE_16_TO_8)).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey).convert("RGB")
    return im.convert("RGB")


def open_rgb(path) -> Image.Image:
    """The image at `path` decoded to 8-bit RGB (`to_rgb`); the file is closed on return."""
    with open_image_file(path) as im:
        return to_rgb(im)


def tensor_to_8bit(t):
    """A decoded image tensor in 0..255: uint8 as it is, uint16 (torchvision's 16-bit PNGs) as round(v / 257)."""
    import torch

    if t.dtype == torch.uint16:
        v = t.to(torch.int32)
        return torch.div(2 * v + _SCALE_16_TO_8, 2 * _SCALE_16_TO_8, rounding_mode="floor").to(torch.uint8)
    return t
