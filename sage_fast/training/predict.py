"""`sage-fast predict`: the top-k classes of images under trained Sage weights.

    sage-fast predict --weights runs/sage/adapters.safetensors photo.jpg more_photos/
    sage-fast predict --weights runs/sage/last.pt --topk 3 --json photos/ > predictions.json

Which model: the run config stored with the weights (``adapters.safetensors`` metadata or ``last.pt``),
unless ``--config`` / ``--preset`` give one; ``section.key=value`` overrides apply on top (for instance
``train.device=cpu``, ``train.eval_batch_size=64``, ``eval.tte=tencrop``). The class names are the
ones stored with the weights; weights without them (a bare state dict) take them from the config's
data set. The frozen CLIP is loaded as the config says (``model.pretrained``), so it must be the one the
weights were trained on.

Images: files, or folders (their image files, sorted by name, not recursive). Each image gets the test
transform (or the ``eval.tte`` crops), batches of ``train.eval_batch_size`` go through the model on
``train.device`` (``auto``: the GPU when there is one; bf16 there when ``train.amp``), and the
probabilities are the softmax of z^. An unreadable image is reported in the output and skipped; only
when no image can be read is it an error.

Output: a table (one row per image), or with ``--json`` a JSON list of
``{"image": path, "predictions": [{"class": name, "index": k, "probability": p}, ...]}``, or
``{"image": path, "error": message}`` for an unreadable one. Progress and warnings go to stderr, so
stdout holds only the result.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import CommandParser, report_user_error

#: the files of a folder that count as images (case-insensitive)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


# --------------------------------------------------------------------------------------------------
# The trained model


def stored_classes(weights) -> Tuple[Optional[List[str]], Optional[List[int]]]:
    """(class names, class counts) stored with trained weights, or (None, None) when they hold none."""
    path = Path(weights)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        names, counts = meta.get("class_names"), meta.get("class_counts")
        return (json.loads(names) if names else None), (json.loads(counts) if counts else None)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict):
        return ckpt.get("class_names"), ckpt.get("class_counts")
    return None, None


def resolve_run_config(weights, config=None, overrides: Sequence[str] = (), preset: Optional[str] = None):
    """The `SageConfig` for `weights`: the stored one unless `config` / `preset` is given, then `overrides`."""
    from .checkpoint import config_from_weights
    from .config import ConfigError, build_config

    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights not found: {weights}")
    base = None if (config or preset) else config_from_weights(weights)
    if base is None and not (config or preset):
        raise ConfigError(f"{weights} holds no run config: give the run's --config (or --preset and overrides)")
    return build_config(config, list(overrides), preset=preset, base=base)


def load_trained(weights, cfg, device=None):
    """SageModel in eval mode with the trained parameters of `weights` (safetensors export or checkpoint).

    cfg: the run config (`resolve_run_config`); device: default ``cfg.train.device`` ("auto": the GPU when
    there is one). Class names and counts come from the weights, else from the config's data set.
    """
    from ..model import build_sage
    from ..model.clip import image_size
    from .checkpoint import load_weights
    from .distributed import resolve_device

    names, counts = stored_classes(weights)
    if names is None or counts is None:
        from .data import build_data

        data = build_data(cfg.data, cfg.data.image_size or image_size(cfg.model.name))
        names, counts = data.class_names, data.class_counts
    device = torch.device(device or resolve_device(cfg.train.device, 1, 0, torch.cuda.is_available()))
    # seeded like the Trainer: with model.pretrained=null the frozen CLIP is random and only train.seed makes
    # it the network the weights were trained on; forked so the caller's random stream is left alone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_sage(names, counts, cfg.model, device=device, progress=cfg.train.progress)
    state = load_weights(weights)
    model.load_trainable_state_dict({k: v.to(device) for k, v in state.items()})
    return model.eval()


def autocast(cfg, device: torch.device):
    """bf16 autocast on CUDA when ``train.amp``, as in the trainer's evaluation; fp32 elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=bool(cfg.train.amp and device.type == "cuda"))


# --------------------------------------------------------------------------------------------------
# Images


