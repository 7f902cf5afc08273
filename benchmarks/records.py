"""The results folder's format: records (written as measured, read back in one place), ratios, JSON files.

A *record* is one measured case: a flat dict with at least ``group`` (adapter, loss, train, infer,
encoder, input, ...), ``case`` and ``impl`` (together its *slot*) and ``time_s`` (median seconds per
call), plus what the benchmark measured (throughput, peak memory, error against the eager reference,
ratios). `Recorder` appends each to ``<results dir>/records.jsonl`` as it is measured (so a run cut short
by a time limit keeps what it measured) and puts it into ``benchmark.extra_info`` (so pytest-benchmark's
``--benchmark-json`` file carries it too). `load_records` reads them back (a later measurement of the same
slot wins): the benchmarks' conftest (``--sage-append``) and `benchmarks.report` both read through it.

Ratios (`add_ratios`) are taken between records of the same folder: time of the baseline / time of the
case, same group and case (`BASELINES`).

The other files of the folder (env.json, ceilings.json, skipped.json) are plain JSON, written atomically
by `write_json` (`sage_fast.utils.files`) and read by `read_json`.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Iterable, Optional

import torch

from sage_fast.utils.files import atomic_write_text

from .environment import device_name

RECORDS_FILE = "records.jsonl"


def slot(rec: dict) -> tuple:
    """(group, case, impl): what a record measures; one record per slot and folder."""
    return rec.get("group"), rec.get("case"), rec.get("impl")


def _latest_per_slot(records: Iterable[dict]) -> list[dict]:
    by_slot: dict = {}
    for rec in records:
        by_slot[slot(rec)] = rec  # a later measurement of the same case wins
    return list(by_slot.values())


def load_records(results_dir: Path) -> list[dict]:
    """The records of a results folder (its records.jsonl; none when it has none), one per slot."""
    path = Path(results_dir) / RECORDS_FILE
    if not path.exists():
        return []
    return _latest_per_slot(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def records_from_benchmark_json(paths: Iterable[Path]) -> list[dict]:
    """The records that pytest-benchmark JSON files (``--benchmark-json``) carry in each benchmark's
    extra_info, one per slot."""
    found = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        found += [b["extra_info"] for b in data.get("benchmarks", [])
                  if (b.get("extra_info") or {}).get("group") and b["extra_info"].get("impl")]
    return _latest_per_slot(found)


def write_records(results_dir: Path, records: Iterable[dict]) -> Path:
    """Replace the folder's records.jsonl by `records` (atomically)."""
    text = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in records)
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(results_dir) / RECORDS_FILE, text)


def read_json(path: Path, default=None):
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, obj) -> Path:
    """One of the folder's JSON files (env.json, ceilings.json, skipped.json, tune.json), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Recorder:
    """Session-wide store of measured cases; appends each record to records.jsonl as it is measured.

    append: keep the records already in the folder (run_gpu.sh runs several pytest sessions into one
    folder); otherwise the folder's records.jsonl is started afresh.
    """

    def __init__(self, results_dir: Path, append: bool):
        self.results_dir = Path(results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.results_dir / RECORDS_FILE
        self.records: list[dict] = []
        self.extra_infos: list[dict] = []
        if append:
            self.records = load_records(self.results_dir)
        elif self.path.exists():
            self.path.unlink()

    def add(self, record: dict, extra_info: Optional[dict] = None) -> dict:
        record = dict(record)
        record.setdefault("device", device_name())
        record.setdefault("torch_threads", torch.get_num_threads())
        record.setdefault("measured_at", now_utc())
        add_ratios(record, self.records)
        self.records = [r for r in self.records if slot(r) != slot(record)] + [record]
        with open(self.path, "a") as fh:  # append-only: one line per measured case, as it is measured
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if extra_info is not None:
            extra_info.update(record)
            self.extra_infos.append(extra_info)
        return record

    def refresh_ratios(self) -> None:
        """Recompute ratios once everything ran (order-independent), also in the benchmark extra_info."""
        for rec in self.records:
            add_ratios(rec, self.records)
        by_slot = {slot(r): r for r in self.records}
        for info in self.extra_infos:
            rec = by_slot.get(slot(info))
            if rec is not None:
                info.update(rec)


# Which implementation each group's ratios are taken against.
BASELINES = {
    "adapter": ("eager", "compile"),
    "loss": ("eager", "compile"),
    "train": ("reference",),
    "infer": ("reference",),
    "encoder": ("open_clip",),
}
FLOOR_CASE = "floor"
#: the training step's frozen-backbone floor: forward + backward through the frozen blocks without
#: adapters (+ FIT's second forward with FIT on), one per FIT setting ("case")
FLOOR_BWD = "floor_bwd"


def add_ratios(record: dict, records: list[dict]) -> None:
    """speedup_vs_<base> = time(base) / time(this), for the same group and case, where both exist.

    Train records (Sage) also get vs_floor: images/s as a fraction of the frozen-backbone floor with the
    same FIT setting (floor_bwd), and fused_compile its speedup over fused; inference records vs_floor
    against the no-grad floor.
    """
    group, case, impl = slot(record)
    time_s = record.get("time_s")
    if not time_s:
        return
    for base in BASELINES.get(group, ()):
        if base == impl:
            continue
        other = next((r for r in records if slot(r) == (group, case, base)), None)
        if other and other.get("time_s"):
            record[f"speedup_vs_{base}"] = other["time_s"] / time_s
    if group == "train" and impl not in ("floor", FLOOR_BWD):
        floor = next((r for r in records if slot(r) == (group, case, FLOOR_BWD)), None)
        if floor and floor.get("time_s"):
            record["vs_floor"] = floor["time_s"] / time_s
    if group == "train" and impl == "fused_compile":
        fused = next((r for r in records if slot(r) == (group, case, "fused")), None)
        if fused and fused.get("time_s"):
            record["speedup_vs_fused"] = fused["time_s"] / time_s
    if group == "infer" and case != FLOOR_CASE:
        floor = next((r for r in records if slot(r) == (group, FLOOR_CASE, "floor")), None)
        if floor and floor.get("time_s"):
            record["vs_floor"] = floor["time_s"] / time_s
