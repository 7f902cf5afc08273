"""The formats a run writes and reads back: checkpoints, RNG states, the safetensors export.

Checkpoint (``last.pt``, format `CHECKPOINT_VERSION`), a dict loadable with ``torch.load(weights_only=True)``:

    version        int, CHECKPOINT_VERSION (version 1, without ``digest``, is still read)
    trainable      {name: tensor} the trainable parameters (CPU copies)
    optimizer      optimizer.state_dict()
    scheduler      scheduler.state_dict()
    epoch, step_in_epoch, global_step, skipped_total   ints (the sampler position and counters, `PROGRESS`)
    rng            `rng_state()` (python, numpy, torch and, when initialised, cuda)
    config         SageConfig.to_dict()
    class_names    [str] * C
    class_counts   [int] * C
    zs_classifier  (C, d) float32, the template classifier W_zs (frozen; FIT's zt and zero-shot CLIP use it),
                   so that evaluation need not run the text encoder; absent in checkpoints written before it
    digest         "sha256:<hex>" over every other entry (`content_digest`): tensor bytes, dtypes, shapes
                   and the non-tensor structure; recomputed on every read

A run folder keeps two checkpoints: ``last.pt`` and ``previous.pt``, the one before it (`write_checkpoint`
rotates them), so one bad save cannot lose a run. Nothing non-finite is ever written (`nonfinite_entries`).
Reading verifies the digest; `find_resumable` falls back from a corrupt ``last.pt`` to ``previous.pt``.

Export (``adapters.safetensors``): the trainable parameters as float32 CPU tensors, and W_zs as the tensor
``zs_classifier`` (`ZERO_SHOT`; absent in exports written before it); metadata ``config``,
``class_names`` and ``class_counts`` (JSON text), ``format`` (`ADAPTERS_FORMAT`), ``epoch`` and
``global_step`` and ``digest`` (over the tensors, checked by `read_weights`).

Every write goes through `sage_fast.utils.files.atomic_path`: readers never see a half-written file, and a
crash or Ctrl-C keeps the previous file (the run folder's layout and its clean-up: `run_folder`).

Resume (`restore_checkpoint`): the data's class names and images per class must be the checkpoint's; settings
that change the result must be the checkpoint's unless forced, and then apply exactly from its step on
(`_apply_optim_settings` gives the optimizer the new lr, momentum and weight decay), except `NOT_FORCEABLE`
ones, which describe what the run already did. A run that has finished (`final_report`) is not resumed at
all: `finished_run` says so before anything is built.

Errors a user can act on derive from `RunFolderError` (the command line prints them as one line, exit
status 2): a resume whose settings differ from the checkpoint's (`ConfigMismatchError`), a checkpoint of
other classes, a checkpoint that is corrupt or unreadable (`CheckpointError`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.files import atomic_path
from .config import config_differences, format_differences
from .errors import load_failure_reason
from .run_folder import EXPORT, LAST, METRICS, PREVIOUS, RunFolderError, read_report

CHECKPOINT_VERSION = 2
#: versions `read_checkpoint` accepts; 1 has no digest and so cannot be verified
READABLE_VERSIONS = (1, 2)
ADAPTERS_FORMAT = "sage-fast adapters v1"
#: the counters a checkpoint stores besides the states: where training stands
PROGRESS = ("epoch", "step_in_epoch", "global_step", "skipped_total")
#: the entry of a checkpoint, and the tensor of the export, that holds the template classifier W_zs
ZERO_SHOT = "zs_classifier"
#: what trained weights store besides the tensors (`stored_run_info`)
RUN_INFO = ("config", "class_names", "class_counts")

class CheckpointError(RunFolderError):
    """A checkpoint that cannot be used: unreadable, corrupt (digest mismatch), another format, non-finite."""


class ConfigMismatchError(RunFolderError):
    """Resuming with settings that change the result (`config_differences`), without forcing it."""


def _replace_with_link(src: Path, dst: Path) -> None:
    """Make `dst` a copy of `src` atomically: a hard link where the file system has them, else a byte copy."""
    # already linked (a kill came between this and the next rename): rename(2) of one hard link over
    # another of the same file does nothing and would leave the temporary link behind
    with contextlib.suppress(OSError):
        if os.path.samefile(src, dst):
            return
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


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
    """The checkpoint dict without its digest (see the module docstring); `progress` holds the `PROGRESS` counters."""
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
        ZERO_SHOT: model.zs_classifier.detach().float().cpu().clone(),
    }


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        h.update(b"D%d;" % len(obj))
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        # one tag for both: torch.load gives python's tuples back as lists
        h.update(b"L%d;" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        # str, int, float, bool, None (and dtypes, devices): repr is exact and stable for these
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_digest(obj) -> str:
    """"sha256:<hex>" over the bytes, dtypes and shapes of every tensor in `obj` and over its structure and
    other values, in order; unchanged by a torch.save / torch.load round trip."""
    h = hashlib.sha256()
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def nonfinite_entries(state: Mapping) -> List[str]:
    """Names of the floating-point tensors of a checkpoint's weights and optimizer state that hold NaN or Inf."""
    bad = []

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
                bad.append(prefix)
        elif isinstance(obj, Mapping):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}[{i}]", v)

    walk("", {"trainable": state.get("trainable", {}), "optimizer": state.get("optimizer", {})})
    return bad


