"""The model layer: Sage on a frozen open_clip ViT. Uses `sage_fast.ops`; knows nothing of training.

| module        | what                                                                  |
| ------------- | --------------------------------------------------------------------- |
| `config`      | `ModelConfig`: every hyperparameter of the model, once                |
| `sage`        | `SageModel`, `build_sage`                                             |
| `clip`        | loading open_clip (tag or local file), attention kernels, `sage-tiny` |
| `classifier`  | the classifier's initialisation from the text encoder, its disk cache |
| `templates`   | the 60 prompt templates, LIFT's single prompt                         |
| `zero_shot`   | `ZeroShotCLIP`: frozen CLIP and the template classifier, no training  |
"""
from .classifier import (
    cached_text_classifier,
    classifier_cache_key,
    encode_text_trimmed,
    resolve_cache_dir,
    text_classifier,
    trimmable,
)
from .clip import ATTENTION_BACKENDS, frozen_self_attention, image_size, load_clip, resolve_attention, tokenizer
from .config import ModelConfig
from .sage import SageModel, SageOutput, build_sage, model_config
from .templates import CLASSIFIER_TEMPLATES, SINGLE_TEMPLATE, TEMPLATES, prompts_for
from .zero_shot import ZeroShotCLIP

__all__ = [
    "ATTENTION_BACKENDS",
    "CLASSIFIER_TEMPLATES",
    "ModelConfig",
    "SageModel",
    "SageOutput",
    "SINGLE_TEMPLATE",
    "TEMPLATES",
    "ZeroShotCLIP",
    "build_sage",
    "cached_text_classifier",
    "classifier_cache_key",
    "encode_text_trimmed",
    "frozen_self_attention",
    "image_size",
    "load_clip",
    "model_config",
    "prompts_for",
    "resolve_attention",
    "resolve_cache_dir",
    "text_classifier",
    "tokenizer",
    "trimmable",
]
