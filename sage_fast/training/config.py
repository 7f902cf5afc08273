"""Run configuration: nested dataclasses, the Table 8 presets, YAML loading, CLI overrides, validation.

A configuration is resolved in this order, each layer overriding the previous one:

1. the dataclass defaults below (the paper's recipe: SGD 0.01, momentum 0.9, wd 5e-4, batch 128, 10 epochs);
2. a preset, one per row of Table 8 (``preset: imagenet_lt``), see `PRESETS`;
3. a YAML file (``sage-fast train --config run.yaml``);
4. command-line overrides, ``section.key=value`` (``optim.lr=0.02 data.num_workers=16``), values parsed as YAML.

Every layer is validated before anything runs: an unknown key or a value of the wrong type raises
`ConfigError` naming the key (with a close match when there is one).

Comparing configs (`config_differences`): a resume refuses a checkpoint whose config differs in a key
outside `RESUME_FREE_KEYS`, and sweeps and ablations reuse a finished run only when its config differs in
nothing outside `REUSE_FREE_KEYS`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
import json
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import yaml

from ..model.config import ModelConfig, check_model_config
from ..ops.checks import check_interval, check_non_negative, check_positive
from .data.text_files import read_text


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type, or an inconsistent value."""

    #: the CLI prints it as one line, exit status 2 (`sage_fast.training.errors`)
    user_error = True


def _dataset_names() -> Tuple[str, ...]:
    # imported when a value is checked, not with this module, which stays free of the data stack (PIL, loaders)
    from .data.registry import dataset_names

    return dataset_names()


@dataclass
class DataConfig:
    #: a data set registered in `sage_fast.training.data.registry` (the one list of names)
    dataset: str = field(default="folder", metadata={"choices": _dataset_names})
    #: image root; for cifar100_lt the directory holding (or being) ``cifar-100-python/``
    root: str = ""
    #: split files (``relative/path label`` lines in UTF-8, or iNaturalist's official JSON); relative paths are
    #: resolved against ``root``; empty: the data set's standard file name in ``root``
    train_split: str = ""
    test_split: str = ""
    #: optional file with one class name per line (UTF-8), in label order (overrides the data set's metadata)
    class_names: str = ""
    #: accept the same image listed twice in a split file, the same image in both splits, and two classes of
    #: one name in ``class_names``. Off: each is refused before training, naming the file and both lines (a
    #: repeated line counts its image twice; a test image in the training split inflates the test accuracy)
    allow_duplicates: bool = False
    #: CIFAR-100-LT imbalance ratio (100, 50 or 10 in the paper) and the seed of its subsampling
    imbalance_ratio: float = 100.0
    subsample_seed: int = 0
    #: training augmentation: "crop_flip" (the paper / LIFT: RandomResizedCrop + flip) or "flip" (the test
    #: transform + flip; for tiny synthetic images such as the demo's)
    train_augment: Literal["crop_flip", "flip"] = "crop_flip"
    #: RandomResizedCrop's area range for training (LIFT / torchvision default [0.08, 1.0])
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    #: input resolution; null: the CLIP model's own (224 for ViT-B/16)
    image_size: Optional[int] = None
    num_workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 4
    #: decode JPEGs with nvJPEG on the GPU (torchvision.io.decode_jpeg) and crop/resize there;
    #: the workers then only read file bytes. Off by default; CPU decoding uses PIL.
    gpu_decode: bool = False
    #: before training, open every image of both splits and parse its header (no decode), in 32 threads with
    #: a progress bar; unreadable images (missing, empty, not an image) are left out, and the class counts
    #: the loss uses count only the images that can be read. On by default because it is cheap next to one
    #: epoch (which decodes every image): ~20,000 files/s on 2 CPU cores with the files in the page cache,
    #: about 20 s for iNaturalist 2018's 437k; from a cold disk or a network file system its latency sets
    #: the pace (minutes), and false skips it. With false, only 256 evenly spread files per split are
    #: opened, which still stops a wrong data.root before training; other unreadable files then surface
    #: during training, where they count towards max_unreadable.
    check_images: bool = True
    #: the fraction of a split's images that may be unreadable (0.01: 1%). Above it the run stops, naming
    #: examples: before training for what check_images finds, and during training for images that fail to
    #: decode later (a truncated JPEG passes the header check); 0: any unreadable image stops the run. A
    #: split none of whose images can be read always stops the run.
    max_unreadable: float = 0.01
    #: a folder written by ``sage-fast prepare`` (tar shards + manifest.json): training and evaluation read
    #: the prepared images from it, and class names and counts from its manifest; dataset, root and the
    #: split files are then not read. Empty: read the data set itself.
    prepared: str = ""
    #: decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when the crop, or the test resize, still
    #: gets at least its output size from the reduced image: 2-4x less decoding for large originals, a
    #: resize of the same region within a few grey levels of the full decode. Off by default so that runs,
    #: and checkpoints made before this key existed, stay bitwise reproducible; switch it on for large raw
    #: JPEGs (iNaturalist without sage-fast prepare). Ignored with gpu_decode and by eval.tte's crops.
    fast_decode: bool = False


