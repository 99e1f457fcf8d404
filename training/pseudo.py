"""Unlabelled adult chest films with soft labels from a teacher model of the zoo (semi-supervised training,
``training.train --pseudo-labels TEACHER``).

Which films: adult frontal radiographs that are not NIH images, so none can be an NIH official-test film:

- ``lungseg``: the 464 films of ``lungseg/images`` (Montgomery and Shenzhen tuberculosis screening sets and the
  COVID-19 image data collection); their masks are not used here;
- ``covid19``: the 700 films of ``covid19/COVID``. The database's ``Normal`` folder is never used: most of
  those are renamed NIH films whose official split is unknown.

The soft label of a film is the teacher's *calibrated* probability per finding (the card's Platt maps fitted on
validation), so it is on the scale of a 0/1 label; the teacher must have been trained with the student's
train/validation split, so the student's validation films stay unseen by everything that shaped its targets.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from cxr_demo.calibration import calibrate
from cxr_demo.card import read_card
from cxr_demo.inference import predict_array
from cxr_demo.zoo import load_checkpoint
from training.data import Record, cached_pixels, split_seed

log = logging.getLogger(__name__)

UNLABELLED_SOURCES = ("lungseg", "covid19")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def unlabelled_records(data_root: Path, sources: tuple[str, ...] | list[str], n_labels: int) -> list[Record]:
    """Records of the unlabelled films of ``sources`` (labels all NaN until a teacher fills them), in a fixed
    order; ``patient`` is prefixed by the source so that it never collides with an NIH patient id."""
    data_root = Path(data_root)
    unknown = set(sources) - set(UNLABELLED_SOURCES)
    if unknown:
        raise ValueError(f"unknown unlabelled sources {sorted(unknown)}; choose from {UNLABELLED_SOURCES}")
    empty = np.full(n_labels, np.nan, np.float32)
    out: list[Record] = []
    if "lungseg" in sources:
        folder = data_root / "lungseg"
        with open(folder / "manifest.csv", newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: r["name"])
        for row in rows:
            path = folder / "images" / f"{row['name']}.png"
            if path.exists():
                out.append(Record(path, empty.copy(), f"lungseg:{row['source']}:{row['patient_id']}", "unlabelled"))
    if "covid19" in sources:
        for path in sorted((data_root / "covid19" / "COVID").iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                out.append(Record(path, empty.copy(), f"covid19:{path.stem}", "unlabelled"))
    if not out:
        raise FileNotFoundError(f"no unlabelled films of {list(sources)} under {data_root}")
    return out


def check_teacher(teacher: Path, task: str, label_names: list[str], val_fraction: float, seed_of_split: int) -> None:
    """Refuse a teacher that does not fit the student: another task or label order, or another train/validation
    split (it could have trained on the student's validation films)."""
    card = read_card(teacher)
    if card.task != task or list(card.label_names) != list(label_names):
        raise SystemExit(f"teacher {card.name} is a {card.task} model with other labels; the student is {task}")
    training = card.training or {}
    teacher_fraction = training.get("val_fraction", 0.15)
    if split_seed(training) != seed_of_split or abs(float(teacher_fraction) - val_fraction) > 1e-9:
        raise SystemExit(f"teacher {card.name} was trained on another train/validation split (seed "
                         f"{split_seed(training)}, fraction {teacher_fraction}) than the student's "
                         f"({seed_of_split}, {val_fraction}); it may have seen the student's validation films")


def teacher_labels(teacher: Path, records: list[Record]) -> np.ndarray:
    """The teacher's calibrated probabilities (N, K) for ``records``, as the app computes them before
    thresholds (same preprocessing, the checkpoint loaded and sha256-checked like the app's)."""
    card = read_card(teacher)
    model = load_checkpoint(Path(teacher)).eval()
    pixels = cached_pixels(records, card.input_size, card.crop)
    raw = predict_array(model, pixels, card.mean, card.std, card.task_kind)
    soft = calibrate(card, raw).astype(np.float32)
    log.info("teacher %s labelled %d films; mean soft label per finding %s", card.name, len(records),
             np.round(soft.mean(0), 3).tolist())
    return soft


def with_soft_labels(records: list[Record], soft: np.ndarray) -> list[Record]:
    """Copies of ``records`` carrying the teacher's soft labels."""
    return [Record(r.path, soft[i].astype(np.float32), r.patient, r.split) for i, r in enumerate(records)]
