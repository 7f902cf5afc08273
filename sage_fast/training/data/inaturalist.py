"""iNaturalist 2018's annotation files: ``train2018.json`` / ``val2018.json`` and ``categories.json``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple


def read_inat_json(path) -> Tuple[List[Tuple[str, int]], Dict[int, str]]:
    """iNaturalist 2018 official JSON -> ([(file_name, category_id)], {category_id: name})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"iNaturalist annotation file not found: {path}")
    with open(path) as f:
        d = json.load(f)
    try:
        files = {im["id"]: im["file_name"] for im in d["images"]}
        samples = [(files[a["image_id"]], int(a["category_id"])) for a in d["annotations"]]
        cats = {int(c["id"]): str(c["name"]) for c in d.get("categories", [])}
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not in the iNaturalist format (images / annotations / categories): {e}") from None
    return samples, cats


def read_inat_categories(path) -> Dict[int, str]:
    """iNaturalist's ``categories.json`` (a list of ``{"id", "name", ...}``) -> {category_id: name}."""
    path = Path(path)
    try:
        return {int(c["id"]): str(c["name"]) for c in json.loads(path.read_text())}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an iNaturalist categories list ([{{'id': ..., 'name': ...}}]): {e}") from None
