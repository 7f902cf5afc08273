"""Trained weights at work: the run config they go with, the model they load into, evaluation and prediction.

Used by ``sage-fast eval``, ``predict`` and ``attention`` (`sage_fast.cli`). The weights decide the model:
``adapters.safetensors`` and ``last.pt`` store the run config, the class names and counts and the template
classifier W_zs beside the trained tensors (`sage_fast.training.checkpoint`), and these are what the model is
built from. A config file, preset or ``section.key=value`` override may change how and where the images are
read and run (``data.root``, ``data.test_split``, ``eval.tte``, ``train.device``, ``train.eval_batch_size``,
the data loading keys, ...) and the settings only training reads (``optim``, the loss), but not what decides
the result (`RESULT_KEYS`: the architecture, the frozen CLIP, the adapters, FIT, the classifier's scale):
those are refused (`WeightsConfigError`, listing the keys) unless forced. Bare weights (a state dict without
that metadata) take their config from ``--config`` / ``--preset`` and their class names from its data set;
a config that does not fit them ends in one line naming the tensor, both shapes and the config key.

Only what inference needs is built: the trained classifier and W_zs come from the weights, so the text
encoder does not run (at 8,142 classes it encodes 488,520 prompts) unless W_zs is needed and the weights
predate storing it (FIT's z^ uses it, and so does the zero-shot half of ``sage-fast attention``); evaluation
lists the training split but checks none of its images, and groups the classes by the training counts stored
with the weights.

Images for prediction: files, or folders (their image files, sorted by name, not recursive). Each image gets
the test transform (or the ``eval.tte`` crops), batches of ``train.eval_batch_size`` go through the model on
``train.device`` (``auto``: the GPU when there is one; bf16 there when ``train.amp``), and the probabilities
are the softmax of z^. An unreadable image is reported in the result and skipped.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import ZERO_SHOT, CheckpointError, nonfinite_entries, read_weights, stored_run_info
from .config import ConfigError, build_config, config_differences, flatten, format_differences
from .distributed import autocast, cleanup_distributed, resolve_device, seed_everything
from .errors import UserError
from .run_folder import (
    CONFIG,
    REPORT_FILES,
    RUNTIME,
    RunFolderError,
    hold_run_folder,
    holds_training_run,
    refuse_if_held,
    remove_stale_temporaries,
    write_runtime_record,
)

#: the files of a folder that count as images (case-insensitive)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

#: the settings that change what trained weights compute: the frozen CLIP, the adapters, FIT, the classifier's
#: scale and initial rows (W_zs, for weights that do not store it). The stored config's values are used; a
#: given config or override that differs in one of them is refused unless forced. ``train.seed`` too when
#: ``model.pretrained`` is null: it draws the random frozen CLIP (`result_keys`). ``model.pretrained`` may
#: name another local file where the stored value is one (the checkpoint moved), not another tag.
RESULT_KEYS = ("model.name", "model.pretrained", "model.bottleneck", "model.alpha", "model.fit", "model.adapter",
               "model.text_proj", "model.classifier_init", "model.logit_scale")


class WeightsConfigError(UserError):
    """A config, override or data set that disagrees with what trained weights were trained with."""


# --------------------------------------------------------------------------------------------------
# The trained weights and their config


@dataclass
class TrainedWeights:
    """What a weights file holds (`read_trained`): the trainable tensors and what is stored beside them."""

    path: Path
    #: the trainable parameters, {name: tensor} (`SageModel.trainable_state_dict`)
    tensors: Dict[str, torch.Tensor]
    #: W_zs (C, d); None in files written before it was stored, and in bare state dicts
    zero_shot: Optional[torch.Tensor]
    #: the run config (a dict), class names and training counts; None where the file does not say
    config: Optional[dict]
    class_names: Optional[List[str]]
    class_counts: Optional[List[int]]
    epoch: Optional[int]
    step: Optional[int]


def read_trained(weights) -> TrainedWeights:
    """`weights` (a path, or a `TrainedWeights` already read) read and verified (`checkpoint.read_weights`)."""
    if isinstance(weights, TrainedWeights):
        return weights
    tensors, info = read_weights(weights)
    bad = nonfinite_entries({"trainable": tensors})  # a checkpoint is checked when read; a bare file is not
    if bad:
        raise CheckpointError(f"{weights}: {', '.join(bad[:3])} hold NaN or Inf: these weights cannot predict")
    return TrainedWeights(Path(weights), tensors, info[ZERO_SHOT], info["config"], info["class_names"],
                          info["class_counts"], info["epoch"], info["step"])


def result_keys(stored: Mapping) -> Tuple[str, ...]:
    """`RESULT_KEYS`, plus ``train.seed`` when the stored config's frozen CLIP is random (``model.pretrained``
    null): the keys in which a config for the weights may not differ from `stored` (their own)."""
    random_clip = flatten(stored).get("model.pretrained") is None
    return RESULT_KEYS + (("train.seed",) if random_clip else ())


def resolve_run_config(weights, config=None, overrides: Sequence[str] = (), preset: Optional[str] = None,
                       force: bool = False):
    """The `SageConfig` for `weights` (a path or `TrainedWeights`): the config stored with them and
    `overrides` on top, or, given `config` / `preset`, that one (then `overrides`).

    When the weights store a config, the result must agree with it in `result_keys`: otherwise
    `WeightsConfigError` lists the differences, unless `force` (a warning then). Weights without a stored
    config need `config` or `preset` (ConfigError)."""
    if isinstance(weights, TrainedWeights):
        stored = weights.config
    else:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights not found: {weights}")
        stored = stored_run_info(weights)["config"]
    if stored is None:
        if not (config or preset):
            raise ConfigError(f"{_path(weights)} holds no run config: give the run's --config (or --preset and "
                              "overrides)")
        return build_config(config, list(overrides), preset=preset)
    if config or preset:
        cfg = build_config(config, list(overrides), preset=preset)
    else:
        cfg = build_config(None, list(overrides), base=stored)
    current = cfg.to_dict()
    keys = set(result_keys(stored))
    diffs = [d for d in config_differences(stored, current, free=frozenset(flatten(current)) - keys)
             if not _moved_checkpoint(*d)]
    if diffs:
        listed = format_differences(diffs)
        if not force:
            raise WeightsConfigError(f"{_path(weights)} was trained with other settings, which change the result: "
                                     f"{listed} (the weights' value -> the one given); leave them out (the weights' "
                                     "own config is used), or force them (--force-config)")
        warnings.warn(f"using settings that differ from the ones {_path(weights)} was trained with: {listed}; "
                      "the results are not those of the trained model")
    return cfg


def _moved_checkpoint(key: str, stored, given) -> bool:
    """``model.pretrained`` naming a local file on both sides: the same CLIP weights in another place (another
    machine's path) as far as can be told; a tag (``openai``) or null must stay what it was."""
    from ..model.clip import _looks_like_path

    return key == "model.pretrained" and _looks_like_path(stored) and _looks_like_path(given)


def _path(weights) -> Path:
    return weights.path if isinstance(weights, TrainedWeights) else Path(weights)


def check_class_names(stored: Sequence[str], found: Sequence[str], where: str, force: bool = False) -> None:
    """The classes of a data set (`found`, from `where`) are the ones the weights were trained on (`stored`), in
    the same order; else `WeightsConfigError` naming the first difference (a warning with `force`, except for
    another number of classes, which no evaluation can use)."""
    if list(stored) == list(found):
        return
    if len(stored) != len(found):
        raise WeightsConfigError(f"the weights were trained on {len(stored)} classes, {where} has {len(found)}: "
                                 "evaluate on the data set the weights were trained on")
    k = next(i for i, (a, b) in enumerate(zip(stored, found)) if a != b)
    others = sum(a != b for a, b in zip(stored, found)) - 1
    text = (f"the class names of {where} differ from the ones the weights were trained on: class {k} is "
            f"{stored[k]!r} in the weights, {found[k]!r} in the data set"
            + (f" ({others} more classes differ)" if others else ""))
    if not force:
        raise WeightsConfigError(text + "; the labels would be read as other classes. Use the data set (and "
                                        "data.class_names) the weights were trained with, or force it "
                                        "(--force-config)")
    warnings.warn(text + "; evaluating anyway (the weights' names are reported)")


def _test_data(cfg, image_size: int, raw: bool = False, progress: bool = False):
    """The data set of `cfg` for evaluation: the test images checked, the training split only listed."""
    from .data import build_data

    return build_data(cfg.data, image_size, raw=raw, progress=progress, test_only=True)


def _build(cfg, w: TrainedWeights, names, counts, device, zero_shot: bool, progress: bool):
    """The model of `cfg` with `w`'s trained parameters; the text encoder runs only when W_zs is needed (FIT, or
    `zero_shot`) and `w` does not hold it."""
    from .trainer import build_model

    need = zero_shot or bool(cfg.model.fit)
    zs = w.zero_shot if w.zero_shot is not None else (None if need else False)
    # forked: the caller's random stream is left alone
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, names, counts, device, progress=progress, zero_shot=zs)
    model.load_trainable_state_dict({k: v.to(device) for k, v in w.tensors.items()})
    return model.eval()


