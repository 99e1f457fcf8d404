"""Datasets in their official layouts, patient-level splits and a decoded-image cache."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from cxr_demo.images import read_xray, resize_gray
from cxr_demo.labels import NIH14_LABELS, NIH_BOX_LABEL_ALIASES

log = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "images"


@dataclass
class Record:
    """One labelled image."""

    path: Path
    labels: np.ndarray  # multi-hot (multi-label) or one-hot (multi-class), float32, card order
    patient: str
    split: str  # "train_val" or "test"


def align_labels(dataset_labels: list[str], card_labels: list[str]) -> list[int]:
    """Indices that re-order a dataset's label columns to the card's order.

    Raises:
        ValueError: the two label sets differ (a silent mismatch would train the wrong head).
    """
    if set(dataset_labels) != set(card_labels) or len(dataset_labels) != len(card_labels):
        raise ValueError(
            f"dataset labels {sorted(dataset_labels)} do not match the card's {sorted(card_labels)}"
        )
    return [dataset_labels.index(name) for name in card_labels]


def nih_records(root: Path, labels: list[str] | None = None, images_dir: str = "images") -> list[Record]:
    """NIH ChestX-ray14 images present under ``root/images`` with official labels and split."""
    labels = list(labels or NIH14_LABELS)
    align_labels(list(NIH14_LABELS), labels)
    root = Path(root)
    present = {p.name for p in (root / images_dir).glob("*.png")}
    test = set((root / "test_list.txt").read_text().split())
    train_val = set((root / "train_val_list.txt").read_text().split())
    records = []
    with open(root / "Data_Entry_2017_v2020.csv", newline="") as f:
        for row in csv.DictReader(f):
            name = row["Image Index"]
            if name not in present:
                continue
            findings = set(row["Finding Labels"].split("|")) - {"No Finding"}
            unknown = findings - set(labels)
            if unknown:
                raise ValueError(f"{name}: labels {unknown} are not in the card's label set")
            y = np.array([1.0 if lab in findings else 0.0 for lab in labels], dtype=np.float32)
            split = "test" if name in test else "train_val" if name in train_val else None
            if split is None:
                raise ValueError(f"{name} is in neither official split list")
            records.append(Record(root / images_dir / name, y, row["Patient ID"], split))
    log.info("NIH: %d images found (%d test)", len(records), sum(r.split == "test" for r in records))
    return records


def nih_boxes(root: Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """Official boxes per image name: ``[(finding, (x, y, w, h) in the 1024 frame)]``."""
    out: dict[str, list] = defaultdict(list)
    with open(Path(root) / "BBox_List_2017.csv", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            name, finding = row[0], NIH_BOX_LABEL_ALIASES.get(row[1], row[1])
            out[name].append((finding, tuple(float(v) for v in row[2:6])))
    return dict(out)


NIH_BOX_FRAME = 1024.0


def nih_box_pairs(records: list[Record], boxes_by_image: dict, labels: list[str]) -> list[dict]:
    """One entry per (image, finding) with every official box of that finding, scaled from the 1024
    frame to the image's own size (the pixel frame the app reports boxes in)."""
    from PIL import Image

    pairs = []
    for i, rec in enumerate(records):
        boxes = boxes_by_image.get(rec.path.name)
        if not boxes:
            continue
        with Image.open(rec.path) as im:
            width, height = im.size
        sx, sy = width / NIH_BOX_FRAME, height / NIH_BOX_FRAME
        by_finding: dict[str, list] = defaultdict(list)
        for finding, (x, y, w, h) in boxes:
            by_finding[finding].append((x * sx, y * sy, w * sx, h * sy))
        for finding, truth in by_finding.items():
            if finding in labels:
                pairs.append({"index": i, "image": rec.path.name, "patient": rec.patient, "finding": finding,
                              "truth": truth, "width": width, "height": height})
    return pairs


def patient_split(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split records into train/validation so that no patient is in both."""
    groups = [r.patient for r in records]
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(records)), groups=groups))
    train, val = [records[i] for i in train_idx], [records[i] for i in val_idx]
    assert not {r.patient for r in train} & {r.patient for r in val}
    return train, val


def cached_pixels(
    records: list[Record], size: int, crop: tuple[float, float, float, float] | None = None, cache_dir: Path | None = None
) -> np.ndarray:
    """Decoded, cropped, resized images as a (N, size, size) uint8 array, cached on disk.

    The cache key covers the file list, size and crop, so a change of any of them re-decodes.
    """
    cache_dir = Path(cache_dir or os.environ.get("CXR_TRAIN_CACHE") or DEFAULT_CACHE)
    key = hashlib.sha256(repr(([str(r.path) for r in records], size, crop)).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.npy"
    if path.exists():
        arr = np.load(path)
        if arr.shape == (len(records), size, size):
            return arr
    arr = np.empty((len(records), size, size), dtype=np.uint8)
    for i, r in enumerate(records):
        arr[i] = np.clip(np.rint(resize_gray(read_xray(r.path).pixels, size, crop) * 255), 0, 255)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr
