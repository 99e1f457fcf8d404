"""The tasks the zoo trains: records, label order, head kind and data description of each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_demo import paths
from cxr_demo.labels import NIH14_LABELS
from training.data import (
    COVID_LABELS,
    KERMANY_LABELS,
    Record,
    chexpert_records,
    covid_records,
    kermany_records,
    nih_records,
    patient_split,
)

TASKS = ("nih14", "kermany2", "kermany3", "covid3", "chexpert", "pretrain")
# In-domain pretraining: NIH findings and Kermany classes as one multi-task head; each image is labelled
# only for its own data set (the other columns are unknown, NaN, and masked out of the loss).
PRETRAIN_LABELS = (*NIH14_LABELS, "Paediatric normal", "Paediatric bacterial pneumonia", "Paediatric viral pneumonia")
# The fixed lung-region crop of the paediatric pneumonia study: 15-90% of the height, 20-80% of the width.
LUNG_CROP = (0.15, 0.90, 0.20, 0.80)
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)


@dataclass
class TaskData:
    """Records of one task (split ``train_val`` / ``test``), the card label order and the head kind."""

    records: list[Record]
    label_names: list[str]
    task_kind: str
    data_source: str
    license: str
    test_description: str

    @property
    def train_val(self) -> list[Record]:
        return [r for r in self.records if r.split == "train_val"]

    @property
    def test(self) -> list[Record]:
        return [r for r in self.records if r.split == "test"]


def pretrain_records(data_root: Path, nih_val_fraction: float = 0.15, seed: int = 0) -> list[Record]:
    """Every chest X-ray we hold that may be pretrained on before NIH fine-tuning: the NIH train_val images
    *outside* the validation patients of an NIH fine-tune with the same split settings (so pretraining
    never sees the images that fine-tuning selects on) and the Kermany training images. NIH test images
    are never included. COVID-19 database images are left out: its "Normal" images are renamed NIH
    images whose official split is unknown, so they could be NIH test images."""
    nih = [r for r in nih_records(Path(data_root) / "nih14") if r.split == "train_val"]
    nih_train, _ = patient_split(nih, nih_val_fraction, seed)
    k = len(KERMANY_LABELS["kermany3"])
    out = [Record(r.path, np.concatenate([r.labels, np.full(k, np.nan, np.float32)]), f"nih:{r.patient}", "train_val")
           for r in nih_train]
    out += [Record(r.path, np.concatenate([np.full(len(NIH14_LABELS), np.nan, np.float32), r.labels]), r.patient, "train_val")
            for r in kermany_records(Path(data_root) / "kermany", "kermany3") if r.split == "train_val"]
    return out


def load_task(task: str, data_root: Path | None = None, chexpert_csv: Path | None = None, uncertain: str = "zeros") -> TaskData:
    """Records of ``task`` under ``data_root`` (the layout of ``../shared/data``).

    Raises:
        ValueError: unknown task, or ``chexpert`` without a CSV.
    """
    data_root = Path(data_root) if data_root is not None else paths.data_root()
    if task == "nih14":
        return TaskData(
            nih_records(data_root / "nih14"), list(NIH14_LABELS), "multilabel",
            "NIH ChestX-ray14 (Wang et al. 2017): official train_val images present in ../shared/data/nih14/images "
            "(384 px copies), patient-level train/validation split",
            "CC0-1.0 weights; data: NIH Clinical Center terms (cite Wang et al., CVPR 2017)",
            "NIH ChestX-ray14 official test list, images present in ../shared/data/nih14/images",
        )
    if task in KERMANY_LABELS:
        return TaskData(
            kermany_records(data_root / "kermany", task), list(KERMANY_LABELS[task]), "multiclass",
            "Paediatric pneumonia (Kermany et al., Cell 2018): the train folder of ../shared/data/kermany "
            "(224 px JPEG), patient-level train/validation split; bacterial vs viral read from the file names",
            "CC-BY-4.0 (data: Kermany et al. 2018, CC BY 4.0)",
            "Kermany test folder (its own patients)",
        )
    if task == "covid3":
        return TaskData(
            covid_records(data_root / "covid19", data_root / "kermany"), list(COVID_LABELS), "multiclass",
            "COVID-19 Radiography Database subset (COVID and Normal; Chowdhury et al. 2020, Rahman et al. 2021) "
            "plus Kermany viral pneumonia (paediatric), as in the source study. No patient ids exist for the "
            "COVID-19 database: images are split individually (seeded 20% test)",
            "research use; data: COVID-19 Radiography Database terms and Kermany et al. (CC BY 4.0)",
            "seeded 20% of COVID-19 database images + Kermany test viral images",
        )
    if task == "chexpert":
        if chexpert_csv is None:
            raise ValueError("task chexpert needs --chexpert-csv (a CheXpert-style CSV)")
        return TaskData(
            chexpert_records(chexpert_csv, list(CHEXPERT_LABELS), uncertain), list(CHEXPERT_LABELS), "multilabel",
            f"CheXpert-style CSV {Path(chexpert_csv).name}, uncertain labels: {uncertain}",
            "see the CheXpert research use agreement", "none (CheXpert's test set is separate)",
        )
    if task == "pretrain":
        return TaskData(
            pretrain_records(data_root), list(PRETRAIN_LABELS), "multilabel",
            "In-domain pretraining mix: NIH ChestX-ray14 train_val images outside the NIH fine-tune validation "
            "patients (14 findings) + Kermany training images (3 classes), one multi-task sigmoid head, "
            "unknown labels masked; no NIH test image and no COVID-19 database image",
            "CC0-1.0 weights; data: NIH Clinical Center terms and Kermany et al. (CC BY 4.0)",
            "none (a pretraining checkpoint, fine-tuned before use)",
        )
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
