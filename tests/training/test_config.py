"""Run config: Table 8 presets, layering (defaults < preset < YAML < CLI), validation errors, the CLI."""
import numpy as np
import pytest
import yaml

from sage_fast.cli import main as cli_main
from sage_fast.training.config import PRESETS, ConfigError, SageConfig, build_config, config_from_dict, parse_overrides
from sage_fast.training.data import ArrayDataset, LTData, dataset_names
from sage_fast.training.trainer import Trainer


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_a_valid_config_with_its_values(name):
    """Every value a preset sets is in the built, validated config; every other key keeps its default."""
    cfg = build_config(preset=name)
    assert cfg.preset == name and cfg.data.dataset in dataset_names()
    built, default = cfg.to_dict(), SageConfig().to_dict()
    for section in ("data", "model", "optim", "train"):
        given = PRESETS[name].get(section, {})
        for key, value in built[section].items():
            assert value == given.get(key, default[section][key]), f"{name}: {section}.{key}"
    assert config_from_dict(built) == cfg


def _in_memory_data(n: int, num_classes: int = 3) -> LTData:
    """n random 32 px images over `num_classes` classes, enough for one batch of n."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = [k % num_classes for k in range(n)]
    names = [f"class {k}" for k in range(num_classes)]
    counts = [labels.count(k) for k in range(num_classes)]
    train, test = ArrayDataset(images, labels, names), ArrayDataset(images[:num_classes], labels[:num_classes], names)
    return LTData("memory", train, test, names, counts, counts, num_classes)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_reaches_the_model_and_the_optimizer(name, tmp_path):
    """The preset's hyperparameters are the ones the Trainer's model, loss, optimizer and schedule use
    (on the tiny random-weight architecture, with the preset's batch size)."""
    cfg = build_config(preset=name, overrides={
        "model.name": "sage-tiny", "model.pretrained": None, "model.backend": "torch", "train.device": "cpu",
        "train.output_dir": str(tmp_path), "train.progress": False, "data.num_workers": 0})
    trainer = Trainer(cfg, data=_in_memory_data(cfg.optim.batch_size))
    model = trainer.model
    assert model.config == cfg.model
    assert {a.alpha for a in model.adapters} == {cfg.model.alpha}
    loss = model.criterion
    assert (loss.mu, loss.gamma, list(loss.lambdas)) == (cfg.model.mu, cfg.model.gamma, cfg.model.lambdas)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (cfg.optim.lr, cfg.optim.momentum,
                                                                      cfg.optim.weight_decay)
    assert trainer.local_batch == cfg.optim.batch_size
    assert trainer.total_steps == cfg.optim.epochs * trainer.steps_per_epoch == cfg.optim.epochs
    assert trainer.scheduler.lr_lambdas[0](trainer.total_steps) == pytest.approx(0.0)  # cosine over all epochs
    assert not any(tmp_path.iterdir())  # building writes nothing


def test_layering_preset_yaml_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"preset": "places_lt", "optim": {"lr": 0.02, "epochs": 3},
                                 "data": {"root": "/data/places"}}))
    cfg = build_config(f, ["optim.epochs=5", "--model.lambdas=[0.1, 0.2, 0.3]", "train.amp=false"])
    assert cfg.model.alpha == 0.8                      # preset
    assert cfg.optim.lr == 0.02                        # YAML over preset
    assert cfg.optim.epochs == 5                       # CLI over YAML
    assert cfg.model.lambdas == [0.1, 0.2, 0.3]
    assert cfg.train.amp is False
    assert cfg.data.root == "/data/places"
    # a preset named on the command line wins over the file's
    with pytest.warns(UserWarning, match="overrides the config file's preset"):
        assert build_config(f, ["preset=imagenet_lt"]).model.lambdas == [0.005, 0.01, 0.2]


