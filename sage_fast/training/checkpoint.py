"""Files a run writes and reads back: atomic writes, checkpoints, RNG states, the safetensors export.

Checkpoint (``last.pt``, format `CHECKPOINT_VERSION`), a dict loadable with ``torch.load(weights_only=True)``:

    version        int, CHECKPOINT_VERSION
    trainable      {name: tensor} the trainable parameters (CPU copies)
    optimizer      optimizer.state_dict()
    scheduler      scheduler.state_dict()
    epoch, step_in_epoch, global_step, skipped_total   ints (the sampler position and counters, `PROGRESS`)
    rng            `rng_state()` (python, numpy, torch and, when initialised, cuda)
    config         SageConfig.to_dict()
    class_names    [str] * C
    class_counts   [int] * C

Export (``adapters.safetensors``): the trainable parameters as float32 CPU tensors; metadata ``config``,
``class_names`` and ``class_counts`` (JSON text) and ``format`` (`ADAPTERS_FORMAT`).

Every write goes through `atomic_path`: readers never see a half-written file, and a crash or Ctrl-C
keeps the previous file.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

CHECKPOINT_VERSION = 1
ADAPTERS_FORMAT = "sage-fast adapters v1"
#: the counters a checkpoint stores besides the states: where training stands
PROGRESS = ("epoch", "step_in_epoch", "global_step", "skipped_total")


# --------------------------------------------------------------------------------------------------
# Atomic files


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some platforms / file systems cannot open or fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the original error matters more than a leftover temporary file


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it.

    Readers never see a half-written file, and an existing `path` survives a failed write (an
    exception, Ctrl-C)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_torch_save(obj, path) -> None:
    """torch.save through `atomic_path`, fsynced, so a checkpoint is whole or absent, even after a crash."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


# --------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict:
    """The python, numpy, torch (and initialised CUDA) RNG states, in types weights_only loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's legacy state holds an ndarray, which weights_only loading refuses: store it as a tensor
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (after a round trip through torch.save / torch.load)."""
    # torch.load gives the tuples of python's state back as lists
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_state(model, optimizer, scheduler, progress: Mapping[str, int], config: dict,
                     class_names: Sequence[str], class_counts: Sequence[int]) -> dict:
    """The checkpoint dict (see the module docstring); `progress` holds the `PROGRESS` counters."""
    return {
        "version": CHECKPOINT_VERSION,
        "trainable": {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        **{k: progress[k] for k in PROGRESS},
        "rng": rng_state(),
        "config": config,
        "class_names": list(class_names),
        "class_counts": list(class_counts),
    }


def read_checkpoint(path) -> dict:
    """Load a checkpoint on the CPU (weights_only) and check its format version."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not {CHECKPOINT_VERSION}")
    return ckpt


def restore_checkpoint(path, model, optimizer, scheduler, config: dict, class_counts: Sequence[int],
                       device) -> Dict[str, int]:
    """Load `path` into the model, optimizer, scheduler and the global RNGs; return the `PROGRESS` counters.

    Refuses a checkpoint of other classes / counts (ValueError); warns when its ``model`` or ``optim``
    config differs from `config`, since the resumed run then cannot match an uninterrupted one.
    """
    ckpt = read_checkpoint(path)
    if len(ckpt["class_counts"]) != model.num_classes or ckpt["class_counts"] != list(class_counts):
        raise ValueError(f"{path}: checkpoint was trained on other classes / counts than this data set")
    old = ckpt["config"]
    for section in ("model", "optim"):
        if old[section] != config[section]:
            warnings.warn(f"resuming with a different '{section}' config than the checkpoint's; "
                          "the result will not match an uninterrupted run")
    model.load_trainable_state_dict({k: v.to(device) for k, v in ckpt["trainable"].items()})
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return {k: int(ckpt[k]) for k in PROGRESS}


# --------------------------------------------------------------------------------------------------
# The safetensors export, and reading trained weights back


def save_adapters(path, model, config: dict, class_names: Sequence[str], class_counts: Sequence[int]) -> None:
    """The trainable parameters (float32, CPU) as safetensors, with config and classes in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    meta = {"config": json.dumps(config), "class_names": json.dumps(list(class_names)),
            "class_counts": json.dumps(list(class_counts)), "format": ADAPTERS_FORMAT}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_weights(path) -> Dict[str, torch.Tensor]:
    """Trainable parameters from ``adapters.safetensors`` or a checkpoint ``.pt`` (weights_only loading)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["trainable"] if isinstance(ckpt, dict) and "trainable" in ckpt else ckpt


def config_from_weights(path) -> Optional[dict]:
    """The run config stored in a checkpoint or in the safetensors export's metadata, if any."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["config"]) if "config" in meta else None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("config") if isinstance(ckpt, dict) else None