def collect_images(inputs: Sequence) -> List[Path]:
    """Files as given; folders replaced by their image files (`IMAGE_SUFFIXES`), sorted by name.

    A path that does not exist stays in the list (it is reported as unreadable); a folder without image
    files adds nothing (a warning says so).
    """
    import warnings

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
        from PIL import Image

        from .data.unreadable import READ_ERRORS

        try:
            with Image.open(self.paths[i]) as im:
                return i, self.transform(im.convert("RGB"))  # convert(): the full decode, so truncation raises here
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
    """Top-k predictions of each image, in the order of `paths` (see the module docstring for the dicts)."""
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
        with autocast(cfg, device):
            logits = tte_logits(model, images.to(device))
        probs, classes = logits.float().softmax(dim=-1).topk(topk, dim=-1)
        for i, p_row, c_row in zip(indices, probs.tolist(), classes.tolist()):
            results[i] = {"image": str(paths[i]), "predictions": [
                {"class": model.class_names[c], "index": c, "probability": p} for p, c in zip(p_row, c_row)]}
    return results


def format_table(results: Sequence[dict], topk: int) -> str:
    """One aligned row per image: the image, then class and probability for each rank."""
    head = ["image"] + [h for r in range(1, topk + 1) for h in (f"top-{r}", "p")]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["image"], f"unreadable: {r['error']}"])
        else:
            rows.append([r["image"]] + [v for p in r["predictions"] for v in (p["class"], f"{p['probability']:.4f}")])
    # the error message may be long: it is left out of the column widths
    widths = [max([len(head[c])] + [len(row[c]) for row in rows if len(row) == len(head) and c < len(row)])
              for c in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The command


def overrides_help() -> str:
    from .cli import _OVERRIDE_HELP

    return _OVERRIDE_HELP.split(" Print the full config")[0]  # --print-config is train's


def fail(prog: str, message) -> int:
    """A user error: ``sage-fast: error: PROG: ...`` on one line of stderr, exit status 2."""
    if isinstance(message, KeyError) and message.args:
        message = message.args[0]
    return report_user_error(f"{prog}: {message}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument("--weights", required=True, help="adapters.safetensors or a checkpoint (last.pt)")
    p.add_argument("--config", help="YAML run config; default: the config stored with the weights")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a row of Table 8 instead of the stored config")


_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def split_overrides(tokens: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Command-line leftovers -> (paths, ``key=value`` overrides).

    ``section.key=value`` and ``--section.key value`` are overrides, unless a file of that name exists;
    everything else is a path.
    """
    paths, overrides, i = [], [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--") and "=" not in tok and i + 1 < len(tokens):
            overrides.append(f"{tok[2:]}={tokens[i + 1]}")
            i += 2
            continue
        if _OVERRIDE.match(tok.lstrip("-")) and not Path(tok).exists():
            overrides.append(tok.lstrip("-"))
        else:
            paths.append(tok)
        i += 1
    return paths, overrides


def main(argv=None) -> int:
    from .config import ConfigError

    p = CommandParser(prog="sage-fast predict", allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=overrides_help(),
                                usage="%(prog)s --weights W [--config C] [--topk K] [--json] [overrides] "
                                      "IMAGE_OR_FOLDER [...]")
    add_model_arguments(p)
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes per image (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args, rest = p.parse_known_args(argv)
    inputs, overrides = split_overrides(rest)
    unknown = [a for a in inputs if a.startswith("-") and not Path(a).exists()]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.topk < 1:
        p.error(f"--topk must be at least 1, got {args.topk}")
    if not inputs:
        p.error("give at least one image or folder")
    paths = collect_images(inputs)
    if not paths:
        return fail(p.prog, "no image files found in " + ", ".join(map(str, inputs)))
    try:
        cfg = resolve_run_config(args.weights, args.config, overrides, args.preset)
        model = load_trained(args.weights, cfg)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        return fail(p.prog, e)
    results = predict_images(model, cfg, paths, args.topk)
    bad = [r for r in results if "error" in r]
    if len(bad) == len(results):
        return fail(p.prog, f"none of the {len(results)} images could be read (first: {bad[0]['image']}: "
                            f"{bad[0]['error']})")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results, min(args.topk, model.num_classes)))
    if bad:
        print(f"{p.prog}: {len(bad)} of {len(results)} images could not be read", file=sys.stderr)
    return 0
