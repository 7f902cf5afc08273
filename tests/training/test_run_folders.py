"""Runs that cannot be mixed up: one writer per run folder, a run claims only its own folder, resume and reuse
compare what changes the result.

Black box where processes are the point (`python -m sage_fast ...` subprocesses, as in test_faults.py), the
API elsewhere. 4 classes with 40 / 12 / 12 / 6 training images (two classes of equal size, for the swapped
names), 2 test images each; batch 8: 8 steps per epoch, 2 epochs, a checkpoint every 3 steps.
"""
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers.images import make_image_folder
from helpers.runs import error_line, finish, sage, start, tree_digest, wait_for_log_rows, why
from helpers.runs import overrides as run_overrides
from safetensors.torch import load_file

import sage_fast.utils.folder_lock as folder_lock_module
from sage_fast.cli import main as cli_main
from sage_fast.training.checkpoint import ConfigMismatchError, read_checkpoint, set_rng_state
from sage_fast.training.config import ConfigError, build_config
from sage_fast.training.reuse import run_or_reuse
from sage_fast.training.run_folder import MARKER
from sage_fast.training.trainer import Trainer, cosine_lambda, train
from sage_fast.utils.folder_lock import LOCK_NAME

COUNTS = (40, 12, 12, 6)
TOTAL_STEPS = 2 * (sum(COUNTS) // 8)


def overrides(data, out, **extra):
    """`helpers.runs.overrides` with an evaluation after every epoch (two rows in eval_log.csv)."""
    return run_overrides(data, out, **{"train.eval_every_epochs": 1, **extra})


def cfg_for(data, out, **extra):
    return build_config(overrides=overrides(data, out, **extra))


def weights(folder):
    return load_file(str(Path(folder) / "adapters.safetensors"))


# the lock module reads no other part of the package: load it by its path, without torch (fast to start)
_HOLD = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("folder_lock", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.FolderLock(sys.argv[2]).acquire()
    print("held", flush=True)
    time.sleep(300)
""")


@contextlib.contextmanager
def held_elsewhere(folder):
    """Another process holds `folder`'s lock for the block; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, folder_lock_module.__file__, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


class Stop(Exception):
    pass


def stop_at(step):
    def cb(trainer, event, info):
        if event == "step" and info == step:
            raise Stop
    return cb


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("runs_data"), COUNTS, test=2)


@pytest.fixture(scope="module")
def _finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(cfg_for(data, out))
    return out


@pytest.fixture()
def finished(_finished, tmp_path):
    """This test's copy of a finished run (the stored config names the original folder: output_dir is free)."""
    return Path(shutil.copytree(_finished, tmp_path / "finished"))


# ---------------------------------------------------------------- one writer per folder


def test_two_runs_started_at_once_into_one_folder_the_second_is_refused(data, tmp_path):
    out = tmp_path / "run"
    a, b = start("train", *overrides(data, out)), start("train", *overrides(data, out))
    ra, rb = finish(a), finish(b)
    assert sorted([ra.returncode, rb.returncode]) == [0, 2], why(ra) + why(rb)
    (winner, won), (loser, lost) = sorted([(a, ra), (b, rb)], key=lambda p: p[1].returncode)
    line = error_line(lost)
    assert f"train.output_dir={out} is in use by another process (pid {winner.pid} on host " in line, line
    assert " since " in line and LOCK_NAME in line
    assert "top-1 overall" in won.stdout
    # the winner's folder is whole and its own: one row per step in each log, its lock gone
    steps = [int(r.split(",")[0]) for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, TOTAL_STEPS + 1))
    evals = [int(r.split(",")[0]) for r in (out / "eval_log.csv").read_text().splitlines()[1:]]
    assert evals == [TOTAL_STEPS // 2, TOTAL_STEPS]
    assert json.loads((out / MARKER).read_text())["pid"] == winner.pid
    assert not (out / LOCK_NAME).exists()


def test_a_killed_runs_lock_is_taken_over_and_sigterm_releases_it(data, tmp_path):
    out = tmp_path / "run"
    proc = start("train", *overrides(data, out))
    wait_for_log_rows(out / "train_log.csv", 1, proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    stale = json.loads((out / LOCK_NAME).read_text())
    assert stale["pid"] == proc.pid
    # SIGTERM: exit 75 with a checkpoint, and the lock released (no file, no takeover next time)
    proc = start("train", *overrides(data, out, **{"train.ckpt_every_steps": 0}), "--resume", "auto")
    wait_for_log_rows(out / "train_log.csv", 4, proc)
    proc.send_signal(signal.SIGTERM)
    done = finish(proc)
    assert done.returncode == 75, why(done)
    assert f"taking over the lock of another process (pid {stale['pid']} on host" in done.stderr
    assert not (out / LOCK_NAME).exists()
    done = sage("train", *overrides(data, out), "--resume")
    assert done.returncode == 0, why(done)
    assert "taking over" not in done.stderr
    assert not (out / LOCK_NAME).exists()


def test_a_lock_file_without_a_live_holder_is_taken_over(data, tmp_path):
    """What a dead holder leaves (here written by hand: a pid that no process has); the run warns and goes on."""
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "elsewhere", "since": "then"}))
    with pytest.warns(UserWarning, match=r"taking over the lock of another process \(pid 4194311 on host elsewhere"):
        train(cfg_for(data, out, **{"optim.epochs": 1, "train.eval_every_epochs": 0}))
    assert not (out / LOCK_NAME).exists() and (out / "adapters.safetensors").is_file()


