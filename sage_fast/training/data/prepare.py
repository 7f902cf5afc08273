"""``sage-fast prepare``: decode, check and resize every image once, into tar shards (format: `shards`).

Why: at iNaturalist scale (437k JPEGs, many 800 x 600 and larger) a worker spends most of its time decoding
pixels the 224 px model never sees, and hundreds of thousands of small files are slow on shared storage.
Prepared shards hold images whose short side is ``short_side`` (default 320, see `DEFAULT_SHORT_SIDE`) in a
few large files read by offset.

Work is split into shards planned up front (a fixed number of samples each, from the size of a few probe
images, so shards come out near ``shard_mb``), written by a pool of processes. Every file is written to a
temporary name and renamed, and each finished shard leaves a record (``.prepare/NAME.json``: its checksum and
sample index). A run that is interrupted is resumed by running the same command again: shards whose record
and checksum agree are kept, the others are written again. The manifest is written last; once it exists the
folder is finished and the command says so instead of doing anything.

Stopping (Ctrl-C, SIGTERM): the workers ignore the signals themselves (Ctrl-C reaches the terminal's whole
process group) and are told to stop by this process instead: each abandons its shard at the next image,
removing the shard's temporary file, and the command ends within about one image's time with
`sage_fast.training.preemption.Interrupted`, saying how many shards are finished and kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import tarfile
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ...utils.files import atomic_path, atomic_write_bytes, remove_stale_temporaries
from ..errors import UserError
from ..preemption import STOP_SIGNALS, Interrupted, interrupting_signal
from .unreadable import READ_ERRORS, UnreadableImagesError, UnreadableLimit, read_error_reason
from .datasets import ImageListDataset, LTDataset
from .images import open_image_file, to_rgb
from .shards import FORMAT, MANIFEST, VERSION, read_manifest, sample_key, shard_name

#: Short side of the prepared images. RandomResizedCrop (area 8%..100%, aspect 3/4..4/3) to 224 px upsamples
#: every crop whose short side is under 224: for 4:3 images of short side 256 that is 81% of the crops, at
#: 320 49%, at 448 20%, at 600 6% (torchvision's get_params, 4000 draws). 256 would only serve the test
#: transform (resize to 256, centre crop 224) exactly; 320 halves the share of blurred training crops for
#: 1.56x the pixels of 256, and is still ~1/5 of the pixels of a 800 x 600 original.
DEFAULT_SHORT_SIDE = 320
DEFAULT_QUALITY = 90
#: target shard size: large enough that a shared file system serves few big files, small enough that an
#: interrupted run loses little and that the work spreads over the processes
DEFAULT_SHARD_MB = 256.0
#: images encoded to estimate the bytes per sample (hence the samples per shard)
PROBE_IMAGES = 8
STATE_DIR = ".prepare"

_SOURCES: Dict[str, LTDataset] = {}  # split -> data set, set in each worker (inherited or pickled once)
_COUNTER = None  # images done, shared with the main process for the progress bar
_STOP = None  # set by the main process: abandon the shard under way


class _Stopped(Exception):
    """A worker abandoned its shard because the main process was told to stop."""


def _init_worker(sources, counter, stop=None, worker: bool = False) -> None:
    global _SOURCES, _COUNTER, _STOP
    _SOURCES, _COUNTER, _STOP = sources, counter, stop
    if worker:
        # the main process hears the stop signals and stops the workers through `stop`; they were started with
        # the signals blocked (`_signals_blocked`), so none arrives before they are ignored here
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _signals_blocked():
    """Stop signals are held back while worker processes are forked (they inherit the mask), then delivered."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _encode(ds: LTDataset, index: int, short_side: int, quality: int) -> bytes:
    """The sample's JPEG bytes for the shard: decoded in full (the check), resized so the short side is
    `short_side` (never enlarged), JPEG at `quality`; an original JPEG file that needs no resize is copied."""
    original: Optional[Path] = None
    if isinstance(ds, ImageListDataset):
        original = ds.root / ds.paths[index]
        im = open_image_file(original)
    else:
        im = ds.open_image(index)
    with im:
        fmt = im.format
        rgb = to_rgb(im)  # the full decode: a truncated or corrupt file raises here
    w, h = rgb.size
    if not (w > 0 and h > 0):
        raise ValueError(f"image of size {w}x{h}")
    resize = 0 < short_side < min(w, h)
    if original is not None and fmt == "JPEG" and not resize:
        return original.read_bytes()
    if resize:
        # torchvision's Resize(short_side) rule, so the test transform's Resize(256) of a 256 image is a no-op
        if w <= h:
            size = (short_side, int(short_side * h / w))
        else:
            size = (int(short_side * w / h), short_side)
        rgb = rgb.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Add `name` to `tar` (fixed owner, mode and time: the same input gives the same bytes); return the
    offset of its data in the file."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - (len(data) + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        # in chunks, not hashlib.file_digest: that needs Python 3.11
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_shard(job: dict) -> dict:
    """Write one shard (positions [start, stop) of a split) and return its record (see `prepare`)."""
    ds = _SOURCES[job["split"]]
    out = Path(job["out"])
    final = out / job["name"]
    index: Dict[str, List] = {"offset": [], "size": [], "label": [], "key": [], "source": []}
    unreadable: List[Tuple[str, str]] = []
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(job["start"], job["stop"]):
                if _STOP is not None and _STOP.is_set():
                    raise _Stopped(job["name"])  # the temporary file goes with it (atomic_path)
                try:
                    data = _encode(ds, i, job["short_side"], job["quality"])
                except READ_ERRORS as e:
                    unreadable.append((ds.describe(i), read_error_reason(e)))
                else:
                    key, label = sample_key(i), ds.targets[i]
                    index["offset"].append(_tar_member(tar, f"{key}.jpg", data))
                    _tar_member(tar, f"{key}.cls", str(label).encode())
                    index["size"].append(len(data))
                    index["label"].append(label)
                    index["key"].append(i)
                    index["source"].append(ds.describe(i))
                if _COUNTER is not None:
                    with _COUNTER.get_lock():
                        _COUNTER.value += 1
    record = {"name": job["name"], "bytes": final.stat().st_size, "sha256": _sha256(final),
              "samples": len(index["key"]), "index": index, "unreadable": unreadable}
    atomic_write_bytes(out / STATE_DIR / f"{job['name']}.json", json.dumps(record).encode())
    return record