@dataclass
class OptimConfig:
    epochs: int = 10
    #: global batch size, split evenly over the processes of a distributed run
    batch_size: int = 128
    #: gradient accumulation: each process splits its share of the batch into this many micro-batches, one
    #: forward and backward each, and the optimizer steps once per batch; the micro-batches' losses are
    #: weighted by their share of the batch's images, so the update is the full batch's (up to float
    #: rounding): the paper's batch 128 on a smaller GPU is ``optim.batch_size=128 optim.accumulate_steps=4``
    #: (4 x 32). Activation memory follows the micro-batch; the schedule, logs and checkpoints count batches.
    #: batch_size must be divisible by accumulate_steps x processes.
    accumulate_steps: int = 1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    #: cosine schedule over all steps of all epochs, no warm-up (the paper); "constant" for debugging
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class TrainConfig:
    output_dir: str = "runs/sage"
    seed: int = 0
    #: "auto": cuda:LOCAL_RANK when CUDA is available, else cpu
    device: str = "auto"
    #: bf16 autocast on CUDA (always fp32 on CPU)
    amp: bool = True
    #: write a checkpoint every N optimizer steps (0: only at epoch ends)
    ckpt_every_steps: int = 500
    log_every_steps: int = 20
    #: evaluate on the test split every N epochs (0: only after the last epoch)
    eval_every_epochs: int = 0
    eval_batch_size: int = 256
    progress: bool = True
    tensorboard: bool = True
    find_unused_parameters: bool = False


@dataclass
class EvalConfig:
    #: test-time ensembling (LIFT's): resize to image_size + 24, then "fivecrop" (corners and centre) or
    #: "tencrop" (and their horizontal flips); the crops' logits z^ are averaged (sage_fast.training.tte)
    tte: Literal["none", "fivecrop", "tencrop"] = "none"


@dataclass
class SageConfig:
    #: a row of Table 8 (see config.PRESETS); its values sit under the YAML file and the overrides
    preset: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _table8(dataset, alpha, gamma, l1, l2, l3, epochs=10, **data):
    return {
        "data": {"dataset": dataset, **data},
        "model": {"alpha": alpha, "mu": 0.5, "gamma": gamma, "lambdas": [l1, l2, l3]},
        "optim": {"epochs": epochs, "batch_size": 128, "lr": 0.01},
    }


#: Table 8 of the paper (docs/method.md, "Hyperparameters"), one preset per row, with the paper's recipe.
PRESETS: Dict[str, Dict[str, Any]] = {
    "cifar100_lt_r100": _table8("cifar100_lt", 0.1, 0.050, 0.015, 0.015, 0.4, imbalance_ratio=100.0),
    "cifar100_lt_r50": _table8("cifar100_lt", 0.1, 0.060, 0.0001, 0.01, 0.6, imbalance_ratio=50.0),
    "cifar100_lt_r10": _table8("cifar100_lt", 0.1, 0.060, 0.002, 0.005, 0.2, imbalance_ratio=10.0),
    "places_lt": _table8("places_lt", 0.8, 0.050, 0.003, 0.01, 0.2),
    "imagenet_lt": _table8("imagenet_lt", 0.8, 0.050, 0.005, 0.01, 0.2),
    "inat2018": _table8("inat2018", 1.0, 0.085, 1e-7, 1e-7, 1e-7, epochs=20),
}


