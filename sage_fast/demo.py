"""`sage-fast demo`: Sage end to end with no download, on CPU, in about a minute.

Builds a small open_clip architecture with random weights, writes a small long-tailed image data
set to disk (an image folder with split files, the generic format of `sage_fast.data`), trains
Sage for a few epochs and prints overall, many-, medium- and few-shot accuracy.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190)}
PATTERNS = ("stripes", "checks")


def demo_class_names() -> list[str]:
    return [f"{c}_{p}" for p in PATTERNS for c in COLOURS]


def demo_class_counts(num_classes: int, head: int = 200, ratio: float = 50.0) -> list[int]:
    """Exponential long tail: class k keeps int(head * ratio^(-k/(C-1))) images (200 down to 4)."""
    return [int(head * ratio ** (-k / max(num_classes - 1, 1))) for k in range(num_classes)]


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
    counts = demo_class_counts(len(names))
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
        with open(os.path.join(root, f"{split}.txt"), "w") as fh:
            fh.write("\n".join(rows) + "\n")
    with open(os.path.join(root, "classnames.txt"), "w") as fh:
        fh.write("\n".join(names) + "\n")
    return {"root": root, "train": os.path.join(root, "train.txt"), "test": os.path.join(root, "test.txt"),
            "classnames": os.path.join(root, "classnames.txt"), "class_names": names, "class_counts": counts}


def _load_split(root: str, split_file: str, mean, std):
    from PIL import Image

    images, labels = [], []
    with open(split_file) as fh:
        for line in fh:
            if line.strip():
                rel, label = line.rsplit(maxsplit=1)
                arr = np.asarray(Image.open(os.path.join(root, rel)).convert("RGB"), dtype=np.float32) / 255.0
                images.append(arr)
                labels.append(int(label))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, torch.tensor(labels)


def group_accuracy(pred: torch.Tensor, target: torch.Tensor, class_counts) -> dict:
    """Overall top-1 (over samples) and the mean per-class accuracy of the many- (> 100),
    medium- (20 to 100) and few-shot (< 20) classes, in percent."""
    counts = torch.as_tensor(class_counts)
    num_classes = counts.numel()
    hits = torch.zeros(num_classes).index_add_(0, target, (pred == target).float())
    totals = torch.zeros(num_classes).index_add_(0, target, torch.ones_like(target, dtype=torch.float))
    per_class = hits / totals.clamp(min=1)
    seen = totals > 0
    result = {"overall": 100.0 * float((pred == target).float().mean())}
    for group, mask in (("many", counts > 100), ("medium", (counts >= 20) & (counts <= 100)), ("few", counts < 20)):
        sel = mask & seen
        result[group] = 100.0 * float(per_class[sel].mean()) if bool(sel.any()) else float("nan")
    result["per_class"] = (100.0 * per_class).tolist()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sage-fast demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="sage_runs/demo", help="folder for the generated data set (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="higher than the paper's 0.01: random weights, few epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import open_clip
    from tqdm.auto import tqdm

    from .model import build_sage, register_tiny_clip_config

    start = time.time()
    torch.manual_seed(args.seed)
    data = make_demo_dataset(os.path.join(args.out, "data"), seed=args.seed)
    name = register_tiny_clip_config()
    model = build_sage(data["class_names"], data["class_counts"], model_name=name, pretrained=None,
                       alpha=0.1, lambdas=(0.015, 0.015, 0.4), device="cpu", progress=False)
    print(f"Sage on {name} (random weights): {model.num_layers} blocks, width {model.dim}, r = {model.bottleneck}, "
          f"{model.num_trainable_parameters():,} trainable parameters; {sum(data['class_counts'])} training images, "
          f"{len(data['class_names'])} classes")
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    x_train, y_train = _load_split(data["root"], data["train"], mean, std)
    x_test, y_test = _load_split(data["root"], data["test"], mean, std)

    params = model.trainable_parameters()
    optim = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = (len(y_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        for step in bar:
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            images = x_train[idx]
            images = torch.where(torch.rand(len(idx), 1, 1, 1, generator=gen) < 0.5, images, images.flip(-1))
            loss, _ = model.loss(model(images), y_train[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
    model.eval()
    preds = torch.cat([model.predict(x_test[i:i + 256]).argmax(-1) for i in range(0, len(y_test), 256)])
    acc = group_accuracy(preds, y_test, data["class_counts"])
    print(f"test accuracy: overall {acc['overall']:.1f}%  many {acc['many']:.1f}%  medium {acc['medium']:.1f}%  "
          f"few {acc['few']:.1f}%   ({time.time() - start:.0f} s)")
    return 0