def _fingerprint(ds: LTDataset) -> str:
    """A checksum of the split's listing (files and labels): a resumed run must read the same samples."""
    h = hashlib.sha256()
    for i in range(len(ds)):
        h.update(f"{ds.describe(i)}\t{ds.targets[i]}\n".encode())
    return h.hexdigest()


def _per_shard(ds: LTDataset, short_side: int, quality: int, shard_mb: float) -> int:
    n = len(ds)
    sizes = []
    for i in sorted({round(k * (n - 1) / max(PROBE_IMAGES - 1, 1)) for k in range(min(PROBE_IMAGES, n))}):
        try:
            sizes.append(len(_encode(ds, i, short_side, quality)) + 3 * tarfile.BLOCKSIZE)
        except READ_ERRORS:
            pass
    mean = float(np.mean(sizes)) if sizes else 64e3
    return max(1, int(shard_mb * 2 ** 20 / mean))


def _kept(out: Path, name: str) -> Optional[dict]:
    """The record of a finished shard whose file is there and matches its checksum, else None."""
    rec_path, shard = out / STATE_DIR / f"{name}.json", out / name
    if not (rec_path.is_file() and shard.is_file()):
        return None
    try:
        record = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("bytes") != shard.stat().st_size or record.get("sha256") != _sha256(shard):
        return None
    return record


def _plain(obj):
    return json.loads(json.dumps(obj))


