"""Checks a run passes before anything is built: the user's mistakes surface in seconds, not after the image
check and the model build (minutes on iNaturalist), and not after training (an unwritable output folder).

`preflight` runs them all (the trainer calls it first); each raises `sage_fast.training.errors.UserError` (or
the model loader's marked errors) with a message that names the config key to fix.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import UserError


def check_output_dir(path) -> None:
    """`path` is a folder that exists and can be written to, or one that can be created.

    Nothing is created: a run that stops at a later check leaves no trace behind. The test is a real
    (anonymous) temporary file, since permission bits do not tell about read-only mounts, quotas or ACLs.
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise UserError(f"train.output_dir={path} {where}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise UserError(f"train.output_dir={path} {where} ({e.strerror or e}); set train.output_dir to a folder "
                        "you can write to") from None


_CUDA = re.compile(r"cuda(:\d+)?")


def check_device(device: str, local_rank: int = 0) -> None:
    """A CUDA device the run names exists here (``auto`` and ``cpu`` always do)."""
    if not _CUDA.fullmatch(device):
        return
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this PyTorch ({torch.__version__}) is built without CUDA"
        else:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = "no GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
        raise UserError(f"train.device={device} but CUDA is not available: {why}; use train.device=cpu, or auto "
                        "(the GPU when there is one)")
    n = torch.cuda.device_count()
    index = int(device.split(":")[1]) if ":" in device else local_rank
    if index >= n:
        how = f"train.device={device}" if ":" in device else f"LOCAL_RANK={local_rank} (train.device={device})"
        raise UserError(f"{how} asks for GPU {index}, but this machine shows {n} (cuda:0..cuda:{n - 1}); "
                        "under torchrun, start at most as many processes per node as there are GPUs")


def check_model_source(model_cfg) -> None:
    """The model name and its pretrained weights (tag or file) exist, before the data is checked and built."""
    from ..model.clip import check_pretrained, model_config

    model_config(model_cfg.name)
    check_pretrained(model_cfg.name, model_cfg.pretrained)


def preflight(cfg, dist_info=None):
    """The checks of a training run, in the order that costs least: the device, then the process group
    (`setup_distributed`, unless `dist_info` is given), the output folder (rank 0), the model and its weights,
    the batch against the number of processes and micro-batches, the image size. -> (`DistInfo`, image size in px)."""
    from .distributed import setup_distributed

    if dist_info is None:
        check_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = dist_info or setup_distributed(cfg.train.device)
    if dist_info.is_main:
        check_output_dir(cfg.train.output_dir)
    check_model_source(cfg.model)
    world, accumulate = dist_info.world_size, cfg.optim.accumulate_steps
    if cfg.optim.batch_size % (world * accumulate):
        parts = f"{world} processes" if accumulate == 1 else (
            f"optim.accumulate_steps={accumulate} x {world} process{'es' if world > 1 else ''}")
        raise UserError(f"optim.batch_size={cfg.optim.batch_size} (the global batch) is not divisible by the "
                        f"{parts}: use a multiple of {world * accumulate}")
    return dist_info, check_image_size(cfg)


def check_image_size(cfg) -> int:
    """``data.image_size`` is null or the model's own (its position embeddings are fixed); -> the image size."""
    from ..model.clip import image_size

    native = image_size(cfg.model.name)
    size = cfg.data.image_size or native
    if size != native:
        raise UserError(f"data.image_size={size} but {cfg.model.name} takes {native} px images (its position "
                        "embeddings are fixed): leave data.image_size null")
    return size
