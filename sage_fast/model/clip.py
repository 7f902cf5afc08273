"""open_clip, frozen: loading a model (tag or local checkpoint); its attention kernels are in `attention`.

The architectures in ``configs/`` beside this file (``sage-tiny``: 32 px images, 2 blocks of width 64,
for the demo and tests; it builds in a fraction of a second with random weights) are registered with
open_clip on first use, so they are model names like any other.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
from pathlib import Path
from typing import Optional


_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@functools.lru_cache(maxsize=1)
def _open_clip():
    """open_clip with this package's architectures registered (once per process)."""
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)
    return open_clip


class ModelSourceError(ValueError):
    """An unknown model name or pretrained tag: a mistake in the run's ``model`` section, not a bug."""

    #: the `sage-fast` command prints it as one line (sage_fast.training.errors; not imported: model
    #: does not depend on training)
    user_error = True


def model_config(model_name: str) -> dict:
    """The open_clip architecture config of `model_name` (no weights built); `ModelSourceError` when unknown."""
    open_clip = _open_clip()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(str(model_name), open_clip.list_models(), n=3, cutoff=0.7)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "known: e.g. ViT-B-16-quickgelu, ViT-B-16, sage-tiny"
        raise ModelSourceError(f"model.name: unknown open_clip model {model_name!r}; {hint} "
                               "(open_clip.list_models() lists them)")
    return cfg


def check_pretrained(model_name: str, pretrained: Optional[str]) -> None:
    """Refuse a `pretrained` value that cannot load, before anything is built or downloaded: a missing file
    (FileNotFoundError) or a tag open_clip does not have for `model_name` (`ModelSourceError`)."""
    if not pretrained:
        return
    if _looks_like_path(pretrained):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"model.pretrained: checkpoint file not found: {pretrained}")
        return
    if str(model_name).startswith("hf-hub:"):
        return  # the hub's config says which weights; open_clip checks
    tags = _open_clip().list_pretrained_tags_by_model(model_name)

    def clean(tag):  # open_clip's own normalisation (pretrained._clean_tag)
        return str(tag).lower().replace("-", "_")

    if clean(pretrained) not in {clean(t) for t in tags}:
        known = f"its tags: {', '.join(tags)}" if tags else f"open_clip has no pretrained weights for {model_name}"
        raise ModelSourceError(f"model.pretrained={pretrained!r} is neither a checkpoint file nor a pretrained tag of "
                               f"{model_name} ({known}); or null for random weights")


def image_size(model_name: str) -> int:
    """The input resolution of an open_clip architecture, from its config."""
    size = model_config(model_name)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@functools.lru_cache(maxsize=8)
def tokenizer(model_name: str):
    """open_clip's tokenizer, built once per model name (loading the BPE vocabulary takes seconds)."""
    return _open_clip().get_tokenizer(model_name)


_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _looks_like_path(pretrained: Optional[str]) -> bool:
    if not pretrained:
        return False
    text = str(pretrained)
    return os.path.exists(text) or os.path.sep in text or text.endswith(_CHECKPOINT_SUFFIXES)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _no_random_init_warning():
    """open_clip warns on the root logger that "no pretrained weights" were loaded whenever it is given none;
    wrong when a local file is loaded right after, and noise when random weights were asked for."""
    root, f = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def load_clip(model_name: str = "ViT-B-16-quickgelu", pretrained: Optional[str] = "openai", device="cpu"):
    """Create an open_clip model, frozen and in eval mode.

    pretrained: an open_clip tag (e.g. "openai", downloaded by open_clip), a local checkpoint file
    (.safetensors, or a .pt / .bin / .pth state dict, read with ``weights_only=True``), or None for
    random weights. OpenAI's weights need QuickGELU: use ``ViT-B-16-quickgelu``.
    """
    open_clip = _open_clip()
    model_config(model_name)
    check_pretrained(model_name, pretrained)
    if _looks_like_path(pretrained):
        with _no_random_init_warning():  # the file's weights are loaded next
            model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        # open_clip's loader reads safetensors or torch.load(weights_only=True), never a full unpickle.
        try:
            open_clip.load_checkpoint(model, str(pretrained), strict=True, weights_only=True)
        except RuntimeError as err:
            if "TorchScript" not in str(err):
                raise
            raise ModelSourceError(
                f"{pretrained} is a TorchScript archive (OpenAI's original .pt): save its state_dict as a "
                "plain .pt or .safetensors file, or use pretrained='openai'"
            ) from err
    elif not pretrained:
        with _no_random_init_warning():  # random weights are what was asked for
            model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    else:
        model = open_clip.create_model(model_name, pretrained=pretrained, device="cpu")
    model.requires_grad_(False)
    return model.eval().to(device)
