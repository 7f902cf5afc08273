"""Token ids of the classifier's prompts (every class name in every template), fast and exact.

open_clip's `SimpleTokenizer` spends 40 to 100 us on a prompt (ftfy's cleaning, the regex, BPE): half
a minute for iNaturalist's 8,142 classes x 60 templates. The prompts share their parts, so
`tokenize_prompts` tokenises each template's text before and after ``{}`` once, each class name once,
and splices the ids: ``[sot] + pre + name + post + [eot]``, cut to the context as the tokenizer cuts
(the last id becomes eot).

That gives the tokenizer's ids exactly when no step of it looks across a seam, which holds when:

* every part is *plain*: printable ASCII (0x20 to 0x7e) without ``&`` and ``<``. On such text ftfy
  changes nothing (its encoding fix returns ASCII unchanged, and every other fixer acts on non-ASCII
  characters, control characters, ``&`` entities or ``\\r``), nor does ``html.unescape`` (no ``&``);
  whitespace cleaning only changes runs of spaces, which end tokens whatever their length, and
  lower-casing is per character; no special token (``<start_of_text>``) can appear;
* the regex's tokens (letter runs, single digits, runs of other characters, contractions such as
  ``'s``) cannot run across a seam: the text before ``{}`` is empty or ends with a space, and the
  text after it is empty or starts with a space, or the name is empty, or its last character and the
  next one are of different kinds (letter, digit, other) and the name does not end with ``'``
  (``'`` + ``s`` would be the contraction ``'s``). Digits are single tokens, so two digits never join.

BPE then sees the same regex tokens, and BPE is a function of the token alone. A class name or a
template that is not plain (unicode, ``&amp;``, ...), or a seam that could join, takes the tokenizer
itself for those prompts; so does a tokenizer other than open_clip's `SimpleTokenizer` with its
default cleaning. tests/model/test_prompt_tokens.py checks the ids against the tokenizer on all 60
templates, and on random names and templates.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .templates import TEMPLATES, prompt_name

_PLAIN = re.compile(r"[\x20-\x25\x27-\x3b\x3d-\x7e]*")   # printable ASCII without & (0x26) and < (0x3c)


def _kind(ch: str) -> str:
    return "L" if ch.isalpha() else "N" if ch.isdigit() else "P"


def splices(tokenizer) -> bool:
    """Whether `tokenize_prompts` may splice for this tokenizer: open_clip's `SimpleTokenizer` with
    lower-case cleaning and plain truncation."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError:
        return False
    return (type(tokenizer) is SimpleTokenizer and getattr(tokenizer, "clean_fn", None) is _clean_lower
            and getattr(tokenizer, "reduction_fn", None) is None and bool(tokenizer.context_length))


def _template_parts(template: str) -> Optional[Tuple[str, str]]:
    """(pre, post) of a template whose one ``{}`` splits it into plain text with a clean seam; else None."""
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        return None
    pre, post = template.split("{}")
    if not (_PLAIN.fullmatch(pre) and _PLAIN.fullmatch(post)) or (pre and pre[-1] != " "):
        return None
    return pre, post


def _joins(name: str, post: str) -> bool:
    """Whether the regex could read the name's end and the post text as one token."""
    if not name or not post or post[0] == " ":
        return False
    return name[-1] == "'" or _kind(name[-1]) == _kind(post[0])


def tokenize_prompts(tokenizer, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES,
                     start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
    """Token ids (n, context) int64 of the prompts ``start:stop`` of ``[t.format(name) for name in
    class_names for t in templates]`` (`prompts_for`'s names and order), the same as
    ``tokenizer(prompts[start:stop])``."""
    total = len(class_names) * len(templates)
    stop = total if stop is None else min(stop, total)
    start = max(0, min(start, stop))
    if start == stop:
        return tokenizer([""])[:0]
    if not splices(tokenizer):
        prompts = [templates[i % len(templates)].format(prompt_name(class_names[i // len(templates)]))
                   for i in range(start, stop)]
        return tokenizer(prompts)
    ctx = tokenizer.context_length
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    parts = [_template_parts(t) for t in templates]
    part_ids = [(tokenizer.encode(p[0]), tokenizer.encode(p[1])) if p else None for p in parts]
    out = np.zeros((stop - start, ctx), dtype=np.int64)
    slow: List[Tuple[int, str]] = []                     # (row, prompt) for the tokenizer itself
    current, name, name_ids = -1, "", None
    for row, i in enumerate(range(start, stop)):
        c, t = divmod(i, len(templates))
        if c != current:
            current, name = c, prompt_name(class_names[c])
            name_ids = tokenizer.encode(name) if _PLAIN.fullmatch(name) else None
        ids = part_ids[t]
        if name_ids is None or ids is None or _joins(name, parts[t][1]):
            slow.append((row, templates[t].format(name)))
            continue
        tokens = [sot, *ids[0], *name_ids, *ids[1], eot]
        if len(tokens) > ctx:
            tokens = tokens[:ctx]
            tokens[-1] = eot
        out[row, :len(tokens)] = tokens
    if slow:
        out[[r for r, _ in slow]] = tokenizer([p for _, p in slow]).numpy()
    return torch.from_numpy(out)
