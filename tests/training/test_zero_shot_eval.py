"""`sage-fast eval --zero-shot`: zero-shot CLIP on a test split, no weights; the report checked against
predictions made here by hand (frozen features, template classifier, test transform).

3 classes with 40 / 12 / 6 training and 3 test images each (32 px PNG), `sage-tiny` with random weights.
"""
import csv
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.images import make_image_folder
from PIL import Image

from sage_fast.cli import main
from sage_fast.training.config import build_config
from sage_fast.training.data import build_transform
from sage_fast.training.trainer import build_model

COUNTS = (40, 12, 6)
TEST = 3


def overrides(root, out):
    return [f"data.root={root}", "data.dataset=folder", "data.class_names=classnames.txt", "data.num_workers=0",
            "model.name=sage-tiny", "model.pretrained=null", "model.backend=torch", "model.text_batch_size=64",
            f"train.output_dir={out}", "train.device=cpu", "train.eval_batch_size=4", "train.progress=false",
            "train.seed=3"]


def by_hand(cfg, root):
    """Per-class correct counts of zero-shot CLIP, computed here: argmax of cos(f_zs, W_zs)."""
    names = (root / "classnames.txt").read_text().split()
    model = build_model(cfg, names, list(COUNTS), torch.device("cpu"), progress=False).eval()
    tf = build_transform(model.image_size, train=False)
    correct = [0] * len(names)
    for line in (root / "test.txt").read_text().splitlines():
        rel, label = line.split()
        with Image.open(root / rel) as im:
            x = tf(im.convert("RGB"))[None]
        with torch.no_grad():
            f = model.visual_features(x, adapters=False)
            pred = int((F.normalize(f, dim=-1) @ F.normalize(model.zs_classifier, dim=-1).t()).argmax())
        correct[int(label)] += pred == int(label)
    return correct


def test_eval_zero_shot_writes_the_report_of_clip_before_training(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", COUNTS, test=TEST)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["eval", "--zero-shot", *overrides(root, out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    folder = out / "zero-shot"  # the default: OUTPUT_DIR/zero-shot
    metrics = json.loads((folder / "metrics.json").read_text())
    assert json.loads(printed[-1]) == {k: metrics[k] for k in ("overall", "many", "medium", "few")}
    assert metrics["zero_shot"] is True and metrics["epoch"] == 0 and metrics["step"] == 0
    assert "weights" not in metrics and metrics["test_images"] == TEST * len(COUNTS)
    assert (folder / "per_class_accuracy.png").is_file()
    cfg = build_config(overrides=overrides(root, out))
    assert yaml.safe_load((folder / "config.yaml").read_text()) == cfg.to_dict()  # what was evaluated

    correct = by_hand(cfg, root)
    with open(folder / "per_class.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["accuracy"]) for r in rows] == pytest.approx([100 * c / TEST for c in correct])
    assert metrics["overall"] == pytest.approx(100 * sum(correct) / (TEST * len(COUNTS)))
    assert not (out / "last.pt").exists() and not (out / "adapters.safetensors").exists()  # nothing trained


@pytest.mark.parametrize("argv, needle", [
    (["--zero-shot", "--weights", "w.safetensors"], "--zero-shot evaluates CLIP without trained weights"),
    ([], "the following arguments are required: --weights (or --zero-shot)"),
])
def test_eval_zero_shot_argument_errors(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["eval", *argv, f"train.output_dir={tmp_path}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sage-fast: error: sage-fast eval: ") and needle in err[0], err
