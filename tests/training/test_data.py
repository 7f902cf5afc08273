"""Data sets, split-file readers, CIFAR-100-LT, transforms, samplers, unreadable images, GPU-decode path (on CPU)."""
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers.images import (
    write_cifar100_archive,
    write_class_names,
    write_image,
    write_images,
    write_inat_json,
    write_split_file,
)
from PIL import Image

from sage_fast.training.config import build_config
from sage_fast.training.data import (
    GpuBatchTransform,
    ImageListDataset,
    ShardSampler,
    TrainSampler,
    build_data,
    build_loader,
    build_transform,
    cifar100_lt_indices,
    cifar_lt_counts,
    collate_skip,
    dataset_names,
    measure_input_pipeline,
    read_class_names,
    read_inat_json,
    read_split_file,
    register_dataset,
    sample_seed,
)


def _data_cfg(**kw):
    return build_config(overrides=[f"data.{k}={v}" for k, v in kw.items()]).data


# ---------------------------------------------------------------- CIFAR-100-LT


def test_cifar_lt_counts_match_paper():
    for ratio, total, tail in ((100, 10847, 5), (50, 12608, 10), (10, 19573, 50)):
        counts = cifar_lt_counts(ratio)
        assert len(counts) == 100 and sum(counts) == total
        assert counts[0] == 500 and counts[-1] == tail
        assert all(a >= b for a, b in zip(counts, counts[1:]))
    c = np.array(cifar_lt_counts(100))
    assert ((c > 100).sum(), ((c >= 20) & (c <= 100)).sum(), (c < 20).sum()) == (35, 35, 30)


@pytest.fixture(scope="module")
def _cifar_archive(tmp_path_factory):
    return write_cifar100_archive(tmp_path_factory.mktemp("cifar"))


@pytest.fixture()
def cifar_root(_cifar_archive):
    """The fake CIFAR-100 archive (`helpers.images.write_cifar100_archive`), shared by the module's tests.

    It is written once (180 MB: too big to copy per test), so a test must only read it; a test that
    changed it would fail here instead of leaving the next test a different archive.
    """
    before = _fingerprint(_cifar_archive)
    yield _cifar_archive
    assert _fingerprint(_cifar_archive) == before, "this test changed the shared CIFAR archive: copy it first"


def _fingerprint(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("preset, ratio, total", [("cifar100_lt_r100", 100, 10847), ("cifar100_lt_r50", 50, 12608),
                                                   ("cifar100_lt_r10", 10, 19573)])
def test_cifar100_lt_from_archive(cifar_root, preset, ratio, total):
    """The preset's imbalance ratio reaches the data: the paper's training-set sizes."""
    data = build_data(build_config(preset=preset, overrides={"data.root": str(cifar_root)}).data, 32)
    assert len(data.train) == total and sum(data.class_counts) == total
    assert data.class_counts == cifar_lt_counts(ratio)
    assert data.class_counts[0] == 500 and data.class_counts[99] == {100: 5, 50: 10, 10: 50}[ratio]
    assert data.group_counts == cifar_lt_counts(100)  # groups always from ratio 100 (docs/method.md, "Choices the paper leaves open")
    assert data.class_names[:2] == ["name_0", "name_1"] and data.num_classes == 100
    assert len(data.test) == 10000
    # images stay with their labels after subsampling, in the documented HWC layout
    imgs, targets = data.train.images, np.array(data.train.targets)
    assert (imgs[:, 0, 0, 0] == targets).all() and (imgs[:, 0, 0, 2] == 7).all()
    sample = data.train[(0, 123)]
    assert sample.image.shape == (3, 32, 32) and sample.label == targets[0]


def test_cifar100_lt_is_deterministic_and_seeded(cifar_root):
    from sage_fast.training.data import load_cifar100

    _, labels, _ = load_cifar100(cifar_root / "cifar-100-python", "train")
    a, b = cifar100_lt_indices(labels, 100, seed=0), cifar100_lt_indices(labels, 100, seed=0)
    c = cifar100_lt_indices(labels, 100, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(set(a.tolist())) == len(a) == 10847


def test_cifar_reader_refuses_foreign_pickles(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    with open(d / "train", "wb") as f:
        pickle.dump({b"data": os.getcwd}, f, protocol=2)  # a callable global: must not be resolved
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}, protocol=2))
    from sage_fast.training.data import load_cifar100

    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_cifar100(tmp_path, "train")


# ---------------------------------------------------------------- split files and metadata


