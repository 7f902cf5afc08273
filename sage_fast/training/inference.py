"""Trained weights at work: the run config they go with, the model they load into, evaluation and prediction.

Used by ``sage-fast eval``, ``predict`` and ``attention`` (`sage_fast.cli`). Which model: the run config
stored with the weights (``adapters.safetensors`` metadata or ``last.pt``), unless a config file or preset
is given; ``section.key=value`` overrides apply on top. The class names are the ones stored with the
weights; weights without them (a bare state dict) take them from the config's data set. The frozen CLIP is
loaded as the config says (``model.pretrained``), so it must be the one the weights were trained on.

Images for prediction: files, or folders (their image files, sorted by name, not recursive). Each image gets
the test transform (or the ``eval.tte`` crops), batches of ``train.eval_batch_size`` go through the model on
``train.device`` (``auto``: the GPU when there is one; bf16 there when ``train.amp``), and the probabilities
are the softmax of z^. An unreadable image is reported in the result and skipped.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import read_weights, stored_run_info
from .config import ConfigError, build_config
from .distributed import autocast, cleanup_distributed, resolve_device, seed_everything
from .run_folder import (
    RunFolderError,
    hold_run_folder,
    holds_training_run,
    refuse_if_held,
    remove_stale_temporaries,
    write_runtime_record,
)

#: the files of a folder that count as images (case-insensitive)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------------
# The trained model


def resolve_run_config(weights, config=None, overrides: Sequence[str] = (), preset: Optional[str] = None):
    """The `SageConfig` for `weights`: the stored one unless `config` / `preset` is given, then `overrides`."""
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    base = None if (config or preset) else stored_run_info(weights)["config"]
    if base is None and not (config or preset):
        raise ConfigError(f"{weights} holds no run config: give the run's --config (or --preset and overrides)")
    return build_config(config, list(overrides), preset=preset, base=base)


def load_trained(weights, cfg, device=None):
    """SageModel in eval mode with the trained parameters of `weights` (safetensors export or checkpoint).

    cfg: the run config (`resolve_run_config`); device: default ``cfg.train.device`` ("auto": the GPU when
    there is one). Class names and counts come from the weights, else from the config's data set.
    """
    from .trainer import build_model

    stored = stored_run_info(weights)
    names, counts = stored["class_names"], stored["class_counts"]
    if names is None or counts is None:
        from .data import build_data
        from .preflight import check_image_size

        data = build_data(cfg.data, check_image_size(cfg))
        names, counts = data.class_names, data.class_counts
    device = torch.device(device or resolve_device(cfg.train.device, 1, 0, torch.cuda.is_available()))
    # forked: the caller's random stream is left alone
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, names, counts, device, progress=cfg.train.progress)
    tensors, _ = read_weights(weights)
    model.load_trainable_state_dict({k: v.to(device) for k, v in tensors.items()})
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_weights(cfg, weights, out_dir=None) -> dict:
    """Load trained parameters (checkpoint or safetensors export, verified) into a fresh model, evaluate on
    the test split (every process of a torchrun job its shard), and write the reports into `out_dir`
    (default ``train.output_dir/eval``), never over a training run's. Builds no optimizer and no training
    loader.

    The report's ``epoch`` / ``step`` are those of the weights (None where the file does not say), and
    ``weights`` names the file.

    weights None: zero-shot CLIP (`sage_fast.model.ZeroShotCLIP`: the frozen encoder and the template
    classifier of `cfg`, nothing trained); default folder ``train.output_dir/zero-shot``, which also gets
    the ``config.yaml`` evaluated; the report has ``epoch`` = ``step`` = 0 and ``zero_shot`` true."""
    from ..model import ZeroShotCLIP
    from ..utils.files import atomic_write_text
    from .data import GpuBatchTransform, build_data
    from .evaluation import evaluate_model
    from .metrics import write_report
    from .preflight import preflight
    from .run_folder import CONFIG
    from .trainer import build_model

    out = Path(out_dir) if out_dir else Path(cfg.train.output_dir) / ("eval" if weights else "zero-shot")
    if holds_training_run(out):
        raise RunFolderError(f"{out} holds a training run: evaluation writes its reports elsewhere (--out)")
    refuse_if_held(out)  # another process writes there now; the reports are written under the lock below
    tensors, info = read_weights(weights) if weights else ({}, {"epoch": 0, "step": 0})
    dist_info, size = preflight(cfg)
    ok = False
    try:
        progress = cfg.train.progress and dist_info.is_main
        seed_everything(cfg.train.seed)
        data = build_data(cfg.data, size, raw=bool(cfg.data.gpu_decode), progress=progress)
        model = build_model(cfg, data.class_names, data.class_counts, dist_info.device, progress=progress)
        if weights:
            model.load_trainable_state_dict({k: v.to(dist_info.device) for k, v in tensors.items()})
        else:
            model = ZeroShotCLIP(model)
        gpu_tf = (GpuBatchTransform(size, False, dist_info.device, unreadable=data.test.unreadable)
                  if cfg.data.gpu_decode else None)
        report = evaluate_model(model, data, cfg, dist_info, size, progress, gpu_tf)
        report["epoch"], report["step"] = info["epoch"], info["step"]
        if weights:
            report["weights"] = str(weights)
        else:
            report["zero_shot"] = True
        if dist_info.is_main:
            if report["skipped"]:
                warnings.warn(f"evaluation: {report['skipped']} unreadable test images skipped")
            # the lock for the writes only (a second writer into `out` is refused above, or waits here for the
            # second it takes, and never mixes its files with these); a run that claimed `out` meanwhile is refused
            with hold_run_folder(out, what="--out", wait=30.0):
                if holds_training_run(out):
                    raise RunFolderError(f"{out} holds a training run: evaluation writes its reports elsewhere "
                                         "(--out)")
                remove_stale_temporaries(out)
                if not weights:  # what was evaluated, before the metrics (`reuse.finished_report` reads both)
                    atomic_write_text(out / CONFIG, cfg.to_yaml())
                write_report(out, report, data)
                write_runtime_record(out, model)
        ok = True
        return report
    finally:
        cleanup_distributed(dist_info, ok)


# --------------------------------------------------------------------------------------------------
# Images


def collect_images(inputs: Sequence) -> List[Path]:
    """Files as given; folders replaced by their image files (`IMAGE_SUFFIXES`), sorted by name.

    A path that does not exist stays in the list (it is reported as unreadable); a folder without image
    files adds nothing (a warning says so).
    """
    out: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                warnings.warn(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(p)
    return out


class ImageFiles(Dataset):
    """Image paths -> ``(index, tensor)``, or ``(index, "error message")`` for an unreadable file."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from .data.images import open_rgb
        from .data.unreadable import READ_ERRORS

        try:
            return i, self.transform(open_rgb(self.paths[i]))  # the full decode: truncation raises here
        except READ_ERRORS as e:
            return i, f"{type(e).__name__}: {e}"


