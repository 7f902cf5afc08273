"""`sage-fast demo`: Sage end to end with no download, on CPU, in about a minute.

Builds a small open_clip architecture with random weights, writes a small long-tailed image data
set to disk (an image folder with split files, the generic format of `sage_fast.training.data`), trains
Sage with the project's trainer (`sage_fast.training.trainer`, the same code path as `sage-fast train`) and
reports overall, many-, medium- and few-shot accuracy. The run's outputs (metrics, per-class CSV and
plot, logs, checkpoint, exported adapters) are written under ``--out``/run. A folder that already holds a
demo is refused unless ``--overwrite`` (then its data set and run are replaced; nothing else in it is touched).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import cifar_lt_counts

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190)}
PATTERNS = ("stripes", "checks")


def demo_class_names() -> list[str]:
    return [f"{c}_{p}" for p in PATTERNS for c in COLOURS]


def _draw(colour, pattern: str, rng: np.random.Generator, size: int) -> np.ndarray:
    period = int(rng.integers(4, 9))
    phase = int(rng.integers(0, period))
    yy, xx = np.mgrid[0:size, 0:size]
    if pattern == "stripes":
        mask = ((xx + phase) // (period // 2 + 1)) % 2 == 0
    else:
        mask = (((xx + phase) // period + (yy + phase) // period) % 2) == 0
    img = np.full((size, size, 3), 30.0)
    img[mask] = colour
    img += rng.normal(0, 25, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_demo_dataset(root: str, seed: int = 0, size: int = 32, test_per_class: int = 20) -> dict:
    """Write the demo images and `train.txt`, `test.txt` (lines `relative/path label`) and
    `classnames.txt` under root. Deterministic for a seed. Returns paths and class counts."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = demo_class_names()
    counts = cifar_lt_counts(50.0, len(names), max_count=200)  # CIFAR-100-LT's exponential tail: 200 down to 4
    lines = {"train": [], "test": []}
    for label, name in enumerate(names):
        colour, pattern = COLOURS[name.split("_")[0]], name.split("_")[1]
        for split, n in (("train", counts[label]), ("test", test_per_class)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                rel = f"{split}/{name}/{i:04d}.png"
                Image.fromarray(_draw(colour, pattern, rng, size)).save(os.path.join(root, rel))
                lines[split].append(f"{rel} {label}")
    for split, rows in lines.items():
        with open(os.path.join(root, f"{split}.txt"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(rows) + "\n")
    with open(os.path.join(root, "classnames.txt"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(names) + "\n")
    return {"root": root, "train": os.path.join(root, "train.txt"), "test": os.path.join(root, "test.txt"),
            "classnames": os.path.join(root, "classnames.txt"), "class_names": names, "class_counts": counts}


def demo_overrides(data: dict, out_dir: str, epochs: int = 30, batch_size: int = 32, lr: float = 0.05,
                   seed: int = 0, workers: int = 0) -> dict:
    """The run config of the demo: the generic folder data set, the tiny random-weight CLIP, CPU."""
    return {
        "data.dataset": "folder", "data.root": data["root"], "data.train_split": "train.txt",
        "data.test_split": "test.txt", "data.class_names": "classnames.txt", "data.num_workers": workers,
        # random resized crops of 32 px stripes and checks are too hard for a random-weight model in a minute
        "data.train_augment": "flip",
        "model.name": "sage-tiny", "model.pretrained": None, "model.alpha": 0.1,
        "model.lambdas": [0.015, 0.015, 0.4], "optim.epochs": epochs, "optim.batch_size": batch_size,
        "optim.lr": lr, "train.output_dir": out_dir, "train.seed": seed, "train.device": "cpu",
        "train.ckpt_every_steps": 0, "train.log_every_steps": 5,
    }


def check_demo_folder(out, overwrite: bool = False) -> None:
    """Raise `RunFolderError` unless the demo may write into `out`: nothing there yet in ``data/`` and ``run/``,
    or, with `overwrite`, an earlier demo's (``run/`` a sage-fast run, ``data/`` the demo's data set)."""
    from .run_folder import RunFolderError, check_claim, folder_entries

    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    if data_dir.exists() and not data_dir.is_dir():
        raise RunFolderError(f"{data_dir} is a file: the demo writes its data set there; choose another --out")
    taken = [f"{d.name}/" for d in (data_dir, run_dir) if folder_entries(d)]
    if not taken:
        return
    if not overwrite:
        raise RunFolderError(f"{out} already holds a demo ({', '.join(taken)}): sage-fast demo --overwrite replaces "
                             "it (its data set and run), or choose another --out")
    check_claim(run_dir, fresh=True, overwrite=True, what="--out")
    names_file = data_dir / "classnames.txt"
    if folder_entries(data_dir):
        names = names_file.read_text(encoding="utf-8").split() if names_file.is_file() else None
        if names != demo_class_names():
            raise RunFolderError(f"{data_dir} holds files that are not the demo's data set (no classnames.txt with "
                                 "the demo's classes): --overwrite replaces only an earlier demo; choose another --out")


def run_demo(out: str = "sage_runs/demo", epochs: int = 30, batch_size: int = 32, lr: float = 0.05, seed: int = 0,
             workers: int = 0, log=print, overwrite: bool = False) -> dict:
    """Write the demo data set to ``out/data``, train on it into ``out/run``, and return the final report.

    A folder that holds an earlier demo is refused (`RunFolderError`, `check_demo_folder`) unless `overwrite`,
    which replaces both (the data set first: the run is trained on it). The main process holds ``out``'s lock
    throughout (a second demo into it is refused, `run_folder.RunFolderBusy`). Raises what `train` raises
    (`Preempted`, `trainer.Diverged`)."""
    from .config import build_config
    from .distributed import is_main_process
    from .run_folder import hold_run_folder
    from .trainer import train

    with hold_run_folder(out, is_main_process(), what="--out"):
        check_demo_folder(out, overwrite)
        # 36 px images for the 32 px model: the test transform's Resize(32 * 256 / 224 = 36) is then the identity
        # (resampling blurs the few-pixel stripes, which costs the random-weight model about 20 points)
        data = make_demo_dataset(os.path.join(out, "data"), seed=seed, size=36)
        cfg = build_config(overrides=demo_overrides(data, os.path.join(out, "run"), epochs, batch_size, lr, seed,
                                                    workers))
        log(f"Sage on the tiny open_clip config (random weights): {sum(data['class_counts'])} training images, "
            f"{len(data['class_names'])} classes, {epochs} epochs; outputs in {cfg.train.output_dir}")
        # the data set the run in out/run was trained on has just been written again: that run is replaced
        return train(cfg, overwrite=True)
