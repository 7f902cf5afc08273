"""The model layer: Sage on a frozen open_clip ViT. Uses `sage_fast.ops`; knows nothing of training.

| module          | what                                                                    |
| --------------- | ----------------------------------------------------------------------- |
| `config`        | `ModelConfig`: every hyperparameter of the model, once                  |
| `sage`          | `SageModel`, `build_sage`                                               |
| `clip`          | loading open_clip (tag or local file), `sage-tiny`                      |
| `attention`     | the backbone's attention kernel: sdpa / xformers / open_clip, probed    |
| `runtime`       | the environment report: versions, device, what runs here and why        |
| `classifier`    | the classifier's initialisation from the text encoder, its disk cache   |
| `prompt_tokens` | the prompts' token ids, each class name tokenised once                  |
| `templates`     | the 60 prompt templates, LIFT's single prompt                           |
| `memory`        | what a training step keeps for backward: a bytes model, its measurement |
| `zero_shot`     | `ZeroShotCLIP`: frozen CLIP and the template classifier, no training    |
"""
from .classifier import (
    cached_text_classifier,
    classifier_cache_key,
    encode_text_trimmed,
    resolve_cache_dir,
    text_classifier,
    trimmable,
)
from .attention import (
    ATTENTION_BACKENDS,
    AttentionUnavailableError,
    explain_attention,
    frozen_self_attention,
    resolve_attention,
    xformers_ops_used,
    xformers_unusable_reason,
)
from .clip import image_size, load_clip, tokenizer
from .config import ModelConfig, check_model_config
from .sage import SageModel, SageOutput, build_sage, model_config
from .templates import CLASSIFIER_TEMPLATES, SINGLE_TEMPLATE, TEMPLATES, prompts_for
from .zero_shot import ZeroShotCLIP

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionUnavailableError",
    "CLASSIFIER_TEMPLATES",
    "ModelConfig",
    "SageModel",
    "SageOutput",
    "SINGLE_TEMPLATE",
    "TEMPLATES",
    "ZeroShotCLIP",
    "build_sage",
    "cached_text_classifier",
    "check_model_config",
    "classifier_cache_key",
    "encode_text_trimmed",
    "explain_attention",
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
    "xformers_ops_used",
    "xformers_unusable_reason",
]