def test_read_split_file(tmp_path):
    f = tmp_path / "ImageNet_LT_train.txt"
    f.write_text("train/n01440764/n01440764_190.JPEG 0\n\ntrain/n01443537/a b.JPEG 1\n")
    assert read_split_file(f) == [("train/n01440764/n01440764_190.JPEG", 0), ("train/n01443537/a b.JPEG", 1)]
    f.write_text("train/x.JPEG 0\ntrain/y.JPEG\n")
    with pytest.raises(ValueError, match=r"ImageNet_LT_train.txt:2"):
        read_split_file(f)
    with pytest.raises(FileNotFoundError):
        read_split_file(tmp_path / "nope.txt")


def test_imagenet_lt_split_files_and_synset_names(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    train = [(f"train/{w}/{w}_{i}.JPEG", k) for k, w in enumerate(wnids) for i in range(3 - k)]
    test = [(f"val/ILSVRC2012_val_{k:08d}.JPEG", k) for k in range(len(wnids))]
    write_images(tmp_path, train + test, fmt="JPEG")
    write_split_file(tmp_path / "ImageNet_LT_train.txt", train)
    write_split_file(tmp_path / "ImageNet_LT_test.txt", test)
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n")
    data = build_data(_data_cfg(dataset="imagenet_lt", root=tmp_path), 32)
    assert data.class_names == ["tench", "goldfish", "great white shark"]
    assert data.class_counts == [3, 2, 1] and len(data.test) == 3
    x = data.test[1]
    assert x.image.shape == (3, 32, 32) and x.label == 1


def test_places_lt_category_names(tmp_path):
    categories = ["a/airfield", "a/apartment_building/outdoor"]
    samples = [(f"data_256/{cat}/00000001.jpg", k) for k, cat in enumerate(categories)]
    tests = [(f"data_256/{cat}/00000002.jpg", k) for k, cat in enumerate(categories)]
    write_images(tmp_path, samples + tests, fmt="JPEG")
    write_split_file(tmp_path / "Places_LT_train.txt", samples)
    write_split_file(tmp_path / "Places_LT_test.txt", tests)
    data = build_data(_data_cfg(dataset="places_lt", root=tmp_path), 32)
    assert data.class_names == ["airfield", "apartment_building outdoor"]  # from the paths (letter dropped)
    (tmp_path / "categories_places365.txt").write_text("/a/airfield 0\n/a/apartment_building/outdoor 1\n")
    data = build_data(_data_cfg(dataset="places_lt", root=tmp_path), 32)
    assert data.class_names == ["airfield", "apartment_building outdoor"]


def test_inat2018_official_json_and_lift_lists(tmp_path):
    cats = [(3, "Aa bb"), (7, "Cc dd")]  # sparse ids map to 0..C-1 in id order
    train = [(f"train_val2018/Plantae/{c}/{i}.jpg", c) for c, n in ((3, 3), (7, 1)) for i in range(n)]
    val = [(f"train_val2018/Plantae/{c}/v.jpg", c) for c, _ in cats]
    write_images(tmp_path, train + val, fmt="JPEG")
    write_inat_json(tmp_path / "train2018.json", train, cats)
    write_inat_json(tmp_path / "val2018.json", val, cats)
    samples, names = read_inat_json(tmp_path / "train2018.json")
    assert samples[0] == (train[0][0], 3) and names == {3: "Aa bb", 7: "Cc dd"}
    data = build_data(_data_cfg(dataset="inat2018", root=tmp_path), 32)
    assert data.class_names == ["Aa bb", "Cc dd"] and data.class_counts == [3, 1]
    assert [data.test[i].label for i in range(2)] == [0, 1]
    # LIFT-style lists (labels are the category ids) with categories.json beside them
    for f in ("train2018.json", "val2018.json"):
        (tmp_path / f).unlink()
    write_split_file(tmp_path / "iNaturalist18_train.txt", train)
    write_split_file(tmp_path / "iNaturalist18_val.txt", val)
    (tmp_path / "categories.json").write_text(json.dumps([{"id": c, "name": n} for c, n in cats]))
    data = build_data(_data_cfg(dataset="inat2018", root=tmp_path), 32)
    assert data.class_names == ["Aa bb", "Cc dd"] and data.class_counts == [3, 1]


def test_inat2018_prefers_categories_json_over_obfuscated_names(tmp_path):
    """The 2018 train2018.json may name its categories by number; categories.json holds the species."""
    cats = [(3, "3"), (7, "7")]
    train = [(f"train_val2018/Plantae/{c}/{i}.jpg", c) for c, n in ((3, 2), (7, 1)) for i in range(n)]
    val = [(f"train_val2018/Plantae/{c}/v.jpg", c) for c, _ in cats]
    write_images(tmp_path, train + val, fmt="JPEG")
    write_inat_json(tmp_path / "train2018.json", train, cats)
    write_inat_json(tmp_path / "val2018.json", val, cats)
    with pytest.warns(UserWarning, match="most class names are just numbers"):
        data = build_data(_data_cfg(dataset="inat2018", root=tmp_path), 32)
    assert data.class_names == ["3", "7"]
    (tmp_path / "categories.json").write_text(json.dumps([{"id": 3, "name": "Aa bb"}, {"id": 7, "name": "Cc dd"}]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = build_data(_data_cfg(dataset="inat2018", root=tmp_path), 32)
    assert data.class_names == ["Aa bb", "Cc dd"] and data.class_counts == [2, 1]


def test_folder_with_class_names_file_and_missing_class(tmp_path):
    samples = [(f"img/{k}.png", k) for k in range(3)]
    write_images(tmp_path, samples + [("img/test.png", 0)])
    write_split_file(tmp_path / "train.txt", samples)
    write_split_file(tmp_path / "test.txt", [("img/test.png", 0)])
    write_class_names(tmp_path / "names.txt", ["cat", "dog", "n01440764 tench, Tinca tinca"])
    assert read_class_names(tmp_path / "names.txt") == ["cat", "dog", "tench"]
    data = build_data(_data_cfg(dataset="folder", root=tmp_path, class_names="names.txt"), 32)
    assert data.class_names == ["cat", "dog", "tench"] and data.class_counts == [1, 1, 1]
    write_split_file(tmp_path / "train.txt", [samples[0], samples[2]])
    with pytest.raises(ValueError, match="no training image"):
        build_data(_data_cfg(dataset="folder", root=tmp_path, class_names="names.txt"), 32)
    with pytest.raises(ValueError, match="data.root is empty"):
        build_data(_data_cfg(dataset="folder"), 32)


def test_a_registered_data_set_is_valid_in_the_config_and_built_by_build_data(tmp_path, monkeypatch):
    from sage_fast.training.config import ConfigError
    from sage_fast.training.data import registry

    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # registrations end with the test
    with pytest.raises(ConfigError, match="data.dataset: expected one of 'cifar100_lt' .* got 'toy'"):
        _data_cfg(dataset="toy")
    seen = []

    @register_dataset("toy")
    def build_toy(ctx):
        seen.append(ctx)
        return "built"

    assert dataset_names()[-1] == "toy"
    write_class_names(tmp_path / "names.txt", ["a", "b"])
    assert build_data(_data_cfg(dataset="toy", root=tmp_path, class_names="names.txt"), 32) == "built"
    (ctx,) = seen
    assert (ctx.name, ctx.root, ctx.user_names, ctx.raw) == ("toy", tmp_path, ["a", "b"], False)
    assert ctx.train_transform is not None and ctx.path("", "x.txt") == tmp_path / "x.txt"
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy")(build_toy)


# ---------------------------------------------------------------- transforms, samplers, unreadable images


@pytest.fixture()
def folder(tmp_path):
    samples = [(f"c{i % 3}/{i}.png", i % 3) for i in range(12)]
    write_images(tmp_path, samples, size=40)
    return tmp_path, samples


def test_augmentation_is_a_function_of_the_seed(folder):
    root, samples = folder
    ds = ImageListDataset(root, samples, ["a", "b", "c"], build_transform(32, train=True))
    before = torch.get_rng_state()
    a, b, c = ds[(4, 11)], ds[(4, 11)], ds[(4, 12)]
    assert torch.equal(torch.get_rng_state(), before)  # the main process's RNG is left alone
    assert a.image.shape == (3, 32, 32) and torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    test = ImageListDataset(root, samples, ["a", "b", "c"], build_transform(32, train=False))
    assert torch.equal(test[3].image, test[3].image)
    # augment="flip": the test transform, mirrored or not
    flip = ImageListDataset(root, samples, ["a", "b", "c"], build_transform(32, train=True, augment="flip"))
    outs = [flip[(3, s)].image for s in range(8)]
    assert all(torch.equal(o, test[3].image) or torch.equal(o, test[3].image.flip(-1)) for o in outs)
    assert any(torch.equal(o, test[3].image) for o in outs) and any(not torch.equal(o, test[3].image) for o in outs)
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1) and sample_seed(0, 1, 2) == sample_seed(0, 1, 2)


def test_train_sampler_shards_equal_the_global_batches():
    ds = list(range(50))
    single = TrainSampler(ds, batch_size=8, num_replicas=1, rank=0, seed=3)
    shards = [TrainSampler(ds, batch_size=4, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for s in [single] + shards:
        s.set_epoch(1)
    g = list(single)
    parts = [list(s) for s in shards]
    assert single.batches_per_epoch() == shards[0].batches_per_epoch() == 6
    for t in range(6):
        glob = sorted(g[8 * t:8 * t + 8])
        assert sorted(parts[0][4 * t:4 * t + 4] + parts[1][4 * t:4 * t + 4]) == glob
    # resume: starting at batch 2 yields the tail of the same sequence; seeds follow (seed, epoch, index)
    single.set_epoch(1, start_batch=2)
    assert list(single) == g[16:] and len(single) == 50 - 16
    assert all(s == sample_seed(3, 1, i) for i, s in g)
    single.set_epoch(2)
    assert [i for i, _ in single] != [i for i, _ in g]
    idx = ShardSampler(10, 3, 1).indices + ShardSampler(10, 3, 0).indices + ShardSampler(10, 3, 2).indices
    assert sorted(idx) == list(range(10))


def test_unreadable_images_are_skipped_and_counted(folder):
    root, samples = folder
    (root / "c0/0.png").write_bytes(b"not an image")
    data = (root / "c1/1.png").read_bytes()
    (root / "c1/1.png").write_bytes(data[: len(data) // 2])  # truncated
    samples = samples + [("c2/missing.png", 2)]
    ds = ImageListDataset(root, samples, ["a", "b", "c"], build_transform(32, train=True))
    assert ds[0] == (0, "not an image file PIL can read") and ds[12] == (12, "file not found")
    assert "truncated" in ds[1].reason  # the header reads, the decode fails
    # 3 of 13 unreadable: within a limit of 25% (the loader counts them; see test_user_errors for stopping)
    cfg = _data_cfg(num_workers=2, persistent_workers=True, prefetch_factor=2, max_unreadable=0.25)
    sampler = TrainSampler(ds, batch_size=4, seed=0)
    loader = build_loader(ds, 4, sampler, cfg, pin_memory=False, train=True)
    sampler.set_epoch(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    assert len(batches) == 3  # 13 samples, drop_last
    seen = sum(len(b.labels) for b in batches) + sum(b.skipped for b in batches)
    assert seen == 12
    bad = {0, 1, 12}
    skipped_seen = {i for i, _ in list(sampler)[:12]} & bad
    assert sum(b.skipped for b in batches) == len(skipped_seen)
    assert {i for b in batches for i, _ in b.unreadable} == skipped_seen
    assert sorted(ds.unreadable.found) == sorted(skipped_seen)
    named = [str(w.message) for w in caught if "skipping unreadable training image" in str(w.message)]
    assert len(named) == len(skipped_seen) and all(str(root) in m for m in named)
    for b in batches:
        assert b.images.shape == (len(b.labels), 3, 32, 32) and not (set(b.indices.tolist()) & bad)
    empty = collate_skip([None, None])
    assert empty.images is None and empty.skipped == 2 and len(empty.labels) == 0


def test_measure_input_pipeline(folder):
    root, samples = folder
    ds = ImageListDataset(root, samples, ["a", "b", "c"], build_transform(32, train=True))
    sampler = TrainSampler(ds, batch_size=2, seed=0)
    loader = build_loader(ds, 2, sampler, _data_cfg(num_workers=0), pin_memory=False, train=True)
    r = measure_input_pipeline(loader, num_batches=4, warmup=1)
    assert r["batches"] == 4 and r["images"] == 8 and r["images_per_s"] > 0


def test_gpu_decode_path_on_cpu(folder):
    root, samples = folder
    write_image(root / "c0/j.jpg", 5, size=48, fmt="JPEG")
    samples = samples[:3] + [("c0/j.jpg", 0)]
    ds = ImageListDataset(root, samples, ["a", "b", "c"], raw=True)
    raw = [ds[(i, 9)] for i in range(4)]
    assert raw[0].image.dtype == torch.uint8 and raw[0].image.ndim == 1
    batch = collate_skip(raw)
    assert isinstance(batch.images, list)
    tf = GpuBatchTransform(32, train=True, device="cpu")
    x, keep = tf(batch.images, batch.seeds)
    assert x.shape == (4, 3, 32, 32) and keep.all() and torch.isfinite(x).all()
    x2, _ = tf(batch.images, batch.seeds)
    assert torch.equal(x, x2)  # augmentation from the per-sample seeds
    # test-time transform equals the PIL path up to resampling differences
    pil = build_transform(32, train=False)(Image.open(root / samples[3][0]).convert("RGB"))
    xt, _ = GpuBatchTransform(32, train=False, device="cpu")([batch.images[3]], torch.tensor([-1]))
    assert (xt[0] - pil).abs().mean() < 0.1
    flip_tf = GpuBatchTransform(32, train=True, device="cpu", augment="flip")
    outs = [flip_tf([batch.images[3]], torch.tensor([s]))[0][0] for s in range(6)]
    assert all(torch.equal(o, xt[0]) or torch.equal(o, xt[0].flip(-1)) for o in outs)
    with pytest.warns(UserWarning, match="undecodable"):
        x3, keep3 = tf([batch.images[0], torch.frombuffer(bytearray(b"\xff\xd8garbage"), dtype=torch.uint8)],
                       batch.seeds[:2])
    assert x3.shape[0] == 1 and keep3.tolist() == [True, False]
