"""Zero-shot CLIP: the baseline every long-tailed CLIP paper reports first, before any training.

The frozen visual encoder (no adapters) gives the features f_zs of an image, and the template classifier
W_zs (the text encoder's embeddings of the class prompts, config ``classifier_init``: the mean over the
60 templates, or LIFT's one prompt) classifies them: z_zs = logit_scale * cos(f_zs, w_k), the logits of
FIT's frozen path (`attention_maps.zero_shot_logits`). Nothing of Sage's trained parameters is used.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention_maps import zero_shot_logits


class ZeroShotCLIP(nn.Module):
    """Zero-shot CLIP of a `SageModel` (its frozen CLIP and W_zs), with the interface evaluation and
    prediction use: ``predict(images)`` -> (B, C) fp32 logits, ``num_classes``, ``class_names``, ``image_size``.

    The logit scale is the model's (``model.logit_scale``); it changes the probabilities, not the argmax.
    """

    def __init__(self, sage: nn.Module):
        super().__init__()
        self.sage = sage

    @property
    def num_classes(self) -> int:
        return self.sage.num_classes

    @property
    def class_names(self):
        return self.sage.class_names

    @property
    def image_size(self) -> int:
        return self.sage.image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> z_zs (B, C) fp32."""
        return zero_shot_logits(self.sage, self.sage.visual_features(images, adapters=False))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    def runtime(self, dtype=None) -> dict:
        """`SageModel.runtime` of the model it wraps, with ``zero_shot`` true: only the attention (and the
        frozen encoder) ran; the adapter and loss entries say what the model would run."""
        return {**self.sage.runtime(dtype), "zero_shot": True}
