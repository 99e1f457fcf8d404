"""Ground truth and examples: the official NIH box list (matched by file name), boxes a user types, and
the example films the app offers."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections import defaultdict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from cxr_demo.images import IMAGE_SUFFIXES
from cxr_demo.labels import NIH_BOX_LABEL_ALIASES
from cxr_demo.paths import PROJECT_ROOT, data_root

if TYPE_CHECKING:  # the alias only; importing cxr_demo.boxes would pull in scipy
    from cxr_demo.boxes import Box

log = logging.getLogger(__name__)

NIH_BOX_FILE = "BBox_List_2017.csv"
NIH_BOX_FRAME = 1024.0  # the official boxes are in the 1024 x 1024 frame of the released PNGs
# Example films shipped with the app (python -m training.make_examples): NIH test images, their official
# boxes (same format, 1024 frame) and labels, so the Space and the Docker image have examples and box IoU.
EXAMPLES_DIR = PROJECT_ROOT / "examples"


class BoxInputError(ValueError):
    """A typed box cannot be parsed."""


def nih_folder() -> Path:
    """The NIH ChestX-ray14 folder of the shared data (official layout)."""
    return data_root() / "nih14"


def bbox_csv_path() -> Path | None:
    """``CXR_DEMO_BBOX_CSV``, else the shared data's ``nih14/BBox_List_2017.csv``, else the shipped examples'
    box list (the boxes of the example films only), whichever exists first."""
    env = os.environ.get("CXR_DEMO_BBOX_CSV")
    candidates = [Path(env)] if env else [nih_folder() / NIH_BOX_FILE, EXAMPLES_DIR / NIH_BOX_FILE]
    for path in candidates:
        if path.is_dir():
            path = path / NIH_BOX_FILE
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=4)
def read_box_list(path: Path) -> dict[str, list[tuple[str, Box]]]:
    """An NIH-format box list: per image name, ``[(finding, (x, y, w, h) in the 1024 frame)]``, with the
    box file's ``Infiltrate`` spelt as the label table's ``Infiltration``."""
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


def scale_boxes(boxes: list[tuple[str, Box]], width: int, height: int) -> list[tuple[str, Box]]:
    """Official boxes from the 1024 frame to an image of ``width`` x ``height`` pixels."""
    sx, sy = width / NIH_BOX_FRAME, height / NIH_BOX_FRAME
    return [(f, (x * sx, y * sy, w * sx, h * sy)) for f, (x, y, w, h) in boxes]


def _lookup(boxes: dict[str, list], file_name: str) -> list:
    """An image's official boxes by file name, whatever its extension (``00013118_008.jpg`` or ``.dcm`` finds
    the boxes of ``00013118_008.png``)."""
    name = Path(file_name).name
    return boxes.get(name) or boxes.get(Path(name).stem + ".png", [])


def nih_boxes_for(file_name: str, width: int, height: int, path: Path | None = None) -> list[tuple[str, Box]]:
    """Official boxes of an image, matched by its file name (any extension), scaled from the 1024 frame."""
    path = path or bbox_csv_path()
    if path is None or not file_name:
        return []
    return scale_boxes(_lookup(read_box_list(path), file_name), width, height)


def boxed_findings(file_name: str) -> list[str]:
    """Findings the NIH box list has boxes for on this file name (sorted; empty when none)."""
    path = bbox_csv_path()
    if not file_name or path is None:
        return []
    return sorted({f for f, _ in _lookup(read_box_list(path), file_name)})


def default_examples(folder: str | Path | None = None) -> list[str]:
    """Example images: every image in ``folder``, ``CXR_DEMO_EXAMPLES`` or the shipped ``examples/``, in the
    order of the folder's ``labels.csv`` when it has one, else those with radiologist boxes first."""
    folder = Path(folder or os.environ.get("CXR_DEMO_EXAMPLES") or EXAMPLES_DIR)
    if not folder.is_dir():
        return []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    listed: list[str] = []
    if (folder / "labels.csv").is_file():
        with open(folder / "labels.csv", newline="") as f:
            listed = [row.get("Image Index", "") for row in csv.DictReader(f)]
    rank = {name: i for i, name in enumerate(listed)}
    return [str(p) for p in sorted(images, key=lambda p: (rank.get(p.name, len(rank)), not boxed_findings(p.name)))]


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
MAX_TYPED_BOXES = 20  # a person types a few boxes; more is not ground truth but load
MAX_BOX_TEXT = 2000  # characters: 20 boxes of four numbers fit with room to spare
MIN_BOX_SIDE = 1.0  # pixels


def _box_values(text: str) -> list[list[float]]:
    """The numbers of typed boxes, from JSON ``[x,y,w,h]`` / ``[[x,y,w,h], ...]`` or ``x, y, w, h; ...``.

    The text is bounded before parsing (length, nesting), so no input makes the parser recurse deeply.
    """
    if text.startswith("["):
        depth = 0
        for ch in text:  # nesting checked by counting, before json (which recurses) sees the text
            depth += ch == "["
            depth -= ch == "]"
            if depth > 2:
                raise BoxInputError("Write each ground-truth box as [x, y, w, h], several as [[x, y, w, h], ...].")
        try:
            data = json.loads(text, parse_constant=lambda c: float("nan"))
        except (json.JSONDecodeError, RecursionError) as e:
            raise BoxInputError("The ground-truth box is not valid JSON; write it as x, y, w, h.") from e
        if isinstance(data, list) and data and not any(isinstance(v, list) for v in data):
            data = [data]
        if not (isinstance(data, list) and all(isinstance(b, list) and len(b) == 4 for b in data)):
            raise BoxInputError("Each ground-truth box needs exactly four numbers: x, y, w, h.")
        if any(isinstance(v, bool) or not isinstance(v, int | float) for b in data for v in b):
            raise BoxInputError("Each ground-truth box needs exactly four numbers: x, y, w, h.")
        return [[float(v) for v in b] for b in data]
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
    return values


def parse_boxes(text: str | None, width: int, height: int) -> list[Box]:
    """Parse typed boxes ``"x, y, w, h"`` (several separated by ``;``) or JSON ``[[x,y,w,h], ...]``.

    At most :data:`MAX_TYPED_BOXES` boxes in at most :data:`MAX_BOX_TEXT` characters; every number finite,
    every side at least one pixel, every box inside the image.

    Raises:
        BoxInputError: the text is not boxes, or a box is empty, too small, not finite or outside the image.
    """
    if text is None or not str(text).strip():
        return []
    text = str(text).strip()
    if len(text) > MAX_BOX_TEXT:
        raise BoxInputError(f"Too much ground-truth text: type at most {MAX_TYPED_BOXES} boxes as x, y, w, h.")
    values = _box_values(text)
    if len(values) > MAX_TYPED_BOXES:
        raise BoxInputError(f"Type at most {MAX_TYPED_BOXES} ground-truth boxes (got {len(values)}).")
    boxes: list[Box] = []
    for x, y, w, h in values:
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise BoxInputError("A ground-truth box holds a value that is not a finite number.")
        if w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:
            raise BoxInputError("A ground-truth box must be at least one pixel wide and high.")
        if x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
            raise BoxInputError(
                f"The ground-truth box ({x:g}, {y:g}, {w:g}, {h:g}) lies outside the {width} x {height} image."
            )
        boxes.append((x, y, w, h))
    return boxes
