"""`sage-fast info` and `--version`: what this installation runs here, for bug reports."""
import json

import pytest
import torch

import sage_fast
from sage_fast.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"sage-fast {sage_fast.__version__} (torch {torch.__version__}, triton ")


def test_info_text_names_every_op_and_the_attention(capsys):
    assert main(["info", "--no-speed"]) == 0
    out = capsys.readouterr().out
    for needle in ("versions:", f"torch      {torch.__version__}", "device: ", "adapter ", "loss ", "attention: ",
                   "kernel self-check"):
        assert needle in out, needle
    if not torch.cuda.is_available():
        assert "'auto' runs the kernels on CUDA only, not on cpu" in out


def test_info_json_explains_a_setting(capsys):
    assert main(["info", "--no-speed", "--json", "--backend", "torch", "--attention", "sdpa"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {b["op"] for b in report["backends"]} == {"adapter", "loss"}
    assert all(b["resolved"] == "torch" and b["requested"] == "torch" for b in report["backends"])
    assert report["attention"]["resolved"] == "sdpa"
    assert report["versions"]["sage_fast"] == sage_fast.__version__


def test_info_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", "--backend", "cuda"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("sage-fast: error: sage-fast info: argument --backend")
