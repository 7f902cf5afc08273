"""Commands that train several configs (`sweep`, `ablate`): one folder per run, and a finished run is reused.

A run whose folder holds the metrics of a finished run of the same config is not trained again; one
interrupted with a checkpoint is resumed; one whose stored config differs (the base config changed) is
trained again from scratch. So an interrupted sweep or ablation continues where it stopped when the same
command is given again. "The same config": equal up to `REUSE_FREE_KEYS` (`config.config_differences`).
"""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

from .config import REUSE_FREE_KEYS, ConfigError, SageConfig, config_differences, config_from_dict
from .distributed import is_main_process
from .run_folder import CONFIG, LAST


def stored_config(folder) -> Optional[Dict[str, Any]]:
    """The config a run folder was trained with (its ``config.yaml``, brought to today's keys), or None."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {}).to_dict()
    except (ConfigError, yaml.YAMLError, TypeError, AttributeError):
        return None  # written by another version or damaged: not a run of this config


def same_run(cfg: SageConfig, folder) -> bool:
    """Whether `folder`'s ``config.yaml`` is `cfg`, up to `REUSE_FREE_KEYS`."""
    stored = stored_config(folder)
    return stored is not None and not config_differences(stored, cfg.to_dict(), free=REUSE_FREE_KEYS)


def finished_report(cfg: SageConfig, folder) -> Optional[dict]:
    """The ``metrics.json`` of a finished run of `cfg` in `folder`, else None.

    Finished: the metrics are at least as new as ``config.yaml`` (which a run writes when it starts, so
    metrics left by an earlier config do not count), were taken after the last epoch, and the config is
    `cfg` (`same_run`).
    """
    folder = Path(folder)
    metrics, config = folder / "metrics.json", folder / CONFIG
    if not (metrics.is_file() and config.is_file()) or metrics.stat().st_mtime < config.stat().st_mtime:
        return None
    try:
        report = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("epoch") != cfg.optim.epochs or not same_run(cfg, folder):
        return None
    return report


def run_or_reuse(cfg: SageConfig, folder) -> Tuple[dict, str]:
    """Train `cfg` in `folder` (its ``train.output_dir`` is set to it), unless a finished run is there.

    -> (report, status): status "reused" (the finished run's metrics.json), "resumed" (an interrupted run
    of the same config continued from its checkpoint) or "trained". The config is not modified.
    """
    from .trainer import train

    cfg = copy.deepcopy(cfg)
    cfg.train.output_dir = str(folder)
    report = finished_report(cfg, folder)
    if report is not None:
        return report, "reused"
    resume = None
    if (Path(folder) / LAST).is_file():
        if same_run(cfg, folder):
            resume = Path(folder) / LAST
        elif is_main_process():
            warnings.warn(f"{folder} holds a run of another config: training it again from scratch")
    # this folder belongs to the sweep (or ablation): a run of another config there is replaced
    report = train(cfg, resume=resume, overwrite=resume is None)
    return report, ("resumed" if resume else "trained")
