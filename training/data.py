"""Datasets in their official layouts, patient-level splits and a decoded-image cache."""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit

from cxr_demo.groundtruth import NIH_BOX_FILE, read_box_list, scale_boxes
from cxr_demo.images import read_xray
from cxr_demo.inference import prepare_pixels
from cxr_demo.labels import NIH14_LABELS
from cxr_demo.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

DEFAULT_CACHE = PROJECT_ROOT / ".cache" / "images"


def add_data_root_argument(parser: argparse.ArgumentParser) -> None:
    """``--data-root`` for the training commands (default: ``cxr_demo.paths.data_root()``)."""
    parser.add_argument("--data-root", type=Path, default=None,
                        help="the shared data folder (default: CXR_DEMO_DATA_ROOT or ../shared/data)")


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


NIH_64PX_DIR = "images-64px"  # official films that exist here only at 64 x 64


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
    """Official boxes per image name under an NIH folder: ``[(finding, (x, y, w, h) in the 1024 frame)]``."""
    return read_box_list(Path(root) / NIH_BOX_FILE)


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
        by_finding: dict[str, list] = defaultdict(list)
        for finding, box in scale_boxes(boxes, width, height):
            by_finding[finding].append(box)
        for finding, truth in by_finding.items():
            if finding in labels:
                pairs.append({"index": i, "image": rec.path.name, "patient": rec.patient, "finding": finding,
                              "truth": truth, "width": width, "height": height})
    return pairs


def study_halves(pairs: list[dict], seed: int = 0) -> dict[str, list[int]]:
    """Pair indices of the ``select`` and ``report`` halves: the boxed images split 50/50 by patient."""
    images = sorted({p["image"] for p in pairs})
    patient_of = {p["image"]: p["patient"] for p in pairs}
    split = GroupShuffleSplit(n_splits=1, test_size=0.5, random_state=seed)
    sel_idx, rep_idx = next(split.split(images, groups=[patient_of[n] for n in images]))
    half_of = {images[i]: "select" for i in sel_idx} | {images[i]: "report" for i in rep_idx}
    assert not {patient_of[images[i]] for i in sel_idx} & {patient_of[images[i]] for i in rep_idx}
    return {h: [i for i, p in enumerate(pairs) if half_of[p["image"]] == h] for h in ("select", "report")}


def split_seed(training: dict) -> int:
    """The seed of a card's train/validation split (``training.train --split-seed``; older cards and runs without
    it split with the training seed)."""
    return int(training.get("split_seed", training.get("seed", 0)))


