"""The README's Python example runs as written (CPU, no download)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)  # noqa: S102 - our own README
    model, out = scope["model"], scope["out"]
    batch, classes = scope["images"].shape[0], len(scope["class_names"])
    assert scope["a"].shape == (8, 197, 768)
    assert out.z.shape == out.z_hat.shape == (batch, classes)
    assert torch.isfinite(scope["loss"]) and scope["pred"].shape == (batch,)
    assert model.config.name == "sage-tiny"
