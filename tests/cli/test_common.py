"""The command line's one splitter of overrides, and its one mapping of exceptions to exit statuses."""
import pytest

from sage_fast import cli
from sage_fast.cli.common import CommandError, split_arguments


def test_split_arguments_for_config_commands():
    words = ["optim.lr=0.1", "--data.root", "/x", "--model.fit=true", "stray"]
    assert split_arguments(words) == (["optim.lr=0.1", "data.root=/x", "model.fit=true", "stray"], [])


def test_split_arguments_with_paths(tmp_path):
    named_like_an_override = tmp_path / "a=b.jpg"
    named_like_an_override.write_bytes(b"")
    words = ["img.jpg", "train.device=cpu", str(named_like_an_override), "--eval.tte", "fivecrop", "--topk"]
    overrides, paths = split_arguments(words, paths=True)
    assert overrides == ["train.device=cpu", "eval.tte=fivecrop"]
    assert paths == ["img.jpg", str(named_like_an_override), "--topk"]


def test_resume_before_an_override_and_a_checkpoint_named_like_one(tmp_path, capsys):
    """`--resume` takes an optional value: `--resume optim.lr=0.5` is an override after a bare --resume, but a
    checkpoint file whose name holds "=" (not ending in .pt) is a checkpoint, not an override."""
    import yaml

    assert cli.main(["train", "--resume", "optim.lr=0.5", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 0.5
    ckpt = tmp_path / "lr=0.5"
    ckpt.write_bytes(b"")
    assert cli.main(["train", "--resume", str(ckpt), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] != 0.5


@pytest.fixture
def command(monkeypatch):
    """A fake command whose main raises what the test puts in `raised`."""
    raised = []

    class Module:
        @staticmethod
        def main(argv):
            raise raised[0]

    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake", "a test command"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Module)
    return raised


@pytest.mark.parametrize("exc, code, line", [
    (CommandError("sage-fast fake", "refused"), 2, "sage-fast: error: sage-fast fake: refused"),
    (CommandError("sage-fast fake", "stop", 75, kind="stopped"), 75, "sage-fast: stopped: sage-fast fake: stop"),
    (FileNotFoundError(2, "No such file or directory", "/nowhere"), 2, "sage-fast: error: no such file or directory: /nowhere"),
])
def test_exit_statuses(command, capsys, exc, code, line):
    command.append(exc)
    assert cli.main(["fake"]) == code
    assert capsys.readouterr().err.strip() == line


def test_a_bug_keeps_its_traceback(command):
    command.append(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["fake"])
