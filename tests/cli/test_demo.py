"""The README's first command runs `sage-fast demo`: keep it working (fewer epochs here); a second demo into the
same folder asks for --overwrite; a diverged or preempted demo ends as `sage-fast train` does."""
import os
import re
import signal

import torch
from helpers.runs import tree_digest

from sage_fast.cli import main


def test_demo_command_trains_and_reports_group_accuracy(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"test accuracy: overall ([\d.]+)%  many ([\d.]+)%  medium ([\d.]+)%  few ([\d.]+)%", printed)
    assert match, printed[-2000:]
    assert all(0.0 <= float(v) <= 100.0 for v in match.groups())
    assert (out / "run" / "metrics.json").is_file()
    assert (out / "data" / "train.txt").is_file()

    # the same command again: refused in one line, nothing touched; --overwrite replaces the demo
    before = tree_digest(out)
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"sage-fast: error: sage-fast demo: {out} already holds a demo (data/, run/): sage-fast demo "
                   "--overwrite replaces it (its data set and run), or choose another --out\n")
    assert tree_digest(out) == before
    assert main(["demo", "--out", str(out), "--epochs", "1", "--overwrite"]) == 0
    assert '"epoch": 1' in (out / "run" / "metrics.json").read_text()


def test_demo_overwrites_only_an_earlier_demo(tmp_path, capsys):
    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "a" / "data" / "mine.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "a"), "--overwrite"]) == 2
    assert "holds files that are not the demo's data set" in capsys.readouterr().err
    (tmp_path / "b" / "run").mkdir(parents=True)
    (tmp_path / "b" / "run" / "config.yaml").write_text("mine")
    assert main(["demo", "--out", str(tmp_path / "b"), "--overwrite"]) == 2
    assert f"{tmp_path / 'b' / 'run'} is not a sage-fast run folder" in capsys.readouterr().err
    assert (tmp_path / "b" / "run" / "config.yaml").read_text() == "mine"
    assert not (tmp_path / "a" / "run").exists() and sorted(os.listdir(tmp_path / "a" / "data")) == ["mine.txt"]


def test_a_diverged_demo_exits_3_in_one_line(tmp_path, capsys, monkeypatch):
    step, calls = torch.optim.SGD.step, []

    def nan_on_step_2(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            next(p for g in self.param_groups for p in g["params"] if p.grad is not None).grad.view(-1)[0] = float("nan")
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", nan_on_step_2)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]) == 3
    err = capsys.readouterr().err  # after the progress bars
    assert "Traceback" not in err and err.count("sage-fast: ") == 1, err
    assert re.search(r"sage-fast: error: sage-fast demo: training diverged at step 2: [^\n]*\n", err), err


def test_a_preempted_demo_exits_75_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    from sage_fast.training.trainer import Trainer

    step, calls = Trainer.train_step, []

    def sigterm_on_step_3(self, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # caught: the run stops after this step
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", sigterm_on_step_3)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 75
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("sage-fast: ") == 1, err
    assert re.search(r"sage-fast: stopped: sage-fast demo: SIGTERM after step 3 [^\n]*continue with --resume\n", err), err
    assert torch.load(out / "run" / "last.pt", weights_only=True)["global_step"] == 3


def test_cli_without_a_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
