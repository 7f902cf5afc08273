"""User mistakes end in one line ``sage-fast: error: ...`` and exit status 2, not a traceback; unreadable images
stop a run before training (or during it, past ``data.max_unreadable``), naming the files; label errors name
the split file and line.

Through the CLI: in-process `main([...])` with capsys for most cases (seconds each), a subprocess where the
black box matters (stderr holds exactly one line; --traceback). The data: 3 classes of 12 / 6 / 4 training and
2 test images each (32 px PNG), the tiny open_clip config with random weights, CPU, no loader workers.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers.images import (
    fifo_watchdog,
    make_image_folder,
    write_class_names,
    write_images,
    write_inat_json,
    write_split_file,
)
from safetensors import safe_open

from sage_fast.cli import main
from sage_fast.training.config import ConfigError, build_config
from sage_fast.training.data import GpuBatchTransform, ImageListDataset, TrainSampler, build_data, build_loader
from sage_fast.training.data.unreadable import UnreadableImagesError
from sage_fast.training.errors import UserError, user_error_message

COUNTS = (12, 6, 4)


@pytest.fixture(scope="module")
def _tiny(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ue_data"), COUNTS, test=2)


@pytest.fixture()
def data(_tiny, tmp_path):
    """This test's copy of the tiny image folder."""
    return Path(shutil.copytree(_tiny, tmp_path / "data"))


def args(root, out, *extra):
    return ["train", "data.dataset=folder", f"data.root={root}", "data.class_names=classnames.txt",
            "data.num_workers=0", "model.name=sage-tiny", "model.pretrained=null", "model.backend=torch",
            "model.text_batch_size=64", "optim.epochs=1", "optim.batch_size=4", f"train.output_dir={out}",
            "train.progress=false", "train.tensorboard=false", "train.ckpt_every_steps=0", *extra]


