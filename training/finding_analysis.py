"""Why do some findings fail? Label counts, validation AUROC with and without normal films, and test
AUROC by what else is on the film.

    python -m training.finding_analysis checkpoints/nih14-efficientnet-lite1 --findings Cardiomegaly Consolidation

The NIH validation split holds ~40% 'No Finding' films and the test images here almost none, so a
finding's score can rank well on validation only because it separates abnormal films from normal ones.
For each model and finding this reports: positives per split; validation AUROC over all films and over
films with at least one finding; test AUROC over all test films and within the test films that do or do
not carry each frequent co-finding. Writes ``docs/analysis/findings.json``. Test images are only
measured here, never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cxr_demo.card import read_card
from cxr_demo.inference import predict_array
from cxr_demo.paths import PROJECT_ROOT
from cxr_demo.zoo import load_checkpoint
from training.data import add_data_root_argument, cached_pixels
from training.metrics import safe_auroc
from training.robustness import validation_records
from training.tasks import load_task

CO_FINDINGS = ("Effusion", "Atelectasis", "Infiltration", "Pneumonia", "Edema")


def analyse(folders: list[Path], findings: list[str], data_root: Path | None = None) -> dict:
    first = read_card(folders[0])
    task = load_task(first.task, data_root)
    labels = first.label_names
    test = task.test
    y_test = np.stack([r.labels for r in test])
    val = validation_records(first, data_root)
    y_val = np.stack([r.labels for r in val])
    train_n = len(task.train_val) - len(val)
    out: dict = {"counts": {}, "models": {}}
    for f in findings:
        j = labels.index(f)
        y_tv = np.stack([r.labels for r in task.train_val])
        out["counts"][f] = {"train_val": int(y_tv[:, j].sum()), "validation": int(y_val[:, j].sum()),
                            "train": int(y_tv[:, j].sum() - y_val[:, j].sum()), "train_images": train_n,
                            "test": int(y_test[:, j].sum()), "test_images": len(test),
                            "test_co_occurrence": {c: int((y_test[:, j] * y_test[:, labels.index(c)]).sum())
                                                   for c in CO_FINDINGS if c != f}}
    with_finding = y_val.sum(1) > 0
    for folder in folders:
        card = read_card(folder)
        model = load_checkpoint(folder)
        p_val = predict_array(model, cached_pixels(val, card.input_size, card.crop), card.mean, card.std, card.task_kind)
        p_test = predict_array(model, cached_pixels(test, card.input_size, card.crop), card.mean, card.std,
                               card.task_kind)
        rows = {}
        for f in findings:
            j = labels.index(f)
            strata = {}
            for c in CO_FINDINGS:
                if c == f:
                    continue
                k = labels.index(c)
                strata[f"with {c}"] = safe_auroc(y_test[y_test[:, k] == 1, j], p_test[y_test[:, k] == 1, j])
                strata[f"without {c}"] = safe_auroc(y_test[y_test[:, k] == 0, j], p_test[y_test[:, k] == 0, j])
            rows[f] = {"val_auroc_all_films": safe_auroc(y_val[:, j], p_val[:, j]),
                       "val_auroc_films_with_a_finding": safe_auroc(y_val[with_finding, j], p_val[with_finding, j]),
                       "test_auroc": safe_auroc(y_test[:, j], p_test[:, j]), "test_auroc_by_co_finding": strata}
        out["models"][card.name] = rows
    out["validation"] = {"images": len(val), "with_a_finding": int(with_finding.sum())}
    out["command"] = ("python -m training.finding_analysis " + " ".join(str(f) for f in folders)
                      + " --findings " + " ".join(findings))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--findings", nargs="+", default=["Cardiomegaly", "Consolidation"])
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "analysis" / "findings.json")
    add_data_root_argument(p)
    args = p.parse_args(argv)
    result = analyse(args.folders, args.findings, args.data_root)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
