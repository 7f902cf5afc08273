"""Input-pipeline benchmark: the images per second the training loader delivers on this machine, to set
beside the training step's images/s (does loading keep up?).

Data: generated JPEGs of 500 x 375 px (quality 90: smooth colour gradients plus pixel noise, a few tens
of KB each, like a photo's size), written to a temporary folder (several processes) and read through the
`folder` data set with sage-fast's own loader (`build_data`, `TrainSampler`, `build_loader`: the data
config's workers, pinned memory on CUDA, persistent workers, prefetching), batch 128 (the training
batch), ViT-B/16's 224 px, crop_flip augmentation. The training split lists each file several times, so
that one epoch is long enough for a steady state; after the first pass the files sit in the page cache,
as a warm data set on a local disk does, so this measures decoding and augmentation, not the disk.

Modes ("case"):
  cpu         data.gpu_decode = false: the workers decode with PIL and augment (RandomResizedCrop, flip,
              normalise); images/s of the batches the loader hands over
  gpu_decode  data.gpu_decode = true: the workers only read file bytes; `GpuBatchTransform` decodes on
              the GPU (torchvision's nvJPEG) and augments there; timed to the synchronised end of the last
              batch, as the training step would receive it
The first `warmup` batches are not timed (at least one per worker: the workers all start together and
the first wave arrives at once), then `batches` batches are. GPU: 16 workers (or the machine's cores),
2,048 files listed 3 times (48 batches: 16 warm-up, 32 timed). CPU smoke run: 2 workers, 24 files,
batch 8, 2 + 4 batches; gpu_decode skipped.

Records: group "input", impl "loader", with images/s, workers, batch and the image count; the summary
sets them beside the fused training step's images/s.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from . import timing
from .timing import DEVICE, ON_GPU

WIDTH, HEIGHT = 500, 375
IMAGE_SIZE = 224


def settings() -> dict:
    if ON_GPU:
        workers = min(16, os.cpu_count() or 16)
        return {"files": 2048, "repeat": 3, "classes": 64, "batch": 128, "workers": workers,
                "warmup": max(16, workers), "batches": 32}
    return {"files": 24, "repeat": 2, "classes": 4, "batch": 8, "workers": 2, "warmup": 2, "batches": 4}


def _write_jpeg(args) -> int:
    """Write one 500 x 375 JPEG: a smooth random colour field plus noise. Returns its size in bytes."""
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    img = np.empty((HEIGHT, WIDTH, 3), np.float32)
    for c in range(3):
        a, b, f = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(a * xx / 40 + b * yy / 30 + f * 6) + rng.normal(0, 12, (HEIGHT, WIDTH))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def make_jpeg_folder(root: Path, files: int, classes: int, repeat: int, processes: int) -> dict:
    """The `folder` data set: files JPEGs under root/train/c{k}/, train.txt listing each `repeat` times,
    test.txt with one file per class. Returns sizes and the generation time."""
    t0 = time.perf_counter()
    jobs, train = [], []
    for i in range(files):
        rel = f"train/c{i % classes}/{i}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(root / rel), i))
        train.append(f"{rel} {i % classes}\n")
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            sizes = pool.map(_write_jpeg, jobs, chunksize=16)
    else:
        sizes = [_write_jpeg(j) for j in jobs]
    (root / "train.txt").write_text("".join(train * repeat))
    (root / "test.txt").write_text("".join(train[:classes]))
    return {"files": files, "mean_file_KB": sum(sizes) / len(sizes) / 1e3, "generate_s": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def jpeg_folder():
    s = settings()
    root = Path(tempfile.mkdtemp(prefix="sage-fast-input-bench-"))
    try:
        info = make_jpeg_folder(root, s["files"], s["classes"], s["repeat"], min(16, os.cpu_count() or 1))
        yield root, info
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(loader, warmup: int, batches: int, transform=None) -> dict:
    """Images/s over `batches` batches after `warmup` untimed ones; `transform` (gpu_decode) applied to each."""
    it = iter(loader)
    n_img = 0

    def take():
        batch = next(it)
        images = batch.images
        if transform is not None:
            images, keep = transform(images, batch.seeds)
        elif ON_GPU:
            images = images.to(DEVICE, non_blocking=True)
        return len(images)

    for _ in range(warmup):
        take()
    timing.sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        n_img += take()
    timing.sync()
    dt = time.perf_counter() - t0
    return {"images": n_img, "seconds": dt, "images_per_s": n_img / dt}


@pytest.mark.parametrize("mode", ["cpu", "gpu_decode"])
def test_input_pipeline(mode, jpeg_folder, benchmark, recorder):
    from sage_fast.training.config import DataConfig
    from sage_fast.training.data import GpuBatchTransform, TrainSampler, build_data, build_loader

    if mode == "gpu_decode" and not ON_GPU:
        pytest.skip("gpu_decode needs CUDA (nvJPEG)")
    benchmark.group = "input_pipeline"
    root, info = jpeg_folder
    s = settings()
    raw = mode == "gpu_decode"
    # allow_duplicates: train.txt lists each file `repeat` times (a large epoch from few files), test.txt some of them
    cfg = DataConfig(dataset="folder", root=str(root), num_workers=s["workers"], gpu_decode=raw,
                     check_images=False, pin_memory=ON_GPU, allow_duplicates=True)
    data = build_data(cfg, IMAGE_SIZE, raw=raw)
    sampler = TrainSampler(data.train, s["batch"], 1, 0, seed=0)
    needed = s["warmup"] + s["batches"]
    assert sampler.batches_per_epoch() >= needed, (sampler.batches_per_epoch(), needed)
    loader = build_loader(data.train, s["batch"], sampler, cfg, pin_memory=cfg.pin_memory, train=True)
    transform = GpuBatchTransform(IMAGE_SIZE, True, DEVICE, cfg.crop_scale, cfg.train_augment) if raw else None
    result = {}

    def run():
        result.update(measure(loader, s["warmup"], s["batches"], transform))

    # One measurement (it takes seconds and starts the workers itself): pytest-benchmark records it as
    # a single round; images/s comes from the loop's own clock.
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    del loader
    record = {
        "group": "input", "case": mode, "impl": "loader",
        "params": {"width": WIDTH, "height": HEIGHT, "image_size": IMAGE_SIZE, "batch": s["batch"],
                   "workers": s["workers"], "files": info["files"], "repeat": s["repeat"],
                   "mean_file_KB": round(info["mean_file_KB"], 1), "warmup_batches": s["warmup"],
                   "timed_batches": s["batches"]},
        "time_s": result["seconds"] / s["batches"],
        "images_per_s": result["images_per_s"],
        "images": result["images"],
        "cpu_count": os.cpu_count(),
        "timing_method": "host clock over the timed batches, device synchronised at both ends",
        "generate_s": round(info["generate_s"], 2),
    }
    recorder.add(record, benchmark.extra_info)
    assert result["images"] == s["batch"] * s["batches"]
