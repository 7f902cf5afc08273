"""The README's first command runs `sage-fast demo`: keep it working (fewer epochs here)."""
import re

from sage_fast.cli import main


def test_demo_command_trains_and_reports_group_accuracy(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    match = re.search(r"test accuracy: overall ([\d.]+)%  many ([\d.]+)%  medium ([\d.]+)%  few ([\d.]+)%", printed)
    assert match, printed[-2000:]
    assert all(0.0 <= float(v) <= 100.0 for v in match.groups())
    assert (tmp_path / "demo" / "run" / "metrics.json").is_file()
    assert (tmp_path / "demo" / "data" / "train.txt").is_file()


def test_cli_without_a_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
