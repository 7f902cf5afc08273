"""`sage-fast ablate`: zero-shot CLIP and the ladder of Tables 5 and 6 as configs, and one tiny run per row, never
run twice.

The training test evaluates the zero-shot row and runs three rows (baseline, +SG, +FIT) for one epoch on
`sage-tiny` with random weights and 3 classes (40 / 12 / 6 training images, 2 test images each).
"""
import csv
import dataclasses
import json

import pytest
import yaml
from helpers.images import make_image_folder

from sage_fast.model import ModelConfig
from sage_fast.training.ablate import SWITCHES, row_folder, select_rows
from sage_fast.training.ablate import plan_ablation as plan
from sage_fast.cli import main as cli_main
from sage_fast.training.config import ConfigError
from sage_fast.training.inference import load_trained, resolve_run_config

COUNTS = (40, 12, 6)

# the rows' switches, written out: each row adds one component to the row before it
EXPECTED = {
    "baseline": {"adapter": "adaptformer", "classifier_init": "single", "loss": "la", "fit": False},
    "+SG": {"adapter": "sg", "classifier_init": "single", "loss": "la", "fit": False},
    "+Init": {"adapter": "sg", "classifier_init": "templates", "loss": "la", "fit": False},
    "+CF": {"adapter": "sg", "classifier_init": "templates", "loss": "compensated", "fit": False},
    "+FIT": {"adapter": "sg", "classifier_init": "templates", "loss": "compensated", "fit": True},
}


def overrides(data_root, out_dir):
    return [f"data.root={data_root}", "data.dataset=folder", "data.class_names=classnames.txt",
            "data.num_workers=0", "model.name=sage-tiny", "model.pretrained=null", "model.backend=torch",
            "model.text_batch_size=64", "optim.epochs=1", "optim.batch_size=16", "optim.lr=0.05",
            f"train.output_dir={out_dir}", "train.ckpt_every_steps=0", "train.eval_batch_size=8",
            "train.progress=false", "train.tensorboard=false", "train.device=cpu"]


def switches(model) -> dict:
    get = model.get if isinstance(model, dict) else lambda k: getattr(model, k)
    return {k: get(k) for k in SWITCHES}


def test_each_row_adds_one_component_on_top_of_the_given_config(tmp_path):
    base, rows = plan(None, ["model.gamma=0.07", "model.text_proj=false", f"train.output_dir={tmp_path}"],
                      preset="imagenet_lt")
    assert [r.row.name for r in rows] == ["zero-shot", *EXPECTED]
    zero_shot, rows = rows[0], rows[1:]
    # zero-shot CLIP: the given config with the template classifier, in folder 0-zero-shot
    assert zero_shot.row.zero_shot and zero_shot.cfg.model.classifier_init == "templates"
    assert {k: v for k, v in dataclasses.asdict(zero_shot.cfg.model).items() if k != "classifier_init"} == \
        {k: v for k, v in dataclasses.asdict(base.model).items() if k != "classifier_init"}
    assert zero_shot.index == 0 and zero_shot.folder == tmp_path / "0-zero-shot"
    for r in rows:
        assert switches(r.cfg.model) == EXPECTED[r.row.name], r.row.name
        # everything but the four switches is the given config's: the preset, the overrides
        rest = {k: v for k, v in dataclasses.asdict(r.cfg.model).items() if k not in SWITCHES}
        assert rest == {k: v for k, v in dataclasses.asdict(base.model).items() if k not in SWITCHES}
        assert r.cfg.model.alpha == 0.8 and r.cfg.model.gamma == 0.07 and r.cfg.model.text_proj is False
        assert r.cfg.optim == base.optim and r.cfg.data == base.data
        assert r.folder == tmp_path / row_folder(r.index, r.row) and r.cfg.train.output_dir == str(r.folder)
    assert [r.folder.name for r in rows] == ["1-baseline", "2-sg", "3-init", "4-cf", "5-fit"]
    # one switch per step (+SG, +Init, +CF, +FIT), and the last row is the full Sage of the defaults
    for before, after in zip(rows, rows[1:]):
        changed = [k for k in SWITCHES if getattr(before.cfg.model, k) != getattr(after.cfg.model, k)]
        assert len(changed) == 1, (after.row.name, changed)
    assert switches(rows[-1].cfg.model) == switches(ModelConfig())