def run_cli(argv, capsys):
    """main(argv) in this process -> (exit status, stderr); warnings are recorded, not printed."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rc = main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc, err, *needles):
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("sage-fast: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def truncate(path):
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[: len(raw) // 2])  # the header still parses; the decode fails


# ---------------------------------------------------------------- unreadable images


def test_all_images_missing_fails_before_training_naming_examples(data, tmp_path):
    """Black box: a wrong root; one line on stderr, exit 2, nothing written; --traceback shows where."""
    for d in ("train", "test"):
        shutil.rmtree(data / d)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sage_fast", *args(data, out)]
    env = {k: v for k, v in os.environ.items() if k != "SAGE_FAST_TRACEBACK"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    line = assert_one_line_error(r.returncode, r.stderr, "none of the 22 training images",
                                 str(data / "train.txt"), str(data / "train/c0/0.png"), "file not found",
                                 f"Is data.root={data} the folder")
    assert "and 17 more" in line
    assert not out.exists()
    r = subprocess.run(cmd + ["--traceback"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr
    assert "UnreadableImagesError" in r.stderr and r.stderr.strip().splitlines()[-1] == line


def test_all_missing_with_the_check_off_still_fails_before_training(data, tmp_path, capsys):
    shutil.rmtree(data / "train")
    rc, err = run_cli(args(data, tmp_path / "run", "data.check_images=false"), capsys)
    assert_one_line_error(rc, err, "none of the 22 training images", "file not found")
    assert not (tmp_path / "run").exists()


def test_a_few_unreadable_images_under_the_limit_are_left_out_of_the_counts(data, tmp_path, capsys):
    (data / "train/c0/0.png").unlink()
    (data / "train/c1/0.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"2 of the 22 training images cannot be read and are left out") as rec:
        assert main(args(data, out, "data.max_unreadable=0.1")) == 0
    named = " ".join(str(w.message) for w in rec)
    assert str(data / "train/c0/0.png") in named and str(data / "train/c1/0.png") in named
    with safe_open(str(out / "adapters.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["class_counts"]) == [11, 5, 4]  # the readable ones only


def test_unreadable_images_over_the_limit_stop_before_training(data, tmp_path, capsys):
    (data / "train/c0/0.png").unlink()
    (data / "train/c2/1.png").write_bytes(b"")
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, "2 of the 22 training images", "(9.1%)", "data.max_unreadable=0.01 allows (0)",
                          f"{data / 'train/c0/0.png'} (file not found)", str(data / "train/c2/1.png"))
    assert not (tmp_path / "run").exists()
    (data / "train/c0/0.png").write_bytes(b"")
    shutil.copy(data / "train/c0/1.png", data / "train/c2/1.png")
    shutil.rmtree(data / "test/c1")  # the test split has its own count: 2 of 6
    rc, err = run_cli(args(data, tmp_path / "run", "data.max_unreadable=0.1"), capsys)
    assert_one_line_error(rc, err, "2 of the 6 test images", str(data / "test.txt"))


@pytest.mark.parametrize("damage", ["truncated", "garbage_unchecked"])
def test_decode_failures_while_training_count_towards_the_limit(data, tmp_path, capsys, damage):
    """A truncated PNG passes the header check and fails to decode while training; with the check off,
    any unreadable file is only found then. Past the limit the run stops, naming the file."""
    bad = data / "train/c0/3.png"
    if damage == "truncated":
        truncate(bad)
        extra = ()
    else:
        bad.write_bytes(b"garbage")
        extra = ("data.check_images=false",)
    rc, err = run_cli(args(data, tmp_path / "run", *extra), capsys)
    assert_one_line_error(rc, err, "1 of the 22 training images", str(data / "train.txt"), str(bad))
    assert not (tmp_path / "run/adapters.safetensors").exists()


def test_gpu_decode_failures_are_counted_with_their_file(tmp_path):
    """data.gpu_decode: the transform, not the loader, finds the damaged file; the limit names it."""
    samples = [(f"c{i % 2}/{i}.png", i % 2) for i in range(8)]
    write_images(tmp_path, samples)
    (tmp_path / "c1/5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # bytes read, decode fails
    cfg = build_config(overrides=["data.num_workers=0"]).data
    ds = ImageListDataset(tmp_path, samples, ["a", "b"], raw=True)
    sampler = TrainSampler(ds, batch_size=8, seed=0)
    loader = build_loader(ds, 8, sampler, cfg, pin_memory=False, train=True)
    tf = GpuBatchTransform(32, True, "cpu", unreadable=ds.unreadable)
    (batch,) = list(loader)
    with pytest.raises(UnreadableImagesError, match=r"1 of the 8 training images .*/c1/5\.png \(cannot decode"):
        tf(batch.images, batch.seeds)


def test_max_unreadable_is_validated():
    with pytest.raises(ConfigError, match=r"data.max_unreadable is a fraction in \[0, 1\)"):
        build_config(overrides=["data.max_unreadable=1.5"])


# ---------------------------------------------------------------- user mistakes: one line, exit 2


def _no_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")


MISTAKES = {
    "missing_root": (lambda d, t: [f"data.root={t / 'nowhere'}"], ["data.root does not exist", "nowhere"]),
    "empty_root": (lambda d, t: ["data.root="], ["data.root is empty"]),
    "missing_split": (lambda d, t: ["data.train_split=typo.txt"],
                      ["split file not found", "typo.txt", "data.train_split=typo.txt"]),
    "unknown_model": (lambda d, t: ["model.name=ViT-B-16-quickgel"],
                      ["unknown open_clip model 'ViT-B-16-quickgel'", "did you mean 'ViT-B-16-quickgelu'"]),
    "missing_pretrained": (lambda d, t: [f"model.pretrained={t / 'clip.pt'}"],
                           ["model.pretrained: checkpoint file not found", "clip.pt"]),
    "unknown_pretrained_tag": (lambda d, t: ["model.pretrained=openai"],
                               ["model.pretrained='openai' is neither a checkpoint file nor a pretrained tag"]),
    "cuda_without_cuda": (lambda d, t: _no_cuda() or ["train.device=cuda"],
                          ["train.device=cuda but CUDA is not available", "train.device=cpu"]),
    "batch_larger_than_data": (lambda d, t: ["optim.batch_size=64"],
                               ["optim.batch_size=64 is larger than the training set", "22 readable"]),
    "output_dir_under_a_file": (lambda d, t: [f"train.output_dir={d / 'train.txt' / 'run'}"],
                                ["cannot be created", "train.txt is a file"]),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_user_mistakes_end_in_one_line_and_exit_2(mistake, data, tmp_path, capsys):
    extra, needles = MISTAKES[mistake]
    rc, err = run_cli(args(data, tmp_path / "run") + extra(data, tmp_path), capsys)
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()


def test_unwritable_output_folder_is_found_before_anything_is_built(data, tmp_path, capsys, monkeypatch):
    """Found before the data and the model are built (the check is a real temporary file, so being root, as
    in some CI containers, is simulated by a refusing file system)."""
    import tempfile

    from sage_fast.training import trainer as loop

    out = tmp_path / "ro" / "run"
    out.parent.mkdir()
    built = []
    monkeypatch.setattr(loop, "build_data", lambda *a, **k: built.append(a))
    if os.geteuid() == 0:
        def refuse(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    else:
        out.parent.chmod(0o500)
    try:
        rc, err = run_cli(args(data, out), capsys)
    finally:
        out.parent.chmod(0o700)
    assert_one_line_error(rc, err, f"train.output_dir={out} cannot be created", "is not writable",
                          "Permission denied")
    assert not built


def test_traceback_on_request(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAGE_FAST_TRACEBACK", "1")
    rc, err = run_cli(args(data, tmp_path / "run", "data.root="), capsys)
    assert rc == 2 and "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().splitlines()[-1].startswith("sage-fast: error: data.root is empty")
    monkeypatch.delenv("SAGE_FAST_TRACEBACK")
    rc, err = run_cli(["--traceback"] + args(data, tmp_path / "run", "data.root="), capsys)
    assert rc == 2 and "Traceback (most recent call last)" in err


def test_corrupt_checkpoint_for_resume_and_eval(data, tmp_path, capsys):
    good = tmp_path / "good"
    assert main(args(data, good)) == 0
    capsys.readouterr()
    raw = (good / "last.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    for bad in (truncated, garbage):
        rc, err = run_cli(args(data, tmp_path / "run", "--resume", str(bad)), capsys)
        # the resume path tries previous.pt too before it gives up, naming what it tried
        line = assert_one_line_error(rc, err, "no checkpoint to resume from verifies", f"{bad}: unreadable checkpoint")
        assert "weights_only" not in line
        rc, err = run_cli(["eval", "--weights", str(bad)], capsys)
        assert_one_line_error(rc, err, f"{bad}: unreadable weights")
    pickled = tmp_path / "pickled.pt"
    torch.save({"trainable": {}, "extra": Path("x")}, pickled)  # an object weights_only loading refuses
    rc, err = run_cli(["eval", "--weights", str(pickled)], capsys)
    line = assert_one_line_error(rc, err, f"{pickled}: unreadable weights", "Python objects other than tensors")
    assert "weights_only" not in line and "trust" not in line
    st = tmp_path / "adapters.safetensors"
    st.write_bytes((good / "adapters.safetensors").read_bytes()[:100])
    rc, err = run_cli(["eval", "--weights", str(st)], capsys)
    assert_one_line_error(rc, err, f"{st}: unreadable weights", "not a valid safetensors file")


@pytest.mark.parametrize("failure", ["ENOSPC", "inline_container"])
def test_full_disk_while_saving(data, tmp_path, capsys, monkeypatch, failure):
    """torch.save into an open file raises OSError(ENOSPC); into a path, torch's C++ writer fails with
    "enforce fail at inline_container.cc" and no errno."""
    def full(obj, f, *a, **k):
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    rc, err = run_cli(args(data, out), capsys)
    needle = "no space left on device" if failure == "ENOSPC" else "the disk is most likely full"
    assert_one_line_error(rc, err, needle, f"while writing in {out}", "train.output_dir")


def test_bugs_keep_their_traceback(data, tmp_path, monkeypatch):
    """ValueError / RuntimeError from our code are bugs unless marked: not turned into one line."""
    from sage_fast.training import trainer as loop

    def bug(*a, **k):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(loop, "build_data", bug)
    with pytest.raises(ValueError, match="an internal inconsistency"):
        main(args(data, tmp_path / "run"))
    monkeypatch.setattr(loop, "build_data", lambda *a, **k: [][1])
    with pytest.raises(IndexError):
        main(args(data, tmp_path / "run"))


def test_any_class_marked_user_error_is_one(data, tmp_path, capsys, monkeypatch):
    """Other modules mark their exceptions with ``user_error = True`` instead of importing `UserError`."""
    from sage_fast.training import trainer as loop

    class RunFolderError(ValueError):
        user_error = True

    def refuse(*a, **k):
        raise RunFolderError("runs/x holds a run: --resume, or another train.output_dir")

    monkeypatch.setattr(loop, "build_data", refuse)
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, "runs/x holds a run")
    assert user_error_message(UserError("a\nb")) == "a b"


# ---------------------------------------------------------------- label errors name the file and line


def _folder_cfg(root, **kw):
    over = {"data.dataset": "folder", "data.root": str(root), **{f"data.{k}": v for k, v in kw.items()}}
    return build_config(overrides=over).data


def test_label_errors_name_the_split_file_and_line(data, tmp_path, capsys):
    with open(data / "train.txt", "a") as f:
        f.write("\ntrain/c0/0.png 9\n")  # line 24 (after a blank one): 3 class names
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, f"{data / 'train.txt'}:24: label 9 is not a class index",
                          "data.class_names (classnames.txt) lists 3 classes (labels 0..2)")
    with pytest.raises(UserError, match=r"6 of the 10 classes have no training image .* the largest label \+ 1: 10, "
                                        r"from .*train\.txt:24\)"):
        build_data(_folder_cfg(data), 32)  # without names: 10 classes, 6 of them without an image
    lines = (data / "train.txt").read_text().splitlines()
    (data / "train.txt").write_text("\n".join(lines[:-1]) + "\n")
    with open(data / "test.txt", "a") as f:
        f.write("test/c0/0.png -1\n")
    with pytest.raises(UserError, match=r"test\.txt:7: label -1 is negative"):
        build_data(_folder_cfg(data, class_names="classnames.txt"), 32)
    (data / "test.txt").write_text((data / "test.txt").read_text().replace(" -1\n", " two\n"))
    with pytest.raises(UserError, match=r"test\.txt:7: expected 'relative/path label'"):
        build_data(_folder_cfg(data), 32)


def test_a_class_without_training_images_is_named(data):
    write_class_names(data / "classnames.txt", ["red", "green", "blue", "grey"])
    with pytest.raises(UserError, match=r"1 of the 4 classes have no training image in .*train\.txt: "
                                        r"class 3 \('grey'\) is in neither split"):
        build_data(_folder_cfg(data, class_names="classnames.txt"), 32)


def test_inaturalist_label_errors_name_the_annotation(tmp_path):
    cats = [(3, "Aa bb"), (7, "Cc dd")]
    train = [(f"train_val2018/{c}/{i}.jpg", c) for c, n in ((3, 2), (7, 1)) for i in range(n)]
    val = [(f"train_val2018/{c}/v.jpg", c) for c, _ in cats]
    write_images(tmp_path, train + val, fmt="JPEG")
    write_inat_json(tmp_path / "train2018.json", train, cats)
    write_inat_json(tmp_path / "val2018.json", val, cats)
    write_class_names(tmp_path / "names.txt", ["only one"])
    cfg = build_config(overrides={"data.dataset": "inat2018", "data.root": str(tmp_path),
                                  "data.class_names": "names.txt"}).data
    # annotations have ids 0.. and images 100..: the third training annotation is category 7, class 1
    with pytest.raises(UserError, match=r"train2018\.json, annotation 2 \(image_id 102\): category_id 7 \(class 1"
                                        r".*data.class_names \(names.txt\) lists 1 classes"):
        build_data(cfg, 32)
    d = json.loads((tmp_path / "val2018.json").read_text())
    d["annotations"][1]["image_id"] = 999
    (tmp_path / "val2018.json").write_text(json.dumps(d))
    cfg.class_names = ""
    with pytest.raises(UserError, match=r"val2018\.json, annotation 1: image_id 999 is not among the file's images"):
        build_data(cfg, 32)
    write_split_file(tmp_path / "lift_val.txt", [(val[0][0], 3), (val[1][0], -7)])
    cfg.test_split = "lift_val.txt"
    with pytest.raises(UserError, match=r"lift_val\.txt:2: category_id -7 is negative"):
        build_data(cfg, 32)


# ---------------------------------------------------------------- text files: UTF-8, a bad byte named


def test_latin1_class_names_file_is_one_line_naming_file_line_and_byte(data, tmp_path, capsys):
    """A Latin-1 classnames.txt ended in a UnicodeDecodeError traceback."""
    (data / "classnames.txt").write_bytes("colour_0\ncaf\u00e9 au lait\ncolour_2\n".encode("latin-1"))
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, f"{data / 'classnames.txt'}:2: byte 0xe9 (file offset 12, byte 4 of the line) is "
                                   "not valid UTF-8", "class-names file must be UTF-8")
    assert not (tmp_path / "run").exists()


def test_split_file_and_inaturalist_json_with_a_bad_byte_are_named(data, tmp_path, capsys):
    lines = (data / "train.txt").read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b"train/", b"tr\xe4in/")
    (data / "train.txt").write_bytes(b"\n".join(lines))
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, f"{data / 'train.txt'}:5: byte 0xe4", "split file must be UTF-8")
    write_inat_json(tmp_path / "train2018.json", [("a.jpg", 0)], [(0, "Aa bb")])
    write_inat_json(tmp_path / "val2018.json", [("b.jpg", 0)], [(0, "Aa bb")])
    raw = (tmp_path / "train2018.json").read_bytes().replace(b"Aa bb", b"A\xe0 bb")
    (tmp_path / "train2018.json").write_bytes(raw)
    cfg = build_config(overrides={"data.dataset": "inat2018", "data.root": str(tmp_path)}).data
    with pytest.raises(UserError, match=r"train2018\.json:1: byte 0xe0 .* is not valid UTF-8"):
        build_data(cfg, 32)


def test_a_config_file_is_utf8_with_a_bad_byte_named(data, tmp_path, capsys):
    """A YAML config was read in the locale's encoding (`tests/test_encoding.py` keeps every read UTF-8): a
    Latin-1 one ended in a UnicodeDecodeError traceback."""
    good = tmp_path / "good.yaml"
    good.write_bytes("\ufeff# caf\u00e9\nmodel:\n  alpha: 0.25 # \u00e9t\u00e9\n".encode("utf-8"))
    assert build_config(good).model.alpha == 0.25
    bad = tmp_path / "bad.yaml"
    bad.write_bytes("model:\n  alpha: 0.25 # caf\u00e9\n".encode("latin-1"))
    rc, err = run_cli(["train", "--config", str(bad), *args(data, tmp_path / "run")[1:]], capsys)
    assert_one_line_error(rc, err, f"{bad}:2: byte 0xe9 (file offset 26, byte 20 of the line) is not valid UTF-8",
                          "config file must be UTF-8")
    assert not (tmp_path / "run").exists()


def test_utf8_names_with_a_byte_order_mark_and_crlf_are_read(data):
    names = ["caf\u00e9", "na\u00efve cr\u00e8me", "\u00e9t\u00e9"]
    (data / "classnames.txt").write_bytes(("\ufeff" + "\r\n".join(names) + "\r\n").encode("utf-8"))
    built = build_data(_folder_cfg(data, class_names="classnames.txt", check_images=False), 32)
    assert built.class_names == names


# ---------------------------------------------------------------- repeated files and names


def test_a_doubled_split_file_is_refused_naming_both_lines(data, tmp_path, capsys):
    """It trained on the doubled list silently (every class count doubled, the same images twice an epoch)."""
    text = (data / "train.txt").read_text()
    (data / "train.txt").write_text(text + text)  # 22 lines, twice
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, f"{data / 'train.txt'}:23: 'train/c0/0.png' is listed again, first at "
                                   f"{data / 'train.txt'}:1; 22 lines of the training split repeat an earlier one",
                          "data.allow_duplicates=true")
    assert not (tmp_path / "run").exists()
    allowed = build_data(_folder_cfg(data, allow_duplicates=True, check_images=False), 32)
    assert allowed.class_counts == [2 * c for c in COUNTS]  # what the key asks for: the lists as they are


def test_a_test_split_repeated_150_times_is_refused(data, tmp_path, capsys):
    """It was evaluated as 150 x its images (30,000 for a 200-image test set)."""
    (data / "test.txt").write_text((data / "test.txt").read_text() * 150)
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, f"{data / 'test.txt'}:7: 'test/c0/0.png' is listed again, first at "
                                   f"{data / 'test.txt'}:1; 894 lines of the test split repeat", "test split")


def test_a_path_repeated_with_another_label_says_so(data):
    with open(data / "train.txt", "a") as f:
        f.write("train/./c0/1.png 2\n")  # the same file as line 2, spelled otherwise, with label 2
    with pytest.raises(UserError, match=r"train\.txt:23: 'train/\./c0/1\.png' is listed again with another label "
                                        r"\(2, there 0\), first at .*train\.txt:2"):
        build_data(_folder_cfg(data), 32)


def test_test_images_in_the_training_split_are_refused(data, tmp_path, capsys):
    with open(data / "test.txt", "a") as f:
        f.write("train/c1/3.png 1\n")  # a training image (line 16 of train.txt), as test line 7
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, f"{data / 'test.txt'}:7: test image 'train/c1/3.png' is also a training image "
                                   f"({data / 'train.txt'}:16); 1 of the 7 test images are",
                          "data.allow_duplicates=true")
    assert len(build_data(_folder_cfg(data, allow_duplicates=True, check_images=False), 32).test) == 7


def test_two_classes_of_one_name_in_the_class_names_file_are_refused(data, tmp_path, capsys):
    write_class_names(data / "classnames.txt", ["red", "green", "red"])
    rc, err = run_cli(args(data, tmp_path / "run"), capsys)
    assert_one_line_error(rc, err, f"{data / 'classnames.txt'}:3: class 2 is named 'red', as class 0 (line 1)",
                          "data.allow_duplicates=true")
    names = build_data(_folder_cfg(data, class_names="classnames.txt", allow_duplicates=True,
                                   check_images=False), 32).class_names
    assert names == ["red", "green", "red"]


def test_names_shared_in_the_data_sets_own_metadata_only_warn(tmp_path):
    """ImageNet's first synset names hold "crane" twice (the bird, the machine): the user cannot fix that file, so
    a warning suggests data.class_names; the run goes on."""
    samples = [(f"train/n0{k}/{i}.JPEG", k) for k in range(3) for i in range(2)]
    tests = [(f"val/n0{k}/t.JPEG", k) for k in range(3)]
    write_images(tmp_path, samples + tests, fmt="JPEG")
    write_split_file(tmp_path / "ImageNet_LT_train.txt", samples)
    write_split_file(tmp_path / "ImageNet_LT_test.txt", tests)
    (tmp_path / "LOC_synset_mapping.txt").write_text("n00 crane\nn01 tench, Tinca tinca\nn02 crane\n")
    cfg = build_config(overrides={"data.dataset": "imagenet_lt", "data.root": str(tmp_path)}).data
    with pytest.warns(UserWarning, match=r"1 class names are shared by two classes: 'crane' \(classes 0 and 2\)"):
        built = build_data(cfg, 32)
    assert built.class_names == ["crane", "tench", "crane"]


# ---------------------------------------------------------------- FIFOs and other non-regular files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("check_images", [True, False], ids=["header-check", "probe"])
def test_a_fifo_in_a_split_file_is_named_not_waited_on(data, tmp_path, capsys, check_images):
    """Opening a FIFO waits for a writer: training hung. Now it is an unreadable image (one stat, no open), named;
    with data.max_unreadable=0 the run stops before training. Both the full header check and the probe of
    data.check_images=false find it (the probe opens every image of a split this small)."""
    fifo = data / "train" / "c0" / "0.png"
    fifo.unlink()
    os.mkfifo(fifo)
    with fifo_watchdog(fifo):
        rc, err = run_cli(args(data, tmp_path / "run", "data.max_unreadable=0",
                               f"data.check_images={str(check_images).lower()}"), capsys)
    assert_one_line_error(rc, err, f"{fifo} (not a regular file: a FIFO (named pipe))")
