"""The model layer: Sage on a frozen open_clip ViT. Uses `sage_fast.ops`; knows nothing of training.

| module        | what                                                                  |
| ------------- | --------------------------------------------------------------------- |
| `config`      | `ModelConfig`: every hyperparameter of the model, once                |
| `sage`        | `SageModel`, `build_sage`                                             |
| `clip`        | loading open_clip (tag or local file), attention kernels, `sage-tiny` |
| `classifier`  | the classifier's initialisation from the text encoder                 |
| `templates`   | the 60 prompt templates                                               |
"""
from .classifier import text_classifier
from .clip import ATTENTION_BACKENDS, frozen_self_attention, image_size, load_clip, resolve_attention, tokenizer
from .config import ModelConfig
from .sage import SageModel, SageOutput, build_sage, model_config
from .templates import TEMPLATES, prompts_for

__all__ = [
    "ATTENTION_BACKENDS",
    "ModelConfig",
    "SageModel",
    "SageOutput",
    "TEMPLATES",
    "build_sage",
    "frozen_self_attention",
    "image_size",
    "load_clip",
    "model_config",
    "prompts_for",
    "resolve_attention",
    "text_classifier",
    "tokenizer",
]