def load_trained(weights, cfg, device=None, zero_shot: bool = False):
    """SageModel in eval mode with the trained parameters of `weights` (a path, safetensors export or
    checkpoint, or `TrainedWeights`).

    cfg: the run config (`resolve_run_config`); device: default ``cfg.train.device`` ("auto": the GPU when
    there is one). Class names and counts come from the weights, else from the config's data set (its test
    split). zero_shot: the caller reads W_zs (``model.zs_classifier``) even without FIT, as the attention
    figure's zero-shot CLIP does; otherwise a model without FIT gets NaN rows there when the weights do not
    store W_zs (its predictions never read them).
    """
    from .preflight import check_device, check_image_size

    w = read_trained(weights)
    names, counts = w.class_names, w.class_counts
    if names is None or counts is None:
        data = _test_data(cfg, check_image_size(cfg))
        names, counts = data.class_names, data.class_counts
    if device is None:
        check_device(cfg.train.device)  # a GPU the machine lacks is the user's mistake, not a crash
        device = resolve_device(cfg.train.device, 1, 0, torch.cuda.is_available())
    return _build(cfg, w, names, counts, torch.device(device), zero_shot, cfg.train.progress)


# --------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_weights(cfg, weights, out_dir=None, force: bool = False, overwrite: bool = False) -> dict:
    """Load trained parameters (checkpoint or safetensors export, verified; or `TrainedWeights`) into a fresh
    model, evaluate on the test split (every process of a torchrun job its shard), and write the reports into
    `out_dir` (default ``train.output_dir/eval``), never over a training run's. Builds no optimizer, no
    training loader, no text classifier the weights hold already, and checks no training image.

    The data set's class names must be the weights' (`check_class_names`; `force`: a warning). The classes
    are grouped (many / medium / few) by the training counts stored with the weights, as the training run
    grouped them. The report's ``epoch`` / ``step`` are those of the weights (None where the file does not
    say), and ``weights`` names the file. Nothing is written unless the evaluation finishes: the folder and
    its files appear together (a stop signal waits for them). A folder that holds any of them already (an
    earlier evaluation's reports, or the user's own files of those names) is refused (`RunFolderError`)
    unless `overwrite`.

    weights None: zero-shot CLIP (`sage_fast.model.ZeroShotCLIP`: the frozen encoder and the template
    classifier of `cfg`, nothing trained), on the data set as a training run of `cfg` builds it (the same
    groups); default folder ``train.output_dir/zero-shot``, which also gets the ``config.yaml`` evaluated;
    the report has ``epoch`` = ``step`` = 0 and ``zero_shot`` true."""
    import os

    from ..model import ZeroShotCLIP
    from ..utils.files import atomic_write_text
    from .data import GpuBatchTransform, build_data
    from .distributed import setup_distributed
    from .evaluation import evaluate_model
    from .metrics import write_report
    from .preemption import signals_deferred
    from .preflight import check_device, check_image_size, check_model_source, check_output_dir
    from .trainer import build_model

    out = Path(out_dir) if out_dir else Path(cfg.train.output_dir) / ("eval" if weights else "zero-shot")
    if holds_training_run(out):
        raise RunFolderError(f"{out} holds a training run: evaluation writes its reports elsewhere (--out)")
    refuse_if_held(out)  # another process writes there now; the reports are written under the lock below
    written = REPORT_FILES + (RUNTIME,) + (() if weights else (CONFIG,))
    if not overwrite:
        _refuse_to_overwrite(out, written)
    w = read_trained(weights) if weights else None
    # the checks of a training run's `preflight` that evaluation needs: not the training batch, and the
    # folder written is `out`
    check_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = setup_distributed(cfg.train.device)
    ok = False
    try:
        if dist_info.is_main:
            check_output_dir(out, "--out")
        check_model_source(cfg.model)
        size = check_image_size(cfg)
        progress = cfg.train.progress and dist_info.is_main
        seed_everything(cfg.train.seed)
        raw = bool(cfg.data.gpu_decode)
        if w is None:
            data = build_data(cfg.data, size, raw=raw, progress=progress)
            model = ZeroShotCLIP(build_model(cfg, data.class_names, data.class_counts, dist_info.device,
                                             progress=progress))
        else:
            data = _test_data(cfg, size, raw=raw, progress=progress)
            names, counts = data.class_names, data.class_counts
            if w.class_names is not None:
                check_class_names(w.class_names, data.class_names, _data_source(cfg), force)
                names = w.class_names
            if w.class_counts is not None:
                # the grouping follows the training counts, unless the data set groups by fixed counts of its
                # own (CIFAR-100-LT ratios 50 and 10: ratio 100's)
                own_groups = list(data.group_counts) != list(data.class_counts)
                data.class_names, data.class_counts = list(names), list(w.class_counts)
                if not own_groups:
                    data.group_counts = list(w.class_counts)
                counts = w.class_counts
            model = _build(cfg, w, names, counts, dist_info.device, False, progress)
        gpu_tf = (GpuBatchTransform(size, False, dist_info.device, unreadable=data.test.unreadable)
                  if cfg.data.gpu_decode else None)
        report = evaluate_model(model, data, cfg, dist_info, size, progress, gpu_tf)
        if w is None:
            report["epoch"], report["step"], report["zero_shot"] = 0, 0, True
        else:
            report["epoch"], report["step"] = w.epoch, w.step
            report["weights"] = str(w.path)
        if dist_info.is_main:
            if report["skipped"]:
                warnings.warn(f"evaluation: {report['skipped']} unreadable test images skipped")
            # the lock for the writes only (a second writer into `out` is refused above, or waits here for the
            # second it takes, and never mixes its files with these); a run that claimed `out` meanwhile is refused
            with hold_run_folder(out, what="--out", wait=30.0):
                if holds_training_run(out):
                    raise RunFolderError(f"{out} holds a training run: evaluation writes its reports elsewhere "
                                         "(--out)")
                if not overwrite:  # written meanwhile by another evaluation
                    _refuse_to_overwrite(out, written)
                with signals_deferred():  # the files appear together, or none of them
                    remove_stale_temporaries(out)
                    if w is None:  # what was evaluated, before the metrics (`reuse.finished_report` reads both)
                        atomic_write_text(out / CONFIG, cfg.to_yaml())
                    write_report(out, report, data)
                    write_runtime_record(out, model)
        ok = True
        return report
    finally:
        cleanup_distributed(dist_info, ok)


def _refuse_to_overwrite(out: Path, names: Sequence[str]) -> None:
    there = [n for n in names if (out / n).exists()]
    if there:
        raise RunFolderError(f"{out} holds {', '.join(there)} already (an earlier evaluation's, or files of "
                             "your own): --overwrite replaces them, or write elsewhere (--out)")


def _data_source(cfg) -> str:
    if cfg.data.prepared:
        return f"data.prepared={cfg.data.prepared}"
    if cfg.data.class_names:
        return f"data.class_names={cfg.data.class_names}"
    return f"the data set in data.root={cfg.data.root}"


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
