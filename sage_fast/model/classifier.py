"""The cosine classifier's initialisation from CLIP's text encoder and the 60 prompt templates.

`text_classifier` encodes every (class, template) prompt and averages per class. Prompts are a
dozen tokens long, but CLIP's text tower runs at its full context (77): the tower is causal and
pools at the end-of-text token, so tokens after it cannot change the features. Each batch is
therefore cut to its longest prompt (`encode_text_trimmed`), after sorting the prompts by length so
that a batch's longest prompt is close to its shortest. The prompts' token ids come from
`sage_fast.model.prompt_tokens` (each class name tokenised once, the same ids as the tokenizer's).

`cached_text_classifier` keeps the result on disk (safetensors) keyed by the model, its weights, the
class names and the templates, so resuming, evaluating or re-running does not recompute it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..utils.files import atomic_write_bytes
from .prompt_tokens import tokenize_prompts
from .templates import TEMPLATES

#: Bump when anything that shapes the cached numbers changes (prompt filling, averaging, projection).
CACHE_FORMAT = 1
#: Environment variable naming the cache folder when ``cache_dir`` is None.
CACHE_ENV = "SAGE_FAST_CACHE"

# Prompts tokenised and sorted together: sorting within a window of 64 batches gives batches almost
# as tight as a global sort, while only the window's tokens (64 x 256 x 77 int64 = 10 MB) are held.
_WINDOW_BATCHES = 64


# ----------------------------------------------------------------------------------------------
# trimmed text encoding


def trimmable(clip) -> bool:
    """Whether `encode_text_trimmed` reproduces ``clip.encode_text`` for this model.

    True for open_clip's `CLIP` (and subclasses that keep its ``encode_text``) with a causal text
    mask and end-of-text pooling ("argmax" or "eos"). Anything else (CustomTextCLIP, Hugging Face
    text towers, bidirectional or "last"-pooled towers) is False: the caller runs ``encode_text``.
    """
    try:
        from open_clip.model import CLIP
        from open_clip.transformer import text_global_pool  # noqa: F401 - needed by encode_text_trimmed
    except ImportError:
        return False
    if not isinstance(clip, CLIP) or type(clip).encode_text is not CLIP.encode_text:
        return False
    pool = getattr(clip, "text_pool_type", None)
    if pool not in ("argmax", "eos") or (pool == "eos" and getattr(clip, "text_eos_id", None) is None):
        return False
    if not hasattr(clip.transformer, "get_cast_dtype"):
        return False
    mask = getattr(clip, "attn_mask", None)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    # Only a strictly causal mask makes the cut exact: with any other mask, later tokens could
    # reach the pooled one.
    causal = torch.full(mask.shape, float("-inf"), device=mask.device).triu_(1)
    return bool(torch.equal(mask.float(), causal)) and clip.positional_embedding.shape[0] >= mask.shape[0]


def pooled_lengths(clip, text: torch.Tensor) -> torch.Tensor:
    """(B,) int64: 1 + the position CLIP pools each prompt at, for token ids `text` (B, n_ctx).

    The features of a prompt depend only on its first ``pooled_lengths`` tokens (causal tower).
    """
    if clip.text_pool_type == "eos":
        # Same rule as open_clip's text_global_pool: the first eos, or position 0 when there is none.
        pos = (text == clip.text_eos_id).int().argmax(dim=-1)
    else:
        pos = text.argmax(dim=-1)  # the end-of-text token has the largest id
    return pos + 1


def encode_text_trimmed(clip, text: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
    """``clip.encode_text(text)`` computed on the first `length` tokens only: (B, embed_dim).

    text: (B, n_ctx) token ids. length: how many tokens to keep, at least ``pooled_lengths(clip,
    text).max()``; None computes it (a host sync on CUDA). Mirrors open_clip 3.x ``CLIP.encode_text``
    (cast dtype, positional embedding, causal mask, ``ln_final``, pooling, Linear or matrix
    projection) with the positional embedding and the mask cut to `length`. Only valid when
    ``trimmable(clip)``.
    """
    from open_clip.transformer import text_global_pool

    if length is None:
        length = int(pooled_lengths(clip, text).max())
    length = max(1, min(int(length), text.shape[1]))
    text = text[:, :length]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(text).to(cast_dtype)                       # (B, L, width)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = text_global_pool(x, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


# ----------------------------------------------------------------------------------------------
# the classifier


@torch.no_grad()
def text_classifier(clip, tokenizer, class_names: Sequence[str], templates=TEMPLATES, batch_size: int = 256,
                    progress: bool = True, trim: bool = True) -> torch.Tensor:
    """W (C, d): per class, the mean of the normalised text embeddings of the templates, mapped into the
    visual width d with the transpose of the frozen visual projection, re-normalised. On CLIP's device.

    trim: sort prompts by length and cut each batch to its longest prompt (`encode_text_trimmed`)
    where `trimmable` says that is exact; otherwise, or with trim=False, every batch runs
    ``encode_text`` at the full context in the original order.
    """
    from tqdm.auto import tqdm

    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    device = next(clip.parameters()).device
    proj = getattr(clip.visual, "proj", None)
    trim = trim and trimmable(clip)
    # All prompts of all classes (iNaturalist: 8,142 x 60); each normalised embedding is summed into
    # its class's row, so memory stays at C x embed_dim whatever the order the prompts run in.
    num_prompts = len(class_names) * len(templates)
    labels_all = torch.arange(len(class_names)).repeat_interleave(len(templates))
    window = batch_size * _WINDOW_BATCHES
    sums, counts = None, torch.zeros(len(class_names), device=device)
    with tqdm(total=math.ceil(num_prompts / batch_size), desc="classifier init", disable=not progress,
              unit="batch") as bar:
        for start in range(0, num_prompts, window):
            # the tokenizer's ids, each class name tokenised once (sage_fast.model.prompt_tokens)
            tokens = tokenize_prompts(tokenizer, class_names, templates, start, start + window)  # (n, n_ctx)
            labels = labels_all[start:start + tokens.shape[0]]
            if trim:
                lengths = pooled_lengths(clip, tokens)
                order = torch.argsort(lengths, stable=True)
                tokens, labels, lengths = tokens[order], labels[order], lengths[order].tolist()
                tokens = tokens[:, :lengths[-1]]
            # One copy per window, lengths on the host: no per-batch sync, so on CUDA the next
            # window's tokenisation overlaps this window's kernels.
            tokens, labels = tokens.to(device), labels.to(device)
            for b in range(0, tokens.shape[0], batch_size):
                text = tokens[b:b + batch_size]
                if trim:
                    feats = encode_text_trimmed(clip, text, lengths[min(b + batch_size, len(lengths)) - 1])
                else:
                    feats = clip.encode_text(text)
                emb = F.normalize(feats.float(), dim=-1)                    # (b, embed_dim)
                if sums is None:
                    sums = torch.zeros(len(class_names), emb.shape[1], device=device)
                rows = labels[b:b + batch_size]
                sums.index_add_(0, rows, emb)
                counts.index_add_(0, rows, torch.ones_like(rows, dtype=counts.dtype))
                bar.update(1)
    text = F.normalize(sums / counts[:, None], dim=-1)                  # (C, embed_dim)
    if proj is not None:
        text = text @ proj.float().t()                                   # (C, d)
    return F.normalize(text, dim=-1)


# ----------------------------------------------------------------------------------------------
# disk cache


def resolve_cache_dir(cache_dir: Union[None, bool, str, os.PathLike] = None) -> Optional[Path]:
    """The cache folder: `cache_dir`; None: $SAGE_FAST_CACHE, else ~/.cache/sage-fast; False: no cache."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sage-fast"
    return Path(cache_dir).expanduser()


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are only in the signature so that a rewritten file is hashed again within a process.
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(pretrained: Optional[str]) -> Optional[dict]:
    """What identifies CLIP's weights in the cache key; None where they cannot be identified.

    - None / "" (random init): None. The text tower's random weights depend on the torch seed and
      RNG state, which the key cannot see: a cached classifier could come from another seed's tower.
    - a local checkpoint file: the SHA-256 of its content. Path, size and mtime would be cheaper, but
      checkpoints of one architecture all have the same size and copies (cp -p, rsync, tar) keep
      mtimes, so a different checkpoint under a reused name could hit a stale entry; a content hash
      cannot, and it survives moves and copies. It costs about a second per GB, once per process
      (the file was just read by the loader, so it is usually in the page cache).
    - an open_clip tag ("openai", "laion2b_s34b_b88k", ...): the tag.
    """
    from .clip import _looks_like_path

    if not pretrained:
        return None
    if _looks_like_path(pretrained):
        path = Path(pretrained).resolve()
        st = path.stat()
        return {"file_sha256": _sha256(str(path), st.st_size, st.st_mtime_ns)}
    return {"tag": str(pretrained)}


