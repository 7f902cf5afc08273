"""Image files to 8-bit RGB (`sage_fast.training.data.images`): 16-bit and palette images keep their range and
colours on every reader (the data sets, reduced-scale decoding, prepare, decoding on the GPU path), and paths that
are not regular files are refused without being opened.

16-bit pictures are compared with an 8-bit copy of the same picture (round(v / 257), saved as an ordinary 8-bit
PNG): within one grey level. PIL's plain ``convert("RGB")`` clips 16-bit greyscale to 255 (almost white), which
`test_plain_pil_conversion_clips_16_bit_greyscale` shows, so these tests fail without the conversion.
"""
import os

import numpy as np
import pytest
import torch
from helpers.images import fifo_watchdog, save_image, save_png16
from PIL import Image

from sage_fast.training.data import GpuBatchTransform, ImageListDataset, build_transform
from sage_fast.training.data.images import NotRegularFileError, open_image_file, open_rgb, to_rgb
from sage_fast.training.data.prepare import _encode
from sage_fast.training.data.unreadable import image_problem

SIZE = 40


def _picture16(channels: int, seed: int = 0) -> np.ndarray:
    """A 16-bit picture using the whole range: a diagonal ramp from black to white plus noise."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(SIZE), np.arange(SIZE)) / (2 * SIZE - 2) * 65535
    shape = (SIZE, SIZE) if channels == 1 else (SIZE, SIZE, channels)
    noise = rng.integers(-3000, 3000, shape)
    v = (ramp if channels == 1 else ramp[..., None]) + noise
    if channels == 4:
        v[..., 3] = 65535  # opaque
    return np.clip(v, 0, 65535).astype(np.int64)


def _eight_bit_copy(v16: np.ndarray) -> np.ndarray:
    return np.floor(v16 / 257 + 0.5).astype(np.uint8)


def _pair(tmp_path, channels):
    """(16-bit file, its 8-bit copy as a file, the copy's RGB pixels)."""
    v16 = _picture16(channels)
    p16 = save_png16(tmp_path / f"pic16_{channels}.png", v16)
    v8 = _eight_bit_copy(v16)
    p8 = save_image(tmp_path / f"pic8_{channels}.png", v8) if channels != 1 else tmp_path / "pic8_1.png"
    if channels == 1:
        Image.fromarray(v8).save(p8)
    rgb8 = np.asarray(Image.open(p8).convert("RGB")).astype(int)
    return p16, p8, rgb8


def test_plain_pil_conversion_clips_16_bit_greyscale(tmp_path):
    """The bug: PIL opens a 16-bit grey PNG as mode I;16 and convert("RGB") clips every value above 255."""
    p16, _, rgb8 = _pair(tmp_path, 1)
    clipped = np.asarray(Image.open(p16).convert("RGB")).astype(int)
    assert Image.open(p16).mode == "I;16"
    assert (clipped == 255).mean() > 0.95 and abs(rgb8.mean() - 127.5) < 10


@pytest.mark.parametrize("channels", [1, 3, 4], ids=["grey16", "rgb16", "rgba16"])
def test_16_bit_images_match_their_8_bit_copy(tmp_path, channels):
    p16, p8, rgb8 = _pair(tmp_path, channels)
    got = np.asarray(open_rgb(p16)).astype(int)
    assert got.shape == (SIZE, SIZE, 3)
    assert np.abs(got - rgb8).max() <= 1
    # the data set's reader: the same pixels
    ds = ImageListDataset(tmp_path, [(p16.name, 0), (p8.name, 0)], ["a"])
    assert np.abs(np.asarray(ds.open_image(0)).astype(int) - np.asarray(ds.open_image(1)).astype(int)).max() <= 1


def test_32_bit_integer_greyscale_is_read_as_16_bit(tmp_path):
    """Mode "I" (older Pillows' 16-bit PNGs, some TIFFs): the same 16-bit rule."""
    v16 = _picture16(1)
    im = Image.fromarray(v16.astype(np.int32))
    assert im.mode == "I"
    assert np.abs(np.asarray(to_rgb(im))[..., 0].astype(int) - _eight_bit_copy(v16)).max() == 0


@pytest.mark.parametrize("train", [False, True], ids=["test-transform", "train-transform"])
@pytest.mark.parametrize("fast_decode", [False, True], ids=["pil", "reduced-decode"])
def test_16_bit_images_through_the_transforms(tmp_path, train, fast_decode):
    """The CLIP transforms (plain and data.fast_decode's ReducedDecode, which converts after opening lazily) give
    the 8-bit copy's tensor within one grey level (1 / 255 / CLIP's std)."""
    p16, p8, _ = _pair(tmp_path, 1)
    tf = build_transform(32, train=train, fast_decode=fast_decode, augment="crop_flip")
    ds = ImageListDataset(tmp_path, [(p16.name, 0), (p8.name, 0)], ["a"], transform=tf)
    a, b = ds[(0, 123)].image, ds[(1, 123)].image  # the same seed: the same crop and flip
    assert (a - b).abs().max() <= 1.01 / 255 / 0.26


def test_prepare_writes_a_16_bit_image_as_its_8_bit_copy(tmp_path):
    """sage-fast prepare decodes, converts and re-encodes: the same JPEG bytes as for the 8-bit copy."""
    p16, p8, _ = _pair(tmp_path, 1)
    ds = ImageListDataset(tmp_path, [(p16.name, 0), (p8.name, 0)], ["a"], raw=True)
    assert _encode(ds, 0, 320, 90) == _encode(ds, 1, 320, 90)


@pytest.mark.parametrize("channels", [1, 3], ids=["grey16", "rgb16"])
def test_gpu_decode_path_scales_16_bit_pngs(tmp_path, channels):
    """data.gpu_decode: torchvision decodes 16-bit PNGs to uint16, which the batch transform took for 0..255."""
    p16, p8, _ = _pair(tmp_path, channels)
    ds = ImageListDataset(tmp_path, [(p16.name, 0), (p8.name, 0)], ["a"], raw=True)
    gpu = GpuBatchTransform(32, train=False, device="cpu")
    out, keep = gpu([ds.read_raw(0), ds.read_raw(1)], torch.tensor([0, 1]))
    assert keep.all()
    assert (out[0] - out[1]).abs().max() <= 1.01 / 255 / 0.26


@pytest.mark.parametrize("fmt", ["png", "gif", "bmp"])
def test_palette_images_keep_their_colours(tmp_path, fmt):
    rng = np.random.default_rng(4)
    quantized = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)).quantize(16)
    want = np.asarray(quantized.convert("RGB"))
    path = tmp_path / f"palette.{fmt}"
    quantized.save(path)
    assert Image.open(path).mode == "P"
    assert np.array_equal(np.asarray(open_rgb(path)), want)
    ds = ImageListDataset(tmp_path, [(path.name, 0)], ["a"], raw=True)
    if fmt == "png":  # data.gpu_decode's decoder (torchvision) expands the palette too
        (decoded,) = GpuBatchTransform(32, train=False, device="cpu")._decode([ds.read_raw(0)])
        assert np.array_equal(decoded.permute(1, 2, 0).numpy(), want)


# ---------------------------------------------------------------- paths that are not regular files


@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs os.mkfifo")
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    with fifo_watchdog(path):
        yield path


def test_a_fifo_is_refused_without_being_opened(fifo, tmp_path):
    with pytest.raises(NotRegularFileError, match=r"not a regular file: a FIFO \(named pipe\)"):
        open_image_file(fifo)
    assert image_problem(fifo) == "not a regular file: a FIFO (named pipe)"
    assert image_problem(tmp_path) == "a directory, not a file"
    # the readers of the loaders: an unreadable sample (counted against data.max_unreadable), not a hang
    for raw in (False, True):
        got = ImageListDataset(tmp_path, [(fifo.name, 0)], ["a"], raw=raw)[0]
        assert got.reason == "not a regular file: a FIFO (named pipe)"


def test_a_character_device_is_refused():
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    assert image_problem("/dev/zero") == "not a regular file: a character device"
