"""iNaturalist 2018's annotation files: ``train2018.json`` / ``val2018.json`` and ``categories.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from ..errors import UserError
from .split_files import SampleList
from .text_files import read_text


def _load_json(path: Path, what: str):
    text = read_text(path, f"{what} file")  # JSON is UTF-8 (RFC 8259), whatever the locale
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not a valid {what} JSON file ({e})") from None


def read_inat_json(path) -> Tuple[SampleList, Dict[int, str]]:
    """iNaturalist 2018 official JSON -> ([(file_name, category_id)], {category_id: name}).

    The samples are a `SampleList`: an error about one names its annotation id and image id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"iNaturalist annotation file not found: {path}")
    d = _load_json(path, "iNaturalist annotation")
    try:
        files = {im["id"]: im["file_name"] for im in d["images"]}
        anns = d["annotations"]
        cats = {int(c["id"]): str(c["name"]) for c in d.get("categories", [])}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not in the iNaturalist format (images / annotations / categories): "
                        f"{type(e).__name__} {e}") from None
    samples, ann_ids, image_ids = [], [], []
    for n, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a:
            raise UserError(f"{path}, annotation #{n}: expected an object with an image_id and a category_id, got {a!r}")
        place = f"{path}, annotation {a.get('id', f'#{n}')}"
        image_id = a["image_id"]
        try:
            file_name = files[image_id]
        except (KeyError, TypeError):
            raise UserError(f"{place}: image_id {image_id!r} is not among the file's images") from None
        try:
            label = int(a["category_id"])
        except (TypeError, ValueError):
            raise UserError(f"{place} (image_id {image_id}): category_id {a['category_id']!r} is not an integer") from None
        samples.append((file_name, label))
        ann_ids.append(a.get("id", -1))
        image_ids.append(image_id)
    ann_of = np.asarray(ann_ids, dtype=object if any(not isinstance(x, int) for x in ann_ids) else np.int64)
    img_of = np.asarray(image_ids, dtype=object if any(not isinstance(x, int) for x in image_ids) else np.int64)
    out = SampleList(samples, path, lambda i: f"annotation {ann_of[i]} (image_id {img_of[i]})", sep=", ")
    return out, cats


def read_inat_categories(path) -> Dict[int, str]:
    """iNaturalist's ``categories.json`` (a list of ``{"id", "name", ...}``) -> {category_id: name}."""
    path = Path(path)
    d = _load_json(path, "categories")
    try:
        return {int(c["id"]): str(c["name"]) for c in d}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not an iNaturalist categories list ([{{'id': ..., 'name': ...}}]): {e}") from None