def classifier_cache_key(model_name: str, pretrained: Optional[str], class_names: Sequence[str],
                         templates: Sequence[str] = TEMPLATES) -> Optional[str]:
    """SHA-256 (hex) naming one initialised classifier, or None where it must not be cached (random init).

    Covers the format version, the open_clip version (its tokenizer and text tower shape the
    numbers), the model name, `weights_identity`, the class names in order and the templates.
    """
    import open_clip

    weights = weights_identity(pretrained)
    if weights is None:
        return None
    material = {
        "format": CACHE_FORMAT,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "model": str(model_name),
        "weights": weights,
        "classes": [str(c) for c in class_names],
        "templates": [str(t) for t in templates],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _cache_path(folder: Path, model_name: str, key: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(model_name)).strip("-.") or "model"
    return folder / f"classifier-{slug}-{key[:32]}.safetensors"


def _classifier_width(clip) -> Optional[int]:
    proj = getattr(clip.visual, "proj", None)
    return int(proj.shape[0]) if isinstance(proj, torch.Tensor) else None


def _load_cached(path: Path, key: str, rows: int, width: Optional[int]) -> Optional[torch.Tensor]:
    """The cached classifier (rows, width) fp32 on CPU; None when absent; None with a warning when unusable."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            if meta.get("key") != key:
                raise ValueError("its key does not match (hash prefix collision or a foreign file)")
            weight = fh.get_tensor("classifier")
        if weight.dtype != torch.float32 or weight.ndim != 2 or weight.shape[0] != rows or (
                width is not None and weight.shape[1] != width):
            raise ValueError(f"it holds {weight.dtype} {tuple(weight.shape)}, expected float32 ({rows}, {width})")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError("it holds NaN or Inf")
        return weight
    except Exception as err:  # corrupt, truncated, unreadable or foreign: recompute, never fail the build
        warnings.warn(f"ignoring the classifier cache file {path}: {type(err).__name__}: {err}; recomputing",
                      RuntimeWarning, stacklevel=3)
        return None


def _save_atomic(path: Path, weight: torch.Tensor, metadata: dict) -> None:
    """Readers see the old file or the complete new one, never a partial write (also with concurrent writers)."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"classifier": weight.detach().float().cpu().contiguous()}, metadata=metadata))


def cached_text_classifier(clip, tokenizer, class_names: Sequence[str], *, model_name: str,
                           pretrained: Optional[str], templates: Sequence[str] = TEMPLATES,
                           cache_dir: Union[None, bool, str, os.PathLike] = None, batch_size: int = 256,
                           progress: bool = True) -> torch.Tensor:
    """`text_classifier` through a disk cache: W (C, d) fp32 on CPU.

    model_name, pretrained: what `load_clip` built `clip` from; they key the cache (see
    `classifier_cache_key`). pretrained=None (random weights) is never cached. cache_dir: a folder;
    None: $SAGE_FAST_CACHE, else ~/.cache/sage-fast; False: no cache. A cache file that cannot be
    read or does not fit is ignored with a warning and rewritten; a cache that cannot be written is
    a warning, never an error.
    """
    folder = resolve_cache_dir(cache_dir)
    key = classifier_cache_key(model_name, pretrained, class_names, templates) if folder is not None else None
    path = _cache_path(folder, model_name, key) if key is not None else None
    if path is not None:
        weight = _load_cached(path, key, len(class_names), _classifier_width(clip))
        if weight is not None:
            return weight
    weight = text_classifier(clip, tokenizer, class_names, templates, batch_size=batch_size,
                             progress=progress).float().cpu()
    if path is not None:
        metadata = {"format": str(CACHE_FORMAT), "key": key, "model": str(model_name),
                    "classes": str(len(class_names)), "templates": str(len(templates))}
        try:
            _save_atomic(path, weight, metadata)
        except OSError as err:
            warnings.warn(f"could not write the classifier cache {path}: {err}", RuntimeWarning, stacklevel=2)
    return weight
