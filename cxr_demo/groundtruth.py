"""Ground-truth boxes: the official NIH box list (matched by file name) or boxes a user types."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

from cxr_demo.explain import Box
from cxr_demo.labels import NIH_BOX_LABEL_ALIASES

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
NIH_BOX_FRAME = 1024.0


class BoxInputError(ValueError):
    """A typed box cannot be parsed."""


def bbox_csv_path() -> Path | None:
    """``CXR_DEMO_BBOX_CSV`` or ``../shared/data/nih14/BBox_List_2017.csv`` when present."""
    env = os.environ.get("CXR_DEMO_BBOX_CSV")
    path = Path(env) if env else DEFAULT_DATA / "nih14" / "BBox_List_2017.csv"
    if path.is_dir():
        path = path / "BBox_List_2017.csv"
    return path if path.is_file() else None


@lru_cache(maxsize=4)
def _read_box_csv(path: Path) -> dict[str, list[tuple[str, Box]]]:
    boxes: dict[str, list] = defaultdict(list)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for row in reader:
            if len(row) < 6:
                continue
            finding = NIH_BOX_LABEL_ALIASES.get(row[1], row[1])
            boxes[row[0]].append((finding, tuple(float(v) for v in row[2:6])))
    log.info("read %d boxed images from %s", len(boxes), path)
    return dict(boxes)


def boxed_image_names(path: Path) -> list[str]:
    """Sorted names of the images that have at least one box in an NIH-format box list."""
    return sorted(_read_box_csv(path))


def nih_boxes_for(file_name: str, width: int, height: int, path: Path | None = None) -> list[tuple[str, Box]]:
    """Official boxes of an image, matched by its file name, scaled from the 1024 frame to the image."""
    path = path or bbox_csv_path()
    if path is None:
        return []
    found = _read_box_csv(path).get(Path(file_name).name, [])
    sx, sy = width / NIH_BOX_FRAME, height / NIH_BOX_FRAME
    return [(f, (x * sx, y * sy, w * sx, h * sy)) for f, (x, y, w, h) in found]


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"


def parse_boxes(text: str | None, width: int, height: int) -> list[Box]:
    """Parse typed boxes ``"x, y, w, h"`` (several separated by ``;``) or JSON ``[[x,y,w,h], ...]``.

    Raises:
        BoxInputError: the text is not boxes, or a box is empty or outside the image.
    """
    if text is None or not str(text).strip():
        return []
    text = str(text).strip()
    values: list[list[float]]
    if text.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BoxInputError("The ground-truth box is not valid JSON; write it as x, y, w, h.") from e
        if data and all(isinstance(v, int | float) for v in data):
            data = [data]
        if not (isinstance(data, list) and all(isinstance(b, list) and len(b) == 4 for b in data)):
            raise BoxInputError("Each ground-truth box needs exactly four numbers: x, y, w, h.")
        try:
            values = [[float(v) for v in b] for b in data]
        except (TypeError, ValueError) as e:
            raise BoxInputError("Each ground-truth box needs exactly four numbers: x, y, w, h.") from e
    else:
        values = []
        for part in text.split(";"):
            if not part.strip():
                continue
            m = re.fullmatch(_NUM + "," + _NUM + "," + _NUM + "," + _NUM, part)
            if not m:
                raise BoxInputError(
                    f"Could not read the ground-truth box {part.strip()[:40]!r}; write it as x, y, w, h in image "
                    "pixels (several boxes separated by ';')."
                )
            values.append([float(v) for v in m.groups()])
    boxes: list[Box] = []
    for x, y, w, h in values:
        if w <= 0 or h <= 0:
            raise BoxInputError("A ground-truth box must have a positive width and height.")
        if x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
            raise BoxInputError(
                f"The ground-truth box ({x:g}, {y:g}, {w:g}, {h:g}) lies outside the {width} x {height} image."
            )
        boxes.append((x, y, w, h))
    return boxes