def test_ctrl_c_releases_the_lock(data, tmp_path):
    def ctrl_c(trainer, event, info):
        if event == "step" and info == 4:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(data, out), callbacks=[ctrl_c])
    assert not (out / LOCK_NAME).exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg_for(data, out), resume=str(out / "last.pt"))
    assert not [w for w in caught if "taking over" in str(w.message)]


def test_commands_do_not_write_into_a_folder_another_process_holds(data, finished, tmp_path, capsys):
    held = tmp_path / "held"
    with held_elsewhere(held) as pid:
        commands = {
            "train": ["train", *overrides(data, held)],
            "eval": ["eval", "--weights", str(finished / "adapters.safetensors"), "--out", str(held)],
            "prepare": ["prepare", "--out", str(held), f"data.root={data}", "data.class_names=classnames.txt",
                        "--workers", "1", "--no-progress"],
            "sweep": ["sweep", *overrides(data, held), "model.alpha=0.1,0.5"],
            "ablate": ["ablate", *overrides(data, held), "--rows", "baseline"],
            "demo": ["demo", "--out", str(held)],
        }
        for name, argv in commands.items():
            before = tree_digest(held)
            assert cli_main(argv) == 2, name
            err = capsys.readouterr().err
            assert f"is in use by another process (pid {pid} on host" in err and err.count("\n") == 1, (name, err)
            assert tree_digest(held) == before, name