def patient_split(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split records into train/validation so that no patient is in both."""
    groups = [r.patient for r in records]
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(records)), groups=groups))
    train, val = [records[i] for i in train_idx], [records[i] for i in val_idx]
    assert not {r.patient for r in train} & {r.patient for r in val}
    return train, val


def cached_array(records: list[Record], size: int, key: tuple, fill: Callable[[], np.ndarray],
                 cache_dir: Path | None = None) -> np.ndarray:
    """A (N, size, size) array per film, cached on disk under a key of the file list and ``key``; ``fill()`` makes
    it when the cache has none (written atomically, so an interrupted run leaves no half file)."""
    cache_dir = Path(cache_dir or os.environ.get("CXR_TRAIN_CACHE") or DEFAULT_CACHE)
    digest = hashlib.sha256(repr(([str(r.path) for r in records], *key)).encode()).hexdigest()[:20]
    path = cache_dir / f"{digest}.npy"
    if path.exists():
        arr = np.load(path)
        if arr.shape == (len(records), size, size):
            return arr
    arr = fill()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def cached_pixels(
    records: list[Record], size: int, crop: tuple[float, float, float, float] | None = None, cache_dir: Path | None = None
) -> np.ndarray:
    """Decoded, cropped, resized images as a (N, size, size) uint8 array, cached on disk.

    The cache key covers the file list, size and crop, so a change of any of them re-decodes.
    """
    def fill() -> np.ndarray:
        arr = np.empty((len(records), size, size), dtype=np.uint8)
        for i, r in enumerate(records):
            arr[i] = prepare_pixels(read_xray(r.path).pixels, size, crop)
        return arr

    return cached_array(records, size, (size, crop), fill, cache_dir)


# --- paediatric pneumonia (Kermany et al. 2018) -------------------------------------------------

KERMANY_LABELS = {
    "kermany2": ["Normal", "Pneumonia"],
    "kermany3": ["Normal", "Bacterial pneumonia", "Viral pneumonia"],
}


def kermany_patient(name: str) -> str:
    """Patient id from a Kermany file name: ``person123_bacteria_4.jpeg`` -> ``person123``,
    ``IM-0115-0001.jpeg`` -> ``IM-0115``, ``NORMAL2-IM-0012-0001.jpeg`` -> ``NORMAL2-IM-0012``."""
    stem = Path(name).stem
    if stem.startswith("person"):
        return stem.split("_")[0]
    return stem.rsplit("-", 1)[0]


def kermany_class(name: str, folder: str) -> str:
    """``Normal``, ``Bacterial pneumonia`` or ``Viral pneumonia`` from the folder and the file name."""
    if folder == "NORMAL":
        return "Normal"
    lowered = name.lower()
    if "virus" in lowered:
        return "Viral pneumonia"
    if "bacteria" in lowered:
        return "Bacterial pneumonia"
    raise ValueError(f"{name}: a PNEUMONIA image whose name says neither bacteria nor virus")


def _one_hot(label: str, labels: list[str]) -> np.ndarray:
    y = np.zeros(len(labels), dtype=np.float32)
    y[labels.index(label)] = 1.0
    return y


def kermany_records(root: Path, task: str) -> list[Record]:
    """Kermany ``train``/``test`` folders as records (split ``train_val`` / ``test``) for ``kermany2`` or
    ``kermany3``."""
    labels = KERMANY_LABELS[task]
    records = []
    for split_dir, split in (("train", "train_val"), ("test", "test")):
        for folder in ("NORMAL", "PNEUMONIA"):
            for path in sorted((Path(root) / split_dir / folder).glob("*.jpeg")):
                cls = kermany_class(path.name, folder)
                if task == "kermany2":
                    cls = "Normal" if cls == "Normal" else "Pneumonia"
                records.append(Record(path, _one_hot(cls, labels), f"kermany:{kermany_patient(path.name)}", split))
    log.info("Kermany (%s): %d images (%d test)", task, len(records), sum(r.split == "test" for r in records))
    return records


# --- COVID-19 / normal / viral pneumonia --------------------------------------------------------

COVID_LABELS = ["COVID-19", "Normal", "Viral pneumonia"]


def covid_records(covid_root: Path, kermany_root: Path, test_fraction: float = 0.2, seed: int = 0) -> list[Record]:
    """COVID-19 Radiography Database COVID and Normal images plus Kermany viral pneumonia, as in the
    source study. The database has no patient ids or official split: each image is its own group and
    a seeded ``test_fraction`` is held out as ``test``; Kermany viral images keep Kermany's own split."""
    records = []
    for folder, cls in (("COVID", "COVID-19"), ("Normal", "Normal")):
        paths = sorted((Path(covid_root) / folder).glob("*.jpg"))
        rng = np.random.default_rng(seed)
        test_idx = set(rng.choice(len(paths), int(round(test_fraction * len(paths))), replace=False).tolist())
        for i, path in enumerate(paths):
            records.append(Record(path, _one_hot(cls, COVID_LABELS), f"covid:{path.stem}",
                                  "test" if i in test_idx else "train_val"))
    for r in kermany_records(kermany_root, "kermany3"):
        if r.labels[KERMANY_LABELS["kermany3"].index("Viral pneumonia")]:
            records.append(Record(r.path, _one_hot("Viral pneumonia", COVID_LABELS), r.patient, r.split))
    log.info("COVID-19 task: %d images (%d test)", len(records), sum(r.split == "test" for r in records))
    return records


# --- CheXpert-style CSV ---------------------------------------------------------------------------

UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")


def chexpert_records(csv_path: Path, labels: list[str], uncertain: str = "zeros",
                     image_root: Path | None = None) -> list[Record]:
    """Records from a CheXpert-style CSV (``Path`` column, one column per finding with 1 / 0 / -1 /
    blank). Uncertain (-1) labels become 0 (``zeros``, U-Zeros), 1 (``ones``, U-Ones) or NaN
    (``ignore``: masked out of the loss); blank means not mentioned, i.e. 0. The patient id is the
    ``patientNNNNN`` path component. Every record is ``train_val``: CheXpert's own test set is separate.

    Raises:
        ValueError: a finding of ``labels`` has no column, or an unknown policy / label value.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, not {uncertain!r}")
    csv_path = Path(csv_path)
    image_root = Path(image_root) if image_root else csv_path.parent
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [lab for lab in labels if lab not in (reader.fieldnames or [])]
        if missing or "Path" not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path}: no column for {missing or ['Path']}")
        records = []
        for row in reader:
            y = np.zeros(len(labels), dtype=np.float32)
            for j, lab in enumerate(labels):
                raw = row[lab].strip()
                value = float(raw) if raw else 0.0
                if value == -1.0:
                    value = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[uncertain]
                elif value not in (0.0, 1.0):
                    raise ValueError(f"{csv_path}: {row['Path']} has {lab}={raw!r}; expected 1, 0, -1 or blank")
                y[j] = value
            parts = Path(row["Path"]).parts
            patient = next((p for p in parts if p.startswith("patient")), row["Path"])
            records.append(Record(image_root / row["Path"], y, f"chexpert:{patient}", "train_val"))
    return records