def collate_files(items):
    """-> (indices of the readable images, their stacked tensors or None, [(index, error)] of the others)."""
    good = [(i, x) for i, x in items if not isinstance(x, str)]
    bad = [(i, x) for i, x in items if isinstance(x, str)]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def image_loader(paths: Sequence[Path], transform, batch_size: int, num_workers: int) -> DataLoader:
    batches = -(-len(paths) // batch_size)
    # a worker per batch at most: starting eight processes for three images costs more than it saves
    return DataLoader(ImageFiles(paths, transform), batch_size=batch_size, shuffle=False,
                      num_workers=min(int(num_workers), max(batches - 1, 0)), collate_fn=collate_files)


# --------------------------------------------------------------------------------------------------
# Prediction


@torch.no_grad()
def predict_images(model, cfg, paths: Sequence, topk: int = 5, progress: Optional[bool] = None) -> List[dict]:
    """Top-k predictions of each image, in the order of `paths`: ``{"image": path, "predictions": [{"class":
    name, "index": k, "probability": p}, ...]}``, or ``{"image": path, "error": message}`` for an unreadable
    one. Progress goes to stderr."""
    from tqdm.auto import tqdm

    from .tte import tte_logits, tte_transform

    paths = [Path(p) for p in paths]
    device = next(model.parameters()).device
    topk = max(1, min(int(topk), model.num_classes))
    transform = tte_transform(model.image_size, cfg.eval.tte)
    loader = image_loader(paths, transform, cfg.train.eval_batch_size, cfg.data.num_workers)
    results: List[Optional[dict]] = [None] * len(paths)
    show = cfg.train.progress if progress is None else progress
    for indices, images, bad in tqdm(loader, disable=not show, desc="predict", unit="batch", file=sys.stderr,
                                     dynamic_ncols=True):
        for i, err in bad:
            results[i] = {"image": str(paths[i]), "error": err}
        if images is None:
            continue
        with autocast(device, cfg.train.amp):
            logits = tte_logits(model, images.to(device))
        probs, classes = logits.float().softmax(dim=-1).topk(topk, dim=-1)
        for i, p_row, c_row in zip(indices, probs.tolist(), classes.tolist()):
            results[i] = {"image": str(paths[i]), "predictions": [
                {"class": model.class_names[c], "index": c, "probability": p} for p, c in zip(p_row, c_row)]}
    return results