# --------------------------------------------------------------------------------------------------
# Typed merge


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, tp) -> Any:
    """Return `value` checked against the annotation `tp` (int is accepted for float, nothing else is)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(typing.get_args(tp)[0]):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        (arm,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-2 and 5e-4 (no dot in the mantissa) as strings: they are meant as numbers
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        # a number where a string is expected (``train.output_dir=2024`` parses as int) is meant as text
        if isinstance(value, (Path, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - only the types above are used in the dataclasses
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _merge(obj, updates: Mapping[str, Any], prefix: str = "") -> None:
    if not isinstance(updates, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    names = list(fields)
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}; valid keys here: {', '.join(prefix + n for n in names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{full}.")
            continue
        choices = fields[key].metadata.get("choices")
        if choices is not None:
            # a str field whose values live elsewhere (a registry): checked like a Literal, same message
            allowed = tuple(choices())
            if value not in allowed:
                raise ConfigError(f"{full}: expected one of {' | '.join(repr(a) for a in allowed)}, got {value!r}")
        setattr(obj, key, _coerce(full, value, hints[key]))


def _checked(check, *args) -> None:
    """Run one of the ops' range checks (`sage_fast.ops.checks`: one definition of each range for the API and
    the config); its ValueError / TypeError becomes a ConfigError (one line, exit status 2)."""
    try:
        check(*args)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _check_values(cfg: SageConfig) -> None:
    def positive(key, v):  # finite and > 0
        _checked(check_positive, key, v)

    def non_negative(key, v):  # finite and >= 0
        _checked(check_non_negative, key, v)

    o, d, m, t = cfg.optim, cfg.data, cfg.model, cfg.train
    for k in ("epochs", "batch_size", "lr"):
        positive(f"optim.{k}", getattr(o, k))
    # SGD's momentum buffer is a geometric sum of past gradients: at 1 or above it grows without bound
    _checked(check_interval, "optim.momentum", o.momentum, 0.0, 1.0, True)
    non_negative("optim.weight_decay", o.weight_decay)
    _checked(check_model_config, m, "model.")  # alpha, mu, gamma, lambdas, logit_scale, ...: the model's ranges
    positive("optim.accumulate_steps", o.accumulate_steps)
    if o.batch_size % o.accumulate_steps:
        raise ConfigError(f"optim.batch_size={o.batch_size} is not divisible by optim.accumulate_steps="
                          f"{o.accumulate_steps}: the batch is split into that many equal micro-batches")
    positive("data.imbalance_ratio", d.imbalance_ratio)
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {d.crop_scale}")
    positive("data.prefetch_factor", d.prefetch_factor)
    non_negative("data.num_workers", d.num_workers)
    if not 0 <= d.max_unreadable < 1:
        raise ConfigError(f"data.max_unreadable is a fraction in [0, 1) (0.01: 1% of the images), got {d.max_unreadable}")
    if d.image_size is not None:
        positive("data.image_size", d.image_size)
    for k in ("ckpt_every_steps", "eval_every_epochs"):
        non_negative(f"train.{k}", getattr(t, k))
    for k in ("log_every_steps", "eval_batch_size"):
        positive(f"train.{k}", getattr(t, k))
    if not t.output_dir.strip():
        # an empty path is the current folder: a run would write its files among the user's
        raise ConfigError("train.output_dir is empty: set it to the run's own folder (e.g. runs/sage)")
    if cfg.eval.tte != "none" and d.gpu_decode:
        # checked here rather than at the end of training: the crops are cut on the CPU (sage_fast.training.tte)
        raise ConfigError(f"eval.tte={cfg.eval.tte!r} needs data.gpu_decode=false (the crops are cut on the CPU)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device must be 'auto', 'cpu' or 'cuda[:i]', got {t.device!r}")


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["optim.lr=0.02", "--data.root=/x", "model.lambdas=[0,0,1]"]`` -> nested dict; values parsed as YAML."""
    out: Dict[str, Any] = {}
    for item in items:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def _nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{"optim.lr": 0.1, "model": {"fit": False}} -> nested dict (values kept as given, not parsed)."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with an earlier override of {p!r}")
        if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(_nest(value))
        else:
            node[parts[-1]] = _nest(value) if isinstance(value, Mapping) else value
    return out