def write_checkpoint(state: Mapping, path, keep_previous: bool = True) -> Path:
    """Write `state` with its digest to `path` atomically (fsynced). With `keep_previous` and `path` named
    ``last.pt``, the file it replaces becomes ``previous.pt`` first.

    Refuses (ValueError) a state whose weights or optimizer state hold NaN or Inf: such a file could only
    poison the run that resumes from it. At every moment of the write, a kill leaves a whole ``last.pt``
    (the old or the new one) and a whole ``previous.pt``.
    """
    path = Path(path)
    bad = nonfinite_entries(state)
    if bad:
        raise ValueError(f"not writing {path}: {', '.join(bad[:3])} hold NaN or Inf")
    state = dict(state)
    state.pop("digest", None)
    state["digest"] = content_digest(state)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
        if keep_previous and path.name == LAST and path.is_file():
            # the old last.pt stays whole under its own name until the new one replaces it
            _replace_with_link(path, path.with_name(PREVIOUS))
    return path


def _load(path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or corrupt zip / pickle: which error depends on where the damage is
        raise CheckpointError(f"{path}: unreadable {what}: {load_failure_reason(e)}") from None


def read_checkpoint(path) -> dict:
    """Load a checkpoint on the CPU (weights_only), check its version, digest and finiteness.

    Raises FileNotFoundError, or CheckpointError (one line) for a file that cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return _verified(_load(path, "checkpoint"), path)


def _verified(ckpt, path) -> dict:
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {version} is not one of {READABLE_VERSIONS}")
    if version >= 2:
        stored = ckpt.pop("digest", None)
        if stored is None or content_digest(ckpt) != stored:
            raise CheckpointError(f"{path}: content does not match its checksum (the file is corrupt)")
    else:
        warnings.warn(f"{path}: a version-1 checkpoint has no checksum; it cannot be verified")
    bad = nonfinite_entries(ckpt)
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad[:3])} hold NaN or Inf")
    return ckpt


def resume_candidates(path) -> List[Path]:
    """`path`, then for a ``last.pt`` the ``previous.pt`` beside it: newest first."""
    path = Path(path)
    out = [path]
    if path.name == LAST:
        out.append(path.with_name(PREVIOUS))
    return out


def find_resumable(path) -> Tuple[dict, Path, List[str]]:
    """The newest checkpoint among `resume_candidates(path)` that verifies: (checkpoint, its path, one line
    per candidate skipped and why). CheckpointError when none does, FileNotFoundError when none exists."""
    skipped: List[str] = []
    existing = [p for p in resume_candidates(path) if p.is_file()]
    if not existing:
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    for p in existing:
        try:
            return read_checkpoint(p), p, skipped
        except CheckpointError as e:
            skipped.append(str(e))
    raise CheckpointError("no checkpoint to resume from verifies: " + "; ".join(skipped))


#: keys a resume cannot take from the config even with --force-resume: they describe the part of the run
#: that already happened (key -> why). Every other key that changes the result is applied exactly from the
#: checkpoint's step on when forced: the continuation is what a run with the new value computes from the
#: checkpoint's state (`_apply_optim_settings` for the optimizer's; the model's and data's are read from the
#: config when the model and data are built).
NOT_FORCEABLE = {
    "optim.epochs": "the cosine schedule spans all epochs, and the steps taken so far followed the checkpoint's",
    "optim.schedule": "the steps taken so far followed the checkpoint's schedule",
    "optim.batch_size": "the steps per epoch, the schedule's length and the checkpoint's place in the epoch "
                        "depend on it",
    "train.seed": "it orders the samples of the epoch under way (and with model.pretrained=null makes the frozen "
                  "network)",
    "model.name": "the frozen network the adapters were trained in",
    "model.bottleneck": "the trained parameters' shapes",
    "model.adapter": "the trained parameters",
    "model.fit": "the trained parameters (FIT's s1, s2)",
    "model.text_proj": "the trained parameters (W_proj)",
    "model.classifier_init": "it only chose the classifier the run started from, which the checkpoint replaces",
}


def check_resume_config(ckpt: Mapping, used, config: dict, force: bool) -> list:
    """The differences (`config_differences`) between a checkpoint's config and `config`; raises
    `ConfigMismatchError` when there are any and not `force`, or when one of them is `NOT_FORCEABLE`."""
    diffs = config_differences(ckpt["config"], config)
    fixed = [d for d in diffs if d[0] in NOT_FORCEABLE]
    if fixed:
        why = "; ".join(f"{k}: {NOT_FORCEABLE[k]}" for k, _, _ in fixed)
        raise ConfigMismatchError(f"cannot resume from {used}: these settings differ from the checkpoint's: "
                                  f"{format_differences(diffs)}; of them, these cannot differ even with "
                                  f"--force-resume: {why}; use the checkpoint's values, or start a new run (another "
                                  "train.output_dir, or --overwrite)")
    if diffs and not force:
        raise ConfigMismatchError(f"cannot resume from {used}: these settings differ from the checkpoint's and "
                                  f"change the result: {format_differences(diffs)}; use the checkpoint's values, "
                                  "or force it (--force-resume)")
    return diffs


def class_difference(stored_names: Sequence[str], stored_counts: Sequence[int], names: Sequence[str],
                     counts: Sequence[int], there: str = "in the checkpoint",
                     here: str = "in the data") -> Optional[str]:
    """The first difference between two class lists (names, training images per class), in words; None when
    they agree."""
    if len(stored_names) != len(names) or len(stored_counts) != len(counts):
        return f"{len(stored_names)} classes {there}, {len(names)} {here}"
    for k, (a, m, b, n) in enumerate(zip(stored_names, stored_counts, names, counts)):
        if a != b or int(m) != int(n):
            return f"class {k} is {a!r} with {int(m)} training images {there}, {b!r} with {int(n)} {here}"
    return None


def _apply_optim_settings(optimizer, scheduler, optim: Mapping) -> None:
    """Give a restored optimizer and LambdaLR schedule the config's lr, momentum and weight decay (their
    state dicts bring the checkpoint's back): from the next step on, the lr is the new base lr times the
    schedule's factor at the checkpoint's step, as a run started with it would compute. No-op for the
    checkpoint's own values (bit for bit)."""
    for g in optimizer.param_groups:
        for key in ("momentum", "weight_decay"):
            if key in optim and key in g and g[key] != optim[key]:
                g[key] = optim[key]
    lr = float(optim["lr"])
    if all(b == lr for b in scheduler.base_lrs):
        return
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for g, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        g["initial_lr"] = lr
        g["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports


def restore_checkpoint(path, model, optimizer, scheduler, config: dict, class_names: Sequence[str],
                       class_counts: Sequence[int], device, force: bool = False) -> Dict[str, Any]:
    """Load the newest verifying checkpoint of `find_resumable(path)` into the model, optimizer, scheduler
    and the global RNGs. Returns the `PROGRESS` counters plus ``path`` (the file used) and ``skipped``
    (why newer candidates were not used).

    Refuses (RunFolderError) a checkpoint of other classes (names or counts, the first difference named),
    and (ConfigMismatchError, `check_resume_config`) one whose config differs from `config` in a key that
    changes the result, unless `force` (then it warns, and the optimizer takes the new lr, momentum and
    weight decay).
    """
    ckpt, used, skipped = find_resumable(path)
    differ = class_difference(ckpt["class_names"], ckpt["class_counts"], list(class_names), list(class_counts))
    if differ is not None or len(ckpt["class_counts"]) != model.num_classes:
        raise RunFolderError(f"{used}: the checkpoint was trained on other classes than this data set "
                             f"({differ or 'another number of classes'}); resume with the data it was trained on")
    diffs = check_resume_config(ckpt, used, config, force)
    if diffs:
        warnings.warn(f"resuming from {used} with other settings than the checkpoint's: {format_differences(diffs)}; "
                      "they apply from its step on, so the result will not match an uninterrupted run")
    model.load_trainable_state_dict({k: v.to(device) for k, v in ckpt["trainable"].items()})
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    _apply_optim_settings(optimizer, scheduler, config["optim"])
    set_rng_state(ckpt["rng"])
    return {**{k: int(ckpt[k]) for k in PROGRESS}, "path": used, "skipped": skipped}


def final_report(folder, progress: Mapping[str, int], epochs: int) -> Optional[dict]:
    """The ``metrics.json`` of `folder` when the run whose checkpoint is at `progress` has nothing left to do:
    all `epochs` trained, and both the report and the export written at that step. Else None."""
    folder = Path(folder)
    if int(progress["epoch"]) < epochs or int(progress["step_in_epoch"]) != 0:
        return None
    export = folder / EXPORT
    report = read_report(folder)
    if report is None or not export.is_file():
        return None
    try:
        exported = _export_metadata(export).get("global_step")
    except (OSError, ValueError, CheckpointError):
        return None
    step = int(progress["global_step"])
    if report.get("step") != step or _int_or_none(exported) != step:
        return None
    return report


def finished_run(folder, resume, config: dict, force: bool = False) -> Optional[dict]:
    """Before anything is built for ``--resume``: the final report of `folder` (`final_report`) when the run
    has nothing left to do, else None. Reads the checkpoint only when the folder has a report and an export;
    its settings are checked first (`check_resume_config`), so other settings are refused as on any resume."""
    folder = Path(folder)
    if not ((folder / METRICS).is_file() and (folder / EXPORT).is_file()):
        return None
    ckpt, used, _ = find_resumable(resume)
    check_resume_config(ckpt, used, config, force)
    return final_report(folder, ckpt, int(config["optim"]["epochs"]))


# --------------------------------------------------------------------------------------------------
# The safetensors export, and reading trained weights back


def _tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    return content_digest({k: tensors[k] for k in sorted(tensors)})


def save_adapters(path, model, config: dict, class_names: Sequence[str], class_counts: Sequence[int],
                  progress: Optional[Mapping[str, int]] = None) -> None:
    """The trainable parameters (float32, CPU) as safetensors, with config, classes, progress and a digest
    of the tensors in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    tensors[ZERO_SHOT] = model.zs_classifier.detach().float().cpu().contiguous()
    meta = {"config": json.dumps(config), "class_names": json.dumps(list(class_names)),
            "class_counts": json.dumps(list(class_counts)), "format": ADAPTERS_FORMAT,
            "digest": _tensors_digest(tensors)}
    for k in ("epoch", "global_step"):
        if progress is not None and k in progress:
            meta[k] = str(int(progress[k]))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_weights(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Trainable parameters from ``adapters.safetensors`` or a checkpoint ``.pt`` (weights_only loading),
    verified against their digest where the file has one, and what the file says besides: ``{"epoch", "step",
    "config", "class_names", "class_counts", "zs_classifier"}``, each None where it does not say (W_zs: files
    written before it was stored, bare state dicts).

    Raises FileNotFoundError, or CheckpointError (one line) for a corrupt or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta = _export_metadata(path)
        try:
            tensors = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable weights: {load_failure_reason(e, 'safetensors')}") from None
        if "digest" in meta and _tensors_digest(tensors) != meta["digest"]:
            raise CheckpointError(f"{path}: content does not match its checksum (the file is corrupt)")
        info = {"epoch": _int_or_none(meta.get("epoch")), "step": _int_or_none(meta.get("global_step")),
                **_metadata_run_info(meta)}
    else:
        ckpt = _load(path, "weights")
        if isinstance(ckpt, dict) and "version" in ckpt and "trainable" in ckpt:
            ckpt = _verified(ckpt, path)
            info = {"epoch": ckpt["epoch"], "step": ckpt["global_step"], **{k: ckpt.get(k) for k in RUN_INFO}}
            tensors = dict(ckpt["trainable"])
            if ZERO_SHOT in ckpt:
                tensors[ZERO_SHOT] = ckpt[ZERO_SHOT]
        else:
            # a bare {name: tensor} file
            tensors = dict(ckpt["trainable"] if isinstance(ckpt, dict) and "trainable" in ckpt else ckpt)
            info = {"epoch": None, "step": None, **{k: None for k in RUN_INFO}}
    info[ZERO_SHOT] = tensors.pop(ZERO_SHOT, None)
    return tensors, info


def _int_or_none(v) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def load_weights(path) -> Dict[str, torch.Tensor]:
    """The tensors of `read_weights`."""
    return read_weights(path)[0]


def _export_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable weights: {load_failure_reason(e, 'safetensors')}") from None


def _metadata_run_info(meta: Mapping[str, str]) -> Dict[str, Any]:
    return {k: (json.loads(meta[k]) if k in meta else None) for k in RUN_INFO}


def stored_run_info(path) -> Dict[str, Any]:
    """What trained weights store besides the tensors: ``config`` (dict), ``class_names``, ``class_counts``;
    each None where the file holds none (a bare state dict). Reads the safetensors metadata, or a
    checkpoint with ``weights_only`` loading."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.suffix == ".safetensors":
        return _metadata_run_info(_export_metadata(path))
    ckpt = _load(path, "weights")
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    return {k: ckpt.get(k) for k in RUN_INFO}


def config_from_weights(path) -> Optional[dict]:
    """The run config stored in a checkpoint or in the safetensors export's metadata, if any."""
    return stored_run_info(path)["config"]