def test_a_refused_run_leaves_no_folder_behind(data, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert cli_main(["train", *overrides(data, out), "optim.batch_size=512"]) == 2
    assert "larger than the training set" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- a run claims only its own folder


def test_a_folder_of_foreign_files_is_refused_even_with_overwrite(data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("config.yaml", "train_log.csv", "per_class.csv"):
        (out / name).write_text(f"the user's own {name}\n")
    argv = ["train", "--config", str(out / "config.yaml"), *overrides(data, out)]
    (out / "config.yaml").write_text(build_config(overrides=overrides(data, out)).to_yaml())  # a real config, too
    before = tree_digest(out)
    for extra in ([], ["--overwrite"], ["--resume", "auto"]):
        assert cli_main(argv + extra) == 2, extra
        err = capsys.readouterr().err
        assert f"{out} is not a sage-fast run folder: it holds config.yaml, per_class.csv, train_log.csv" in err, err
        assert "--overwrite deletes only a run's files" in err
        assert tree_digest(out) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert cli_main(["train", *overrides(data, other)]) == 2
    assert f"{other} holds files that are not a sage-fast run's (notes.txt)" in capsys.readouterr().err


def test_empty_output_dir_is_a_config_error():
    with pytest.raises(ConfigError, match="train.output_dir is empty"):
        build_config(overrides=["train.output_dir="])


def test_overwrite_deletes_only_the_runs_own_files(data, finished, capsys):
    (finished / "notes.txt").write_text("the user's notes")
    marker = json.loads((finished / MARKER).read_text())
    assert cli_main(["train", *overrides(data, finished, **{"optim.epochs": 1})]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main(["train", *overrides(data, finished, **{"optim.epochs": 1}), "--overwrite"]) == 0
    assert (finished / "notes.txt").read_text() == "the user's notes"
    assert json.loads((finished / MARKER).read_text())["run"] != marker["run"]  # a new run, a new identity
    assert read_checkpoint(finished / "last.pt")["global_step"] == TOTAL_STEPS // 2
    assert read_checkpoint(finished / "previous.pt")["global_step"] == 6  # the new run's, not the old one's


def test_a_run_from_before_the_marker_is_resumed_and_overwritten(data, tmp_path, capsys):
    out = tmp_path / "old"
    with pytest.raises(Stop):
        train(cfg_for(data, out), callbacks=[stop_at(5)])
    (out / MARKER).unlink()  # as a version without the marker left it
    assert cli_main(["train", *overrides(data, out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli_main(["train", *overrides(data, out), "--resume"]) == 0
    assert (out / MARKER).is_file()
    (out / MARKER).unlink()
    (out / "last.pt").unlink()
    (out / "previous.pt").unlink()  # left: the export, which loads
    assert cli_main(["train", *overrides(data, out), "--overwrite"]) == 0
    assert (out / MARKER).is_file()


# ---------------------------------------------------------------- resume


def test_resume_of_a_finished_run_does_nothing(data, finished, capsys):
    before = tree_digest(finished)
    for how in (["--resume"], ["--resume", "auto"]):
        assert cli_main(["train", *overrides(data, finished), *how]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert printed == [f"sage-fast train: {finished} already finished (2 epochs, step {TOTAL_STEPS}): nothing "
                           f"to do; its metrics are in {finished / 'metrics.json'}"]
        assert tree_digest(finished) == before


def test_force_resume_applies_a_new_lr_and_weight_decay_exactly(data, tmp_path):
    """Resumed with another lr and weight decay, the weights are those of an explicit computation from the same
    checkpoint with them (a fresh SGD and cosine schedule shifted to the checkpoint's step, the momentum buffers
    and RNG states set by hand), and differ from those of resuming with the old values."""
    base = tmp_path / "base"
    with pytest.raises(Stop):
        train(cfg_for(data, base), callbacks=[stop_at(5)])
    ckpt = read_checkpoint(base / "last.pt")
    assert ckpt["global_step"] == 3
    new = {"optim.lr": 0.01, "optim.weight_decay": 0.002}

    same = Path(shutil.copytree(base, tmp_path / "same"))
    train(cfg_for(data, same), resume=same / "last.pt")
    changed = Path(shutil.copytree(base, tmp_path / "changed"))
    with pytest.raises(ConfigMismatchError, match="--force-resume"):
        train(cfg_for(data, changed, **new), resume=changed / "last.pt")
    with pytest.warns(UserWarning, match=r"optim.lr \(0.05 -> 0.01\), optim.weight_decay \(0.0005 -> 0.002\)"):
        train(cfg_for(data, changed, **new), resume=changed / "last.pt", force_resume=True)
    assert read_checkpoint(changed / "last.pt")["config"]["optim"]["lr"] == 0.01

    explicit = Trainer(cfg_for(data, tmp_path / "explicit", **new))
    explicit.model.load_trainable_state_dict(ckpt["trainable"])
    params = list(explicit.model.trainable_parameters())
    explicit.optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=0.002)
    for i, p in enumerate(params):
        explicit.optimizer.state[p]["momentum_buffer"] = ckpt["optimizer"]["state"][i]["momentum_buffer"].clone()
    at = ckpt["global_step"]
    explicit.scheduler = torch.optim.lr_scheduler.LambdaLR(
        explicit.optimizer, lambda t: cosine_lambda(explicit.total_steps)(t + at))
    explicit.epoch, explicit.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
    explicit.global_step, explicit.skipped_total = ckpt["global_step"], ckpt["skipped_total"]
    set_rng_state(ckpt["rng"])
    explicit.fit()

    got, want, old = weights(changed), weights(tmp_path / "explicit"), weights(same)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(got[k], old[k]) for k in old)
    # the log shows the lr the steps used: the new base lr on the old schedule
    row = next(r for r in (changed / "train_log.csv").read_text().splitlines()[1:] if r.startswith(f"{at + 1},"))
    assert float(row.split(",")[3]) == pytest.approx(0.01 * cosine_lambda(TOTAL_STEPS)(at), rel=1e-5)


@pytest.mark.parametrize("key,value,why", [
    ("optim.epochs", 3, "the cosine schedule spans all epochs"),
    ("optim.batch_size", 4, "the steps per epoch"),
    ("optim.schedule", "constant", "the steps taken so far followed"),
    ("model.bottleneck", 8, "the trained parameters' shapes"),
])
def test_force_resume_refuses_what_the_run_already_did(data, tmp_path, key, value, why):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(cfg_for(data, out), callbacks=[stop_at(5)])
    before = tree_digest(out)
    with pytest.raises(ConfigMismatchError, match=f"cannot differ even with --force-resume: {key}: {why}"):
        train(cfg_for(data, out, **{key: value}), resume=out / "last.pt", force_resume=True)
    assert tree_digest(out) == before


def test_resume_compares_class_names_not_only_counts(data, tmp_path, capsys):
    out = tmp_path / "run"
    swapped = Path(shutil.copytree(data, tmp_path / "swapped"))
    with pytest.raises(Stop):
        train(cfg_for(swapped, out), callbacks=[stop_at(5)])
    names = (swapped / "classnames.txt").read_text().split()
    names[1], names[2] = names[2], names[1]  # two classes of 12 images each: the counts stay as they were
    (swapped / "classnames.txt").write_text("\n".join(names) + "\n")
    for force in ([], ["--force-resume"]):
        assert cli_main(["train", *overrides(swapped, out), "--resume", *force]) == 2
        err = capsys.readouterr().err
        assert "the checkpoint was trained on other classes than this data set (class 1 is 'colour_1' with 12 " \
               "training images in the checkpoint, 'colour_2' with 12 in the data)" in err, err
    assert read_checkpoint(out / "last.pt")["global_step"] == 3


# ---------------------------------------------------------------- reuse by sweep and ablate


def test_a_finished_run_is_reused_only_on_the_same_data(data, tmp_path, recwarn):
    cfg = cfg_for(data, tmp_path / "unused", **{"optim.epochs": 1, "train.eval_every_epochs": 0})
    folder = tmp_path / "sweep" / "run"
    report, status = run_or_reuse(cfg, folder)
    assert status == "trained"
    moved = Path(shutil.copytree(data, tmp_path / "moved"))  # the same data set elsewhere: data.root is free
    cfg.data.root = str(moved)
    reused, status = run_or_reuse(cfg, folder)
    assert status == "reused" and reused["overall"] == report["overall"]
    fewer = make_image_folder(tmp_path / "nine", COUNTS[:3], test=2)  # one class less, at another data.root
    cfg.data.root = str(fewer)
    with pytest.warns(UserWarning, match=r"trained on other data \(4 classes in the run, 3 in the data now\)"):
        report3, status = run_or_reuse(cfg, folder)
    assert status == "trained" and read_checkpoint(folder / "last.pt")["class_counts"] == list(COUNTS[:3])
    assert report3["test_images"] == 6
    other_test = Path(shutil.copytree(fewer, tmp_path / "other_test"))
    (other_test / "test.txt").write_text("".join((other_test / "test.txt").read_text().splitlines(True)[:-1]))
    cfg.data.root = str(other_test)
    with pytest.warns(UserWarning, match="6 test images in the run, 5 in the data now"):
        assert run_or_reuse(cfg, folder)[1] == "trained"


def test_sweep_reruns_the_runs_of_another_data_set(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", *overrides(data, out, **{"optim.epochs": 1, "train.eval_every_epochs": 0}),
            "model.alpha=0.1,0.5"]
    assert cli_main(argv) == 0
    assert "2 runs (2 trained, 0 finished earlier)" in capsys.readouterr().out
    fewer = make_image_folder(tmp_path / "nine", COUNTS[:3], test=2)
    assert cli_main(argv + ["--dry-run", f"data.root={fewer}"]) == 0
    assert capsys.readouterr().out.split().count("to") == 2
    with pytest.warns(UserWarning, match=r"holds a run trained on other data \(4 classes in the run, 3 in the data"):
        assert cli_main(argv + [f"data.root={fewer}"]) == 0
    assert "2 runs (2 trained, 0 finished earlier)" in capsys.readouterr().out
    for folder in out.iterdir():
        if folder.is_dir():
            assert json.loads((folder / "metrics.json").read_text())["test_images"] == 6