def load_yaml(path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        # YAML files are UTF-8 (YAML 1.2), whatever the locale; another encoding is a one-line error
        loaded = yaml.safe_load(read_text(path, "config file"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def build_config(
    yaml_path=None,
    overrides: Sequence[str] | Mapping[str, Any] = (),  # ["a.b=1"] (parsed as YAML) or {"a.b": 1}
    preset: Optional[str] = None,
    base: Optional[Mapping[str, Any]] = None,
) -> SageConfig:
    """Defaults <- preset <- YAML <- overrides, validated. The preset may also come from the YAML or the overrides.

    Which preset: a ``preset=...`` override, else the `preset` argument (``sage-fast train --preset``), else the
    YAML file's ``preset:``; the command line wins over the file (a warning says so when they differ).

    >>> cfg = build_config(preset="imagenet_lt", overrides=["optim.lr=0.02"])
    >>> cfg.model.alpha, cfg.optim.lr
    (0.8, 0.02)

    base: a full config dict (e.g. stored in a checkpoint) to start from instead of the defaults.
    """
    file_layer = load_yaml(yaml_path) if yaml_path else {}
    over_layer = parse_overrides(overrides) if not isinstance(overrides, Mapping) else _nest(overrides)
    file_preset = file_layer.pop("preset", None)
    if "preset" in over_layer:
        name = over_layer.pop("preset")
    elif preset is not None:
        name = preset
    else:
        name = file_preset
    if file_preset is not None and name != file_preset:
        file_layer, replaced = _without_preset_values(file_layer, file_preset)
        what = f"; the file's values of the keys {file_preset!r} sets are {name!r}'s now ({', '.join(replaced)})" \
            if replaced else ""
        warnings.warn(f"preset {name!r} from the command line overrides the config file's preset "
                      f"{file_preset!r}{what}")
    cfg = SageConfig()
    if base is not None:
        base = upgrade_stored(base)
        _merge(cfg, base)
    if name is not None and (base is None or name != base.get("preset")):
        if not isinstance(name, str) or name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        _merge(cfg, PRESETS[name])
        cfg.preset = name
    _merge(cfg, file_layer)
    _merge(cfg, over_layer)
    _check_values(cfg)
    return cfg


def _without_preset_values(layer: Mapping[str, Any], preset) -> Tuple[Dict[str, Any], List[str]]:
    """`layer` (a config file) without the values it holds because `preset` set them: the keys the preset sets
    whose value in the file equals the preset's. A file written by ``--print-config`` holds every value,
    the preset's among them; when another preset is chosen, those must give way to it, not override it.
    -> (the layer without them, their dotted keys)."""
    if not isinstance(preset, str) or preset not in PRESETS:
        return dict(layer), []
    own = flatten(PRESETS[preset])
    kept = {k: v for k, v in flatten(layer).items() if k not in own or own[k] != v}
    return _nest(kept), sorted(k for k in flatten(layer) if k not in kept)


def upgrade_stored(d: Mapping[str, Any]) -> Dict[str, Any]:
    """A config stored by an older version (checkpoint, export) in today's keys.

    Before one ``model.backend``, runs stored ``model.adapter_impl`` (auto | fused | reference) and
    ``model.loss_backend``: "reference" / "torch" become "torch", "fused" / "triton" become "triton".
    """
    d = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    model = d.get("model")
    if isinstance(model, dict) and ("adapter_impl" in model or "loss_backend" in model):
        impl = {"reference": "torch", "fused": "triton"}.get(model.pop("adapter_impl", "auto"), "auto")
        loss = model.pop("loss_backend", "auto")
        model.setdefault("backend", impl if impl != "auto" else loss)
    return d


def config_from_dict(d: Mapping[str, Any]) -> SageConfig:
    """A full config dict (e.g. from a checkpoint) back to a validated `SageConfig`; presets are not re-applied."""
    cfg = SageConfig()
    _merge(cfg, upgrade_stored(d))
    _check_values(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Comparing configs

#: config keys that may differ between a checkpoint and the run resuming it: they decide where and how
#: fast the run goes, or what it logs, never the weights it ends with. Not optim.accumulate_steps: the
#: accumulated update is the full batch's summed in another order, equal up to float rounding, not in bits
RESUME_FREE_KEYS = frozenset({
    "preset",  # the values a preset set are compared themselves
    "data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.prefetch_factor",
    "train.output_dir", "train.device", "train.progress", "train.tensorboard", "train.log_every_steps",
    "train.ckpt_every_steps", "train.eval_every_epochs", "train.eval_batch_size", "train.find_unused_parameters",
    "model.text_batch_size",  # batching of the classifier's initialisation; the trained classifier is restored
    "model.grad_checkpoint",  # activation checkpointing recomputes the same forward: the same gradients
    "eval.tte",  # how the test set is evaluated, not what is trained
})
#: keys in which a finished run may differ from the requested config and still count as that run (sweep,
#: ablate): a finished run's metrics depend on how it was evaluated, so eval.tte is not free here
REUSE_FREE_KEYS = RESUME_FREE_KEYS - {"eval.tte"}


#: a key that one of two compared configs does not have
ABSENT = object()


def flatten(d: Mapping, prefix: str = "") -> Dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(stored: Mapping, current: Mapping, free=RESUME_FREE_KEYS) -> List[Tuple[str, Any, Any]]:
    """(key, stored value, current value) for every config key outside `free` (dotted keys) that differs.

    A config stored by an older version is first brought to today's keys (its missing ones at their
    defaults); a missing key on one side is the object `ABSENT`.
    """
    try:
        stored = config_from_dict(stored).to_dict()
    except ConfigError:
        pass
    old, new = flatten(stored), flatten(current)
    return [(k, old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
            if k not in free and old.get(k, ABSENT) != new.get(k, ABSENT)]


def format_differences(diffs: Sequence[Tuple[str, Any, Any]]) -> str:
    """``key (old -> new), ...`` for messages."""
    def show(v) -> str:
        return "absent" if v is ABSENT else json.dumps(v)

    return ", ".join(f"{k} ({show(a)} -> {show(b)})" for k, a, b in diffs)