def prepare(data_cfg, out, short_side: int = DEFAULT_SHORT_SIDE, quality: int = DEFAULT_QUALITY,
            shard_mb: float = DEFAULT_SHARD_MB, workers: Optional[int] = None, progress: bool = True,
            log: Callable[[str], None] = print) -> dict:
    """Prepare both splits of the data set `data_cfg` (a `DataConfig`) into the folder `out`.

    Returns a summary: {"out", "done_before" (bool), "shards", "kept", "written", "bytes",
    "images": {split: written}, "unreadable": {split: count}}.
    """
    from .registry import build_data

    if short_side < 0:
        raise UserError(f"--short-side must be >= 0 (0: keep the original size), got {short_side}")
    if not 1 <= quality <= 95:
        raise UserError(f"--quality must lie in 1..95 (PIL's JPEG quality), got {quality}")
    if not shard_mb > 0:
        raise UserError(f"--shard-size must be positive (MB), got {shard_mb}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out is a file, not a folder: {out}")
    # every image is decoded below, a stricter check than data.check_images' header parse
    cfg = dataclasses.replace(data_cfg, check_images=False, prepared="")
    with warnings.catch_warnings():
        # the probe's finds are reported with prepare's own (summary and manifest), not as a warning
        warnings.simplefilter("ignore", UserWarning)
        data = build_data(cfg, 224, raw=True)
    source = {k: getattr(cfg, k) for k in ("dataset", "train_split", "test_split", "class_names",
                                            "imbalance_ratio", "subsample_seed")}
    source["root"] = str(Path(cfg.root).expanduser().resolve())
    splits = {"train": data.train, "test": data.test}
    settings = _plain({"short_side": short_side, "quality": quality, "shard_mb": shard_mb, "source": source,
                       "fingerprints": {s: _fingerprint(ds) for s, ds in splits.items()}})

    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        if manifest.get("settings") != settings:
            raise UserError(f"{out} already holds a prepared data set made from other data or settings "
                            f"(its {MANIFEST}'s settings differ): choose another --out, or delete it first")
        log(f"{out} is already prepared with these settings ({MANIFEST}); nothing to do")
        return {"out": str(out), "done_before": True}

    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    for folder in (out, state):
        remove_stale_temporaries(folder)  # a killed run's half-written files
    plan_path = state / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        if plan.get("settings") != settings:
            raise UserError(f"{out} holds an unfinished preparation from other data or settings: choose another "
                            f"--out, or delete it first")
    else:
        plan = {"settings": settings,
                "per_shard": {s: _per_shard(ds, short_side, quality, shard_mb) for s, ds in splits.items()}}
        atomic_write_bytes(plan_path, json.dumps(plan).encode())

    jobs: List[dict] = []
    for split, ds in splits.items():
        per = plan["per_shard"][split]
        for number, start in enumerate(range(0, len(ds), per)):
            jobs.append({"split": split, "name": shard_name(split, number), "start": start,
                         "stop": min(start + per, len(ds)), "out": str(out), "short_side": short_side,
                         "quality": quality})
    records: Dict[str, dict] = {}
    todo = []
    for job in jobs:
        record = _kept(out, job["name"])
        if record is not None:
            records[job["name"]] = record
        else:
            todo.append(job)
    if records:
        log(f"resuming: {len(records)} of {len(jobs)} shards are finished and verified (sha256); "
            f"writing the other {len(todo)}")
    try:
        records.update(_run(todo, splits, workers, progress, records))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGUSR1 (`Interrupted`)
        signum = interrupting_signal(e)
        kept = len(records)  # those verified before and those finished since
        raise Interrupted(signum, f"{signal.Signals(signum).name}: stopped; {kept} of {len(jobs)} shards are finished "
                                  f"and kept in {out}: run the same command again to write the other "
                                  f"{len(jobs) - kept}") from None

    manifest = {"format": FORMAT, "version": VERSION, "settings": settings, "class_names": data.class_names,
                "group_counts": data.group_counts, "splits": {}}
    for split, ds in splits.items():
        recs = [records[j["name"]] for j in jobs if j["split"] == split]
        unreadable = [list(u) for u in (ds.unreadable.known if ds.unreadable else [])]
        unreadable += [list(u) for r in recs for u in r["unreadable"]]
        listed = ds.unreadable.total if ds.unreadable else len(ds)
        limit = UnreadableLimit("training" if split == "train" else "test", listed, cfg.max_unreadable,
                                [tuple(u) for u in unreadable])
        if limit.count() > limit.allowed:
            raise UnreadableImagesError(limit.message() + " (the shards written so far are kept: the same "
                                                          "command with a higher limit finishes without redoing them)")
        cols = {k: [] for k in ("shard", "offset", "size", "label", "key", "source")}
        for number, r in enumerate(recs):
            cols["shard"] += [number] * r["samples"]
            for k in ("offset", "size", "label", "key", "source"):
                cols[k] += r["index"][k]
        manifest["splits"][split] = {
            "listed": listed,
            "class_counts": np.bincount(np.asarray(cols["label"], dtype=np.int64),
                                        minlength=len(data.class_names)).tolist(),
            "unreadable": unreadable,
            "shards": [{k: r[k] for k in ("name", "bytes", "sha256", "samples")} for r in recs],
            "samples": cols,
        }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest).encode())
    shutil.rmtree(state, ignore_errors=True)  # the manifest now holds everything the records held
    return {"out": str(out), "done_before": False, "shards": len(jobs), "kept": len(jobs) - len(todo),
            "written": len(todo), "bytes": sum(r["bytes"] for r in records.values()),
            "images": {s: sum(sh["samples"] for sh in manifest["splits"][s]["shards"]) for s in splits},
            "unreadable": {s: len(manifest["splits"][s]["unreadable"]) for s in splits}}