def test_int_for_float_and_null_for_optional():
    cfg = build_config(overrides=["optim.lr=1", "model.pretrained=null", "data.image_size=64", "model.bottleneck=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.pretrained is None
    assert cfg.data.image_size == 64


@pytest.mark.parametrize(
    "override, message",
    [
        (["optim.lrr=0.1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        (["trian.seed=1"], "unknown config key 'trian'"),
        (["optim.lr=abc"], "optim.lr: expected float, got 'abc'"),
        (["optim.epochs=2.5"], "optim.epochs: expected int"),
        (["train.amp=1"], "train.amp: expected bool"),
        (["model.backend=cuda"], "model.backend: expected one of"),
        (["model.lambdas=0.1"], "model.lambdas: expected list of float"),
        (["model.lambdas=[0.1, 0.2]"], "model.lambdas must hold three numbers"),
        (["optim.lr=-0.1"], "optim.lr must be positive"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0"),
        (["optim=3"], "optim: expected a mapping"),
        (["preset=cifar"], "unknown preset 'cifar'"),
        (["optim.lr"], "not of the form section.key=value"),
        (["train.device=tpu"], "train.device must be"),
        (["data.crop_scale=[0.5, 0.2]"], "data.crop_scale must be [min, max]"),
        (["data.train_augment=mixup"], "data.train_augment: expected one of"),
        (["data.dataset=imagenet"], "data.dataset: expected one of 'cifar100_lt' | 'imagenet_lt'"),
    ],
)
def test_bad_values_raise_clear_errors(override, message):
    with pytest.raises(ConfigError) as err:
        build_config(overrides=override)
    assert message in str(err.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        build_config(bad)
    bad.write_text("model:\n  alpah: 0.3\n")
    with pytest.raises(ConfigError, match="did you mean 'model.alpha'"):
        build_config(bad)


def test_parse_overrides_nested():
    assert parse_overrides(["a.b=1", "--a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_round_trip_through_dict():
    cfg = build_config(preset="inat2018", overrides=["data.root=/x", "train.seed=3"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    assert isinstance(again, SageConfig)


def test_cli_print_config(capsys):
    assert cli_main(["train", "--preset", "cifar100_lt_r50", "--print-config", "optim.lr=0.5",
                     "--data.root", "/data/cifar"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["gamma"] == 0.06 and printed["optim"]["lr"] == 0.5
    assert printed["data"]["root"] == "/data/cifar"
    assert cli_main(["train", "--print-config", "optim.lr=1e-2", "--optim.weight_decay", "5e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["optim"]["lr"], printed["optim"]["weight_decay"]) == (0.01, 0.0005)


def test_cli_rejects_bad_config_before_running(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", f"train.output_dir={out}", "optim.batchsize=64"])
    assert exc.value.code == 2
    assert "did you mean 'optim.batch_size'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_preset_wins_over_the_files(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"preset": "places_lt", "optim": {"lr": 0.02}}))
    with pytest.warns(UserWarning, match="overrides the config file's preset 'places_lt'"):
        cfg = build_config(f, preset="imagenet_lt")
    assert cfg.preset == "imagenet_lt" and cfg.model.lambdas == [0.005, 0.01, 0.2]
    assert cfg.optim.lr == 0.02  # the file's other keys still apply over the preset
    assert build_config(f).preset == "places_lt"
    with pytest.warns(UserWarning, match="overrides the config file's preset"):
        assert cli_main(["train", "--config", str(f), "--preset", "cifar100_lt_r50", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["preset"] == "cifar100_lt_r50" and printed["model"]["gamma"] == 0.06
    assert printed["data"]["dataset"] == "cifar100_lt"


def test_a_printed_config_given_back_with_another_preset_takes_that_preset(tmp_path, capsys):
    """--print-config writes every value, the preset's among them: with another --preset those give way to it."""
    assert cli_main(["train", "--preset", "cifar100_lt_r100", "optim.lr=0.02", "--print-config"]) == 0
    f = tmp_path / "dumped.yaml"
    f.write_text(capsys.readouterr().out)
    with pytest.warns(UserWarning, match=r"'imagenet_lt''s now \(.*data\.dataset.*model\.lambdas"):
        cfg = build_config(f, preset="imagenet_lt")
    want = build_config(preset="imagenet_lt", overrides=["optim.lr=0.02"])
    assert cfg.to_dict() == want.to_dict()  # the file's own change (lr) kept, everything the old preset set replaced


def test_cli_resume_from_missing_checkpoint_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    with pytest.raises(SystemExit) as exc:
        cli_main(["train", "--resume", str(missing), f"train.output_dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    assert f"checkpoint to resume from not found: {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # --resume without a value: OUTPUT_DIR/last.pt
        cli_main(["train", "--resume", f"train.output_dir={tmp_path / 'run'}"])
    assert exc.value.code == 2
    assert "last.pt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_floats_in_scientific_notation(tmp_path):
    """YAML 1.1 reads 1e-2 (no dot) as a string; wherever a float is expected it is a number."""
    cfg = build_config(overrides=["optim.lr=1e-2", "optim.weight_decay=5e-4", "model.lambdas=[1e-7, 2E-1, 3]"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.model.lambdas) == (0.01, 0.0005, [1e-7, 0.2, 3.0])
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-2\n  weight_decay: 5e-4\n")
    assert (build_config(path).optim.lr, build_config(path).optim.weight_decay) == (0.01, 0.0005)
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        build_config(overrides=["optim.lr=1e-2x"])
    with pytest.raises(ConfigError, match="optim.epochs: expected int"):
        build_config(overrides=["optim.epochs=1e1"])  # not an int, even though it is a whole number


# Every model and optim value with a range is checked when the config is built, with the ranges the API uses
# (sage_fast.ops.checks): before, model.alpha=2 ended in a traceback from the reference, optim.momentum=5 trained
# into "z contains NaN or Inf", model.lambdas=[-1,0,0] trained to chance with exit 0, and NaN / Inf passed.
OUT_OF_RANGE = [
    ("model.alpha=2", "model.alpha must lie in [0, 1], got 2.0"),
    ("model.alpha=.nan", "model.alpha must be a finite number, got nan"),
    ("optim.momentum=5", "optim.momentum must lie in [0, 1), got 5.0"),
    ("optim.momentum=1", "optim.momentum must lie in [0, 1), got 1.0"),
    ("optim.momentum=-0.1", "optim.momentum must lie in [0, 1)"),
    ("optim.momentum=.nan", "optim.momentum must be a finite number, got nan"),
    ("optim.momentum=.inf", "optim.momentum must be a finite number, got inf"),
    ("model.gamma=1000", "model.gamma must lie in [0, 10]"),
    ("model.gamma=-0.05", "model.gamma must lie in [0, 10]"),
    ("model.gamma=.nan", "model.gamma must be a finite number, got nan"),
    ("model.gamma=.inf", "model.gamma must be a finite number, got inf"),
    ("model.mu=.nan", "model.mu must be a finite number, got nan"),
    ("model.mu=.inf", "model.mu must be a finite number, got inf"),
    ("model.mu=0", "model.mu must be positive"),
    ("model.lambdas=[-1,0,0]", "model.lambdas[0] must be >= 0, got -1.0"),
    ("model.lambdas=[0,.nan,0]", "model.lambdas[1] must be a finite number, got nan"),
    ("model.lambdas=[0,0,.inf]", "model.lambdas[2] must be a finite number, got inf"),
    ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number, got nan"),
    ("optim.weight_decay=.inf", "optim.weight_decay must be a finite number, got inf"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay must be >= 0"),
    ("model.logit_scale=.inf", "model.logit_scale must be a finite number, got inf"),
    ("model.logit_scale=0", "model.logit_scale must be positive"),
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("data.imbalance_ratio=.inf", "data.imbalance_ratio must be a finite number"),
    ("data.max_unreadable=.nan", "data.max_unreadable is a fraction in [0, 1)"),
]


@pytest.mark.parametrize("override, message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_cli_refuses_out_of_range_values_in_one_line(override, message, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        rc = cli_main(["train", f"train.output_dir={out}", f"data.root={tmp_path}", override])
    except SystemExit as e:  # the command's argument parser reports config errors itself
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("sage-fast: error: "), err
    assert message in lines[0]
    assert not out.exists()


def test_edges_of_the_ranges_are_accepted():
    cfg = build_config(overrides=["model.alpha=0", "optim.momentum=0", "model.gamma=0", "model.lambdas=[0,0,0]",
                                  "optim.weight_decay=0"])
    assert (cfg.model.alpha, cfg.optim.momentum, cfg.model.gamma) == (0.0, 0.0, 0.0)
    cfg = build_config(overrides=["model.alpha=1", "optim.momentum=0.999", "model.gamma=10"])
    assert (cfg.model.alpha, cfg.optim.momentum, cfg.model.gamma) == (1.0, 0.999, 10.0)
