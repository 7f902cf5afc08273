"""The cosine classifier's initialisation from CLIP's text encoder and the 60 prompt templates."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .templates import TEMPLATES, prompts_for


@torch.no_grad()
def text_classifier(clip, tokenizer, class_names: Sequence[str], templates=TEMPLATES, batch_size: int = 256,
                    progress: bool = True) -> torch.Tensor:
    """W (C, d): per class, the mean of the normalised text embeddings of the templates, mapped into the
    visual width with the transpose of the frozen visual projection, re-normalised."""
    from tqdm.auto import tqdm

    device = next(clip.parameters()).device
    proj = getattr(clip.visual, "proj", None)
    # All prompts of all classes in batches of batch_size (iNaturalist: 8,142 x 60 prompts); each
    # normalised embedding is summed into its class's row, so memory stays at C x embed_dim.
    prompts = [(k, p) for k, name in enumerate(class_names) for p in prompts_for(name, templates)]
    sums, counts = None, torch.zeros(len(class_names), device=device)
    for start in tqdm(range(0, len(prompts), batch_size), desc="classifier init", disable=not progress,
                      unit="batch"):
        chunk = prompts[start:start + batch_size]
        labels = torch.tensor([k for k, _ in chunk], device=device)
        emb = F.normalize(clip.encode_text(tokenizer([p for _, p in chunk]).to(device)).float(), dim=-1)
        if sums is None:
            sums = torch.zeros(len(class_names), emb.shape[1], device=device)
        sums.index_add_(0, labels, emb)
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
    text = F.normalize(sums / counts[:, None], dim=-1)                  # (C, embed_dim)
    if proj is not None:
        text = text @ proj.float().t()                                   # (C, d)
    return F.normalize(text, dim=-1)