def _run(todo: List[dict], sources: Dict[str, LTDataset], workers: Optional[int], progress: bool,
         done: Optional[Dict[str, dict]] = None) -> Dict[str, dict]:
    """Write the shards of `todo`, in `workers` processes (1: in this one), with a progress bar over images.

    The records of finished shards go into `done` as they come (returned too). On a stop signal
    (KeyboardInterrupt, `Interrupted`) the workers are told to stop, each abandons its shard at the next
    image, and the exception goes on once they have exited; a second signal while waiting for them kills them.
    """
    done = {} if done is None else done
    if not todo:
        return done
    from tqdm.auto import tqdm

    workers = max(1, min(int(workers or os.cpu_count() or 1), len(todo)))
    counter = mp.Value("q", 0)
    bar = tqdm(total=sum(j["stop"] - j["start"] for j in todo), disable=not progress, desc="preparing",
               unit="img", dynamic_ncols=True, smoothing=0.05)
    try:
        if workers == 1:
            _init_worker(sources, counter)
            try:
                for job in todo:
                    done[job["name"]] = _write_shard(job)
                    bar.update(counter.value - bar.n)
            finally:
                _init_worker({}, None)
            return done
        # fork: the workers inherit the data sets (a 437k-path listing) instead of unpickling a copy each
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        stop = ctx.Event()
        ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(sources, counter, stop, True))
        pending, futures = set(), []
        try:
            with _signals_blocked():  # the processes start at the first submit
                futures = [ex.submit(_write_shard, job) for job in todo]
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in finished:
                    record = f.result()
                    done[record["name"]] = record
                bar.update(counter.value - bar.n)
        except BaseException:
            stop.set()
            for f in pending:
                f.cancel()
            try:
                ex.shutdown(wait=True, cancel_futures=True)  # each worker is at most one image from its stop
            except BaseException:
                _kill_workers(ex)  # stopped again while waiting: do not wait
                raise
            for f in futures:  # shards that were finished when the stop came
                if f.done() and not f.cancelled() and f.exception() is None:
                    done[f.result()["name"]] = f.result()
            raise
        ex.shutdown(wait=True)
        return done
    finally:
        bar.update(counter.value - bar.n)
        bar.close()


def _kill_workers(ex: ProcessPoolExecutor) -> None:
    """SIGKILL the executor's processes (what is left of their shards are ``.NAME.PID.tmp`` files, deleted when
    the command runs again). The executor keeps them in a private attribute: absent, nothing is killed."""
    for proc in list((getattr(ex, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()
    ex.shutdown(wait=False, cancel_futures=True)


def format_summary(s: dict) -> str:
    if s.get("done_before"):
        return f"{s['out']}: already prepared"
    images = ", ".join(f"{n} {split}" for split, n in s["images"].items())
    bad = sum(s["unreadable"].values())
    kept = f" ({s['kept']} kept from an earlier run)" if s["kept"] else ""
    skipped = f"; {bad} unreadable images left out (listed in {MANIFEST})" if bad else ""
    return (f"prepared {images} images into {s['shards']} shards{kept}, {s['bytes'] / 2 ** 20:.1f} MiB, in "
            f"{s['out']}{skipped}; train on them with data.prepared={s['out']}")


