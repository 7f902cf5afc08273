"""Commands that train several configs (`sweep`, `ablate`): one folder per run, and a finished run is reused.

A run whose folder holds the metrics of a finished run of the same config, trained on the same data, is not
trained again; one interrupted with a checkpoint of the same config and data is resumed; one whose stored
config or data differs (the base config changed, data.root names another data set) is trained again from
scratch. So an interrupted sweep or ablation continues where it stopped when the same command is given again.
"The same config": equal up to `REUSE_FREE_KEYS` (`config.config_differences`).

"The same data" (`data_difference`): the class names and training images per class the run stored with its
weights (every export and checkpoint holds them, old ones too), and the number of test images its report
counted, against the data the config names now, built as a run builds it. ``data.root`` is free in
`REUSE_FREE_KEYS` so that a data set can move; this check is what keeps another data set at that key from
passing for it. It is cheap: the data set's listing is read once per command and data config (`DataIdentities`),
no image is decoded, and no digest of image files is taken. It is reliable for what changes the numbers in
practice: another data set, subset, imbalance ratio, class list or test split. Images replaced in place under
the same names and counts are not noticed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from ..utils.folder_lock import lock_holder
from .checkpoint import class_difference, stored_run_info
from .config import REUSE_FREE_KEYS, ConfigError, SageConfig, config_differences, config_from_dict
from .distributed import is_main_process
from .run_folder import CONFIG, EXPORT, LAST, METRICS, PER_CLASS, read_report

#: data config (as JSON) -> its `data_identity`: one listing per command and data set (see the docstring)
DataIdentities = Dict[str, dict]


def stored_config(folder) -> Optional[Dict[str, Any]]:
    """The config a run folder was trained with (its ``config.yaml``, brought to today's keys), or None."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}).to_dict()
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError):
        return None  # written by another version or damaged: not a run of this config


def same_run(cfg: SageConfig, folder) -> bool:
    """Whether `folder`'s ``config.yaml`` is `cfg`, up to `REUSE_FREE_KEYS`."""
    stored = stored_config(folder)
    return stored is not None and not config_differences(stored, cfg.to_dict(), free=REUSE_FREE_KEYS)


def data_identity(cfg: SageConfig, identities: Optional[DataIdentities] = None) -> dict:
    """What of the data `cfg` names a finished run is compared on: {"class_names", "class_counts" (training
    images per class), "test_images"}, from the data set built as a training run builds it (no transform, no
    decode). `identities`: a cache the caller keeps for one command."""
    from .data import build_data
    from .preflight import check_image_size

    key = json.dumps([dataclasses.asdict(cfg.data), cfg.model.name], sort_keys=True, default=str)
    if identities is not None and key in identities:
        return identities[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a run that trains on it warns about the data itself
        data = build_data(cfg.data, check_image_size(cfg), raw=True)
    found = {"class_names": list(data.class_names), "class_counts": [int(n) for n in data.class_counts],
             "test_images": len(data.test)}
    if identities is not None:
        identities[key] = found
    return found


def data_difference(cfg: SageConfig, stored_from, report: Optional[dict] = None,
                    identities: Optional[DataIdentities] = None) -> Optional[str]:
    """How the data a run was trained on (the classes stored in `stored_from`, its export or checkpoint, or
    for a zero-shot evaluation its ``per_class.csv``, and the test images its `report` counted) differs from
    the data `cfg` names now, in words; None when it does not."""
    stored = _per_class_csv(stored_from) if Path(stored_from).name == PER_CLASS else stored_run_info(stored_from)
    if stored["class_names"] is None or stored["class_counts"] is None:
        return "its weights store no class names"
    now = data_identity(cfg, identities)
    differ = class_difference(stored["class_names"], stored["class_counts"], now["class_names"],
                              now["class_counts"], there="in the run", here="in the data now")
    if differ is None and report is not None and "test_images" in report:
        evaluated = int(report["test_images"]) + int(report.get("skipped") or 0)
        if evaluated != now["test_images"]:
            differ = f"{evaluated} test images in the run, {now['test_images']} in the data now"
    return differ


def _per_class_csv(path) -> Dict[str, Any]:
    """The class names and training counts of a report's ``per_class.csv`` (what a zero-shot evaluation,
    which has no weights, keeps of its data); None values when it cannot be read."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        # the name column is JSON text in CSV quoting (metrics.write_report); a name with quotes or backslashes
        # may not read back exactly, which only makes the run count as another data set's (evaluated again)
        return {"class_names": [r["name"] for r in rows],
                "class_counts": [int(r["train_count"]) for r in rows]}
    except (OSError, ValueError, KeyError, TypeError):
        return {"class_names": None, "class_counts": None}


def finished_report(cfg: SageConfig, folder, identities: Optional[DataIdentities] = None,
                    epoch: Optional[int] = None) -> Optional[dict]:
    """The ``metrics.json`` of a finished run of `cfg` in `folder`, else None.

    Finished: the metrics are at least as new as ``config.yaml`` (which a run writes when it starts, so
    metrics left by an earlier config do not count), were taken after the last epoch (`epoch`, default
    ``cfg.optim.epochs``; 0 for a zero-shot evaluation, which has no weights: its ``per_class.csv`` says what
    data it saw), the config is `cfg` (`same_run`), the run was trained on the data `cfg` names
    (`data_difference`), and no other process is writing into the folder now.
    """
    folder = Path(folder)
    metrics, config = folder / METRICS, folder / CONFIG
    if not (metrics.is_file() and config.is_file()) or metrics.stat().st_mtime < config.stat().st_mtime:
        return None
    report = read_report(folder)
    wanted = cfg.optim.epochs if epoch is None else epoch
    if report is None or report.get("epoch") != wanted or not same_run(cfg, folder):
        return None
    stored = folder / (PER_CLASS if wanted == 0 else EXPORT)
    if not stored.is_file() or lock_holder(folder) is not None:
        return None
    if data_difference(cfg, stored, report, identities) is not None:
        return None
    return report


def run_or_reuse(cfg: SageConfig, folder, identities: Optional[DataIdentities] = None) -> Tuple[dict, str]:
    """Train `cfg` in `folder` (its ``train.output_dir`` is set to it), unless a finished run is there.

    -> (report, status): status "reused" (the finished run's metrics.json), "resumed" (an interrupted run
    of the same config and data continued from its checkpoint) or "trained". The config is not modified.
    """
    from .trainer import train

    cfg = copy.deepcopy(cfg)
    cfg.train.output_dir = str(folder)
    report = finished_report(cfg, folder, identities)
    if report is not None:
        return report, "reused"
    folder = Path(folder)
    resume, why = None, None
    for stored in (folder / LAST, folder / EXPORT):
        if not stored.is_file():
            continue
        if not same_run(cfg, folder):
            why = "a run of another config"
        else:
            # a finished run's report is compared too: its numbers are of the test split it was evaluated on
            differ = data_difference(cfg, stored, read_report(folder), identities)
            if differ is not None:
                why = f"a run trained on other data ({differ})"
            elif stored.name == LAST:
                resume = stored
        break
    if why and is_main_process():
        warnings.warn(f"{folder} holds {why}: training it again from scratch")
    # this folder belongs to the sweep (or ablation): a run of another config there is replaced
    report = train(cfg, resume=resume, overwrite=resume is None)
    return report, ("resumed" if resume else "trained")