def test_row_names_and_user_errors(tmp_path, capsys):
    assert select_rows(None) == [0, 1, 2, 3, 4, 5]
    assert select_rows(["+FIT", "sg", "1", "INIT", "4-cf"]) == [1, 2, 3, 4, 5]
    assert select_rows(["+fit", "baseline"]) == [1, 5]
    assert select_rows(["zero-shot"]) == select_rows(["0"]) == select_rows(["0-Zero-Shot"]) == [0]
    with pytest.raises(ConfigError, match="no ablation row 'SG-Adapter'"):
        select_rows(["SG-Adapter"])
    with pytest.raises(ConfigError, match="model.fit, model.loss are set by the ablation rows"):
        plan(None, ["model.loss=ce", "model.fit=true"])
    out = f"train.output_dir={tmp_path}"
    for argv in (["--rows", "+XYZ", out], ["model.adapter=sg", out], ["optim.lr=fast", out], ["bogus", out],
                 ["--config", str(tmp_path / "missing.yaml")], ["--rows", out]):
        assert cli_main(["ablate", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sage-fast: error: "), (argv, err)
    with pytest.raises(SystemExit) as e:  # argparse's own mistakes: the same one line, status 2
        cli_main(["ablate", "--preset", "nope", out])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sage-fast: error: sage-fast ablate: argument --preset")
    assert not any(tmp_path.iterdir())  # nothing was written
    with pytest.raises(SystemExit) as e:
        cli_main(["ablate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in EXPECTED) and "model.classifier_init" in text


def test_ablate_trains_each_row_once(tmp_path, capsys, monkeypatch):
    data_root = make_image_folder(tmp_path / "data", COUNTS, test=2)
    out = tmp_path / "ablation"
    argv = ["ablate", *overrides(data_root, out)]

    assert cli_main([*argv, "--rows", "baseline", "zero-shot"]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] zero-shot (model.classifier_init=templates): evaluating in" in printed
    assert "2 rows (1 trained, 1 evaluated (zero-shot), 0 finished earlier)" in printed
    # the other two rows; the table then holds the baseline too, finished before
    assert cli_main([*argv, "--rows", "+FIT", "+SG"]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] +SG (model.adapter=sg model.classifier_init=single model.loss=la model.fit=false)" in printed
    assert "2 rows (2 trained, 0 finished earlier)" in printed

    names = {"baseline": "1-baseline", "+SG": "2-sg", "+FIT": "5-fit"}
    with open(out / "ablation.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["row"] for r in table] == ["zero-shot", *names]
    zero_shot, table = table[0], table[1:]
    metrics = json.loads((out / "0-zero-shot/metrics.json").read_text())
    assert metrics["zero_shot"] is True and metrics["epoch"] == 0
    assert [zero_shot[k] for k in SWITCHES] == ["", "", "", ""]
    assert zero_shot["trainable_parameters"] == zero_shot["adapter_parameters"] == "0"
    assert zero_shot["run"] == "0-zero-shot" and not (out / "0-zero-shot/adapters.safetensors").exists()
    for m in ("overall", "many", "medium", "few"):
        assert zero_shot[m] == ("" if metrics[m] is None else f"{metrics[m]:.4f}")
    trainable = {}
    for r in table:
        folder = out / names[r["row"]]
        assert r["run"] == folder.name
        stored = yaml.safe_load((folder / "config.yaml").read_text())
        assert switches(stored["model"]) == EXPECTED[r["row"]]
        assert {k: r[k] for k in SWITCHES} == {k: str(v).lower() for k, v in EXPECTED[r["row"]].items()}
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["epoch"] == 1
        for m in ("overall", "many", "medium", "few"):
            assert r[m] == ("" if metrics[m] is None else f"{metrics[m]:.4f}")
        weights = folder / "adapters.safetensors"
        model = load_trained(weights, resolve_run_config(weights))
        assert int(r["trainable_parameters"]) == model.num_trainable_parameters()
        counts = model.trainable_parameter_counts()
        assert int(r["adapter_parameters"]) == counts["adapters"] + counts["block_scales"]
        trainable[r["row"]] = int(r["trainable_parameters"])
    # AdaptFormer is smaller than the SG-Adapter; FIT adds s1 and s2
    assert trainable["baseline"] < trainable["+SG"] and trainable["+FIT"] == trainable["+SG"] + 2
    md = (out / "ablation.md").read_text()
    assert "| row | SG-Adapter | template init | compensated loss | FIT | overall |" in md
    assert "| baseline |  |  |  |  |" in md and "| n/a |" in md and "| +FIT | ✓ | ✓ | ✓ | ✓ |" in md
    assert md.index("| zero-shot |  |  |  |  |") < md.index("| baseline |")
    assert f"| {trainable['+SG']:,} |" in md

    # the same command again: every row is found finished, nothing trains
    def no_training(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr("sage_fast.training.trainer.train", no_training)
    monkeypatch.setattr("sage_fast.training.inference.evaluate_weights", no_training)
    assert cli_main([*argv, "--rows", "zero-shot", "baseline", "+SG", "+FIT"]) == 0
    assert "4 rows (0 trained, 4 finished earlier)" in capsys.readouterr().out
    assert cli_main([*argv, "--dry-run"]) == 0
    state = {line.split()[1]: line.split()[-1] for line in capsys.readouterr().out.splitlines()}
    assert state == {"zero-shot": "finished", "baseline": "finished", "+SG": "finished", "+Init": "run",
                     "+CF": "run", "+FIT": "finished"}
    # a changed base config is another run: it is trained again (here: the patched trainer fails)
    with pytest.warns(UserWarning, match="another config"), pytest.raises(AssertionError, match="trained again"):
        cli_main([*argv, "optim.lr=0.02", "--rows", "baseline"])
