"""``sage-fast prepare`` (tar shards + manifest), training on them (``data.prepared``), and ``data.fast_decode``."""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.images import make_image_folder, save_image, write_split_file
from PIL import Image, JpegImagePlugin
from safetensors.torch import load_file

from sage_fast.cli import main as cli_main
from sage_fast.training.config import build_config
from sage_fast.training.data import build_data
from sage_fast.training.data import prepare as prepare_mod
from sage_fast.training.data.shards import PreparedDataset, read_manifest
from sage_fast.training.data.transforms import CLIP_STD, ReducedDecode, build_transform
from sage_fast.training.trainer import train

COUNTS = (30, 12, 6)
SHORT = 40  # prepared short side: the 48 px PNGs and the 64 x 96 JPEGs are resized, nothing is enlarged
BIG = 4  # 96 x 64 JPEGs added to class 0


def _data_overrides(root):
    return [f"data.root={root}", "data.class_names=classnames.txt", "data.max_unreadable=0.1"]


@pytest.fixture(scope="module")
def _source(tmp_path_factory):
    """A folder data set (48 px PNGs), plus BIG larger JPEGs and one file that is not an image."""
    root = make_image_folder(tmp_path_factory.mktemp("src"), COUNTS, test=3, size=48)
    rng = np.random.default_rng(1)
    lines = (root / "train.txt").read_text().splitlines()
    for i in range(BIG):
        save_image(root / f"train/big{i}.jpg", rng.integers(0, 255, (64, 96, 3)).astype(np.uint8))
        lines.append(f"train/big{i}.jpg 0")
    (root / "train/broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    lines.append("train/broken.jpg 1")
    write_split_file(root / "train.txt", [(p, int(t)) for p, t in (ln.split() for ln in lines)])
    return root


@pytest.fixture(scope="module")
def _prepared(_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    args = ["prepare", "--out", str(out), "--short-side", str(SHORT), "--shard-size", "0.02", "--workers", "2",
            "--no-progress"] + _data_overrides(_source)
    assert cli_main(args) == 0
    return out


def _prepare(source, out, **kw):
    cfg = build_config(overrides=_data_overrides(source))
    kw = {"short_side": SHORT, "shard_mb": 0.02, "workers": 1, "progress": False, "log": lambda m: None, **kw}
    return prepare_mod.prepare(cfg.data, out, **kw)


def test_shards_follow_the_webdataset_layout_and_the_manifest(_source, _prepared, capsys):
    m = read_manifest(_prepared)
    tr = m["splits"]["train"]
    assert m["class_names"] == [f"colour_{k}" for k in range(len(COUNTS))]
    assert m["settings"]["short_side"] == SHORT and m["settings"]["quality"] == 90
    assert tr["listed"] == sum(COUNTS) + BIG + 1
    assert tr["class_counts"] == [COUNTS[0] + BIG, COUNTS[1], COUNTS[2]]  # broken.jpg (class 1) left out
    assert [Path(f).name for f, _ in tr["unreadable"]] == ["broken.jpg"]
    assert len(tr["shards"]) > 2 and [s["name"] for s in tr["shards"]][:2] == ["train-000000.tar", "train-000001.tar"]
    assert m["splits"]["test"]["class_counts"] == [3] * len(COUNTS)
    s = tr["samples"]
    for number, shard in enumerate(tr["shards"]):
        path = _prepared / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        mine = [i for i, k in enumerate(s["shard"]) if k == number]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert [m.name for m in members] == [f"{s['key'][i]:09d}.{ext}" for i in mine for ext in ("jpg", "cls")]
            for i, jpg, cls in zip(mine, members[::2], members[1::2]):
                assert (jpg.offset_data, jpg.size) == (s["offset"][i], s["size"][i])
                assert int(tar.extractfile(cls).read()) == s["label"][i]
    # the sample read by offset is the prepared image: the tar member's bytes, short side SHORT
    data = build_data(build_config(overrides=[f"data.prepared={_prepared}"]).data, 32, raw=True)
    assert isinstance(data.train, PreparedDataset) and len(data.train) == sum(COUNTS) + BIG
    assert data.class_counts == tr["class_counts"] and data.class_names == m["class_names"]
    i = s["source"].index(str(_source / "train/big2.jpg"))
    with tarfile.open(_prepared / tr["shards"][s["shard"][i]]["name"]) as tar:
        member = tar.extractfile(f"{s['key'][i]:09d}.jpg").read()
    assert bytes(data.train.read_raw(i).numpy()) == member == data.train.read_bytes(i)
    got = np.asarray(Image.open(io.BytesIO(member)).convert("RGB"), dtype=np.float64)
    want = Image.open(_source / "train/big2.jpg").convert("RGB").resize((60, 40), Image.BICUBIC)
    assert got.shape == (40, 60, 3)
    assert np.abs(got - np.asarray(want, dtype=np.float64)).mean() < 12  # noise re-encoded as JPEG q90
    assert "broken.jpg" not in " ".join(data.train.describe(j) for j in range(len(data.train)))
    # a finished preparation is not redone
    assert cli_main(["prepare", "--out", str(_prepared), "--short-side", str(SHORT), "--shard-size", "0.02",
                     "--no-progress"] + _data_overrides(_source)) == 0
    assert "already prepared" in capsys.readouterr().out


def test_the_webdataset_package_reads_the_shards(_prepared):
    """Every split through `webdataset.WebDataset` itself: keys, labels (decoded .cls) and JPEG bytes against the
    manifest's index (the bytes at offset / size in the shard)."""
    wds = pytest.importorskip("webdataset")
    m = read_manifest(_prepared)
    for split, info in m["splits"].items():
        s = info["samples"]
        urls = [str(_prepared / shard["name"]) for shard in info["shards"]]
        got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode())
        assert [g["__key__"] for g in got] == [f"{k:09d}" for k in s["key"]], split
        assert [g["cls"] for g in got] == s["label"], split
        for i, g in enumerate(got):
            assert set(g) >= {"jpg", "cls"} and g["__url__"] == urls[s["shard"][i]]
        raw = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        for i, g in enumerate(raw):
            with open(urls[s["shard"][i]], "rb") as fh:
                fh.seek(s["offset"][i])
                assert g["jpg"] == fh.read(s["size"][i]), (split, i)
            assert Image.open(io.BytesIO(g["jpg"])).format == "JPEG"


def test_interrupted_prepare_resumes(_source, _prepared, tmp_path, monkeypatch):
    """Killed after 3 shards: the next run keeps them (checksums verified), redoes a damaged one and the rest,
    and ends with the manifest and shards of an uninterrupted run."""
    out = tmp_path / "shards"
    real, written = prepare_mod._write_shard, []

    def dying(job):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(job["name"])
        return real(job)

    monkeypatch.setattr(prepare_mod, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        _prepare(_source, out)
    monkeypatch.setattr(prepare_mod, "_write_shard", real)
    assert not (out / "manifest.json").exists()
    (out / ".train-000099.tar.1.tmp").write_bytes(b"half")  # a killed worker's temporary file
    stamps = {n: (out / n).stat().st_mtime_ns for n in written}
    with open(out / written[1], "r+b") as fh:  # damaged after it was finished
        fh.seek(600)
        fh.write(b"X")
    summary = _prepare(_source, out)
    assert summary["kept"] == 2 and summary["written"] == summary["shards"] - 2
    assert (out / written[0]).stat().st_mtime_ns == stamps[written[0]]
    assert (out / written[2]).stat().st_mtime_ns == stamps[written[2]]
    assert not list(out.glob(".*.tmp")) and not (out / ".prepare").exists()
    want = read_manifest(_prepared)
    assert read_manifest(out) == want  # shards and checksums equal to those of the uninterrupted run
    # other settings on a finished folder: an error, not a silent mix
    with pytest.raises(Exception, match="other data or settings"):
        _prepare(_source, out, quality=80)


def _train_overrides(prepared, out, **extra):
    o = {"data.prepared": str(prepared), "data.num_workers": 0, "model.name": "sage-tiny",
         "model.pretrained": None, "model.backend": "torch", "model.text_batch_size": 64, "optim.epochs": 2,
         "optim.batch_size": 8, "optim.lr": 0.05, "train.output_dir": str(out), "train.ckpt_every_steps": 2,
         "train.log_every_steps": 2, "train.eval_every_epochs": 0, "train.eval_batch_size": 16,
         "train.progress": False}
    o.update(extra)
    return o


@pytest.fixture(scope="module")
def _reference(_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    report = train(build_config(overrides=_train_overrides(_prepared, out)))
    return out, report


def _same_weights(a: Path, b: Path) -> None:
    got, want = load_file(str(a / "adapters.safetensors")), load_file(str(b / "adapters.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_training_on_shards_does_not_depend_on_the_worker_count(_prepared, _reference, tmp_path):
    ref_out, ref_report = _reference
    out = tmp_path / "w2"
    report = train(build_config(overrides=_train_overrides(_prepared, out, **{"data.num_workers": 2})))
    _same_weights(out, ref_out)
    assert report["overall"] == ref_report["overall"]


class Kill(Exception):
    pass


def test_kill_and_resume_on_shards_is_bitwise_equal(_prepared, _reference, tmp_path):
    """Killed after step 3 of 6 per epoch (checkpoint at step 2): resumed mid-epoch, with 2 workers."""
    ref_out, _ = _reference
    out = tmp_path / "run"
    cfg = build_config(overrides=_train_overrides(_prepared, out, **{"data.num_workers": 2}))

    def kill(trainer, event, info):
        if event == "step" and info == 3:
            raise Kill

    with pytest.raises(Kill):
        train(cfg, callbacks=[kill])
    assert torch.load(out / "last.pt", weights_only=True)["global_step"] == 2
    train(cfg, resume=str(out / "last.pt"))
    _same_weights(out, ref_out)


def test_prepared_folder_errors(tmp_path, capsys):
    assert cli_main(["train", f"data.prepared={tmp_path / 'nowhere'}", "model.name=sage-tiny", "model.pretrained=null"]) == 2
    assert "data.prepared: folder not found" in capsys.readouterr().err
    (tmp_path / "train-000000.tar").write_bytes(b"")
    assert cli_main(["train", f"data.prepared={tmp_path}", "model.name=sage-tiny", "model.pretrained=null"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sage-fast: error: data.prepared:") and "unfinished preparation" in err
    bad_quality = ["prepare", "--out", str(tmp_path / "o"), "--quality", "0", f"data.root={tmp_path}"]
    assert cli_main(bad_quality) == 2
    assert "--quality must lie in 1..95" in capsys.readouterr().err


# ---------------------------------------------------------------- reduced-scale decoding


def _photo_jpeg(w: int, h: int, seed: int = 0) -> bytes:
    """A smooth synthetic photo (sums of sinusoids plus a little noise), JPEG q90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(6):
            fx, fy, ph = rng.uniform(1, 25), rng.uniform(1, 25), rng.uniform(0, 6)
            img[..., c] += np.sin(2 * np.pi * (fx * x + fy * y) + ph)
    img = (img - img.min()) / (img.max() - img.min()) * 255 + rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("train_", [True, False], ids=["train", "test"])
def test_fast_decode_is_a_faithful_resize_of_the_same_crop(train_, monkeypatch):
    """1600 x 1200 JPEG: decoded at 1/2..1/8 scale, the same crop and flip as the full decode, within about
    half a grey level on average (measured 0.4-0.6; the worst pixel a few levels, at crop edges)."""
    data = _photo_jpeg(1600, 1200)
    full, fast = build_transform(224, train_), build_transform(224, train_, fast_decode=True)
    assert isinstance(fast, ReducedDecode)
    scales = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        w = self.size[0]
        result = real_draft(self, mode, size)
        scales.append(w // self.size[0])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    diffs = []
    for seed in range(12):
        torch.manual_seed(seed)
        want = full(Image.open(io.BytesIO(data)).convert("RGB"))
        torch.manual_seed(seed)
        got = fast(Image.open(io.BytesIO(data)))
        diffs.append(((got - want) * std).abs().mean().item())
    assert scales and max(scales) >= 2  # libjpeg did decode at reduced scale
    assert max(diffs) < 1.5, diffs


def test_fast_decode_without_reduction_is_bitwise_the_torchvision_transform():
    """Small images, PNGs and already-decoded images take torchvision's own ops: the same tensor."""
    jpeg = _photo_jpeg(300, 200, seed=3)
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("RGB").resize((700, 500)).save(buf, "PNG")
    for blob in (jpeg, buf.getvalue()):
        for train_ in (True, False):
            full, fast = build_transform(224, train_), build_transform(224, train_, fast_decode=True)
            for seed in range(6):
                torch.manual_seed(seed)
                want = full(Image.open(io.BytesIO(blob)).convert("RGB"))
                torch.manual_seed(seed)
                assert torch.equal(fast(Image.open(io.BytesIO(blob))), want)
                torch.manual_seed(seed)
                assert torch.equal(fast(Image.open(io.BytesIO(blob)).convert("RGB")), want)


def test_fast_decode_key_reaches_the_data_sets(_prepared):
    cfg = build_config(overrides=[f"data.prepared={_prepared}", "data.fast_decode=true"])
    data = build_data(cfg.data, 32)
    assert isinstance(data.train.transform, ReducedDecode) and isinstance(data.test.transform, ReducedDecode)
    sample = data.train[(0, 123)]
    assert sample.image.shape == (3, 32, 32) and sample.seed == 123


def test_short_side_zero_keeps_original_jpegs(_source, tmp_path):
    out = tmp_path / "orig"
    _prepare(_source, out, short_side=0)
    data = build_data(build_config(overrides=[f"data.prepared={out}"]).data, 32, raw=True)
    i = next(j for j in range(len(data.train)) if data.train.describe(j).startswith(str(_source / "train/big1.jpg")))
    assert data.train.read_bytes(i) == (_source / "train/big1.jpg").read_bytes()  # copied, not re-encoded
    j = next(j for j in range(len(data.train)) if ".png" in data.train.describe(j))
    assert Image.open(io.BytesIO(data.train.read_bytes(j))).size == (48, 48)  # re-encoded as JPEG, same size
