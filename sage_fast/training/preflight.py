"""Checks a run passes before anything is built: the user's mistakes surface in seconds, not after the image
check and the model build (minutes on iNaturalist), and not after training (an unwritable output folder).

`Trainer` runs them first; each raises `sage_fast.training.errors.UserError` (or the model loader's marked
errors) with a message that names the config key to fix.
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
