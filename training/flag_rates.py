"""What a flag means, on validation: per finding and operating point its sensitivity, specificity and PPV, and
how many findings a multi-label model flags per image against how many are truly present.

    python -m training.flag_rates checkpoints/nih14-ensemble
    python -m training.flag_rates --retune checkpoints/nih14-*    # re-tune the card's thresholds first

Runs the checkpoint (an ensemble through its members) on its own patient-disjoint validation images (never a
test image), applies each operating point's thresholds, and writes ``docs/flags/<model>.json``: mean flags
per image, mean true findings per image and their ratio, with and without the findings that the app does not
flag because their test AUROC CI includes 0.5 (``cxr_demo.service``), and on the validation films that have
at least one finding. The per-finding numbers also go into the card (``training.flag_meaning``), from where
``/predict`` shows them beside each flag. The same thresholds were tuned on these images, so those rates are
optimistic; the file also holds the **out-of-fold** rates (thresholds tuned on 4 of 5 patient-disjoint folds of validation, applied
to the fifth) and the rates on the test images (from the stored ``test_predictions.npz``; these hold ~2 findings
per image and almost no normal films).

``--retune`` first re-tunes the card's thresholds on the same validation images with the project's rule
(``training.metrics.tune_card_thresholds``: ``f1`` keeps to a flag budget of ``F1_FLAG_BUDGET`` flags per
positive) and recomputes ``eval.json``'s ``operating_points`` from the stored test probabilities (no model run
on test images; the AUROCs do not change).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold

from cxr_demo.card import EVAL_FILE, OPERATING_POINTS, read_card, write_card
from cxr_demo.paths import PROJECT_ROOT
from cxr_demo.service import DemoService, is_reliable
from cxr_demo.zoo import Zoo, ZooSource
from training.calibration import stored_test_predictions
from training.evaluate import operating_points_section
from training.metrics import threshold_record, tune_card_thresholds
from training.robustness import validation_predictions, validation_records

FOLDS = 5


def flag_rates(folder: Path, retune: bool = False) -> dict:
    folder = Path(folder)
    card = read_card(folder)
    if card.task_kind != "multilabel":
        raise SystemExit(f"{card.name} is multi-class: it flags exactly one class per image")
    y, probs = validation_predictions([folder])
    y, probs = y.astype(float), probs[card.name].astype(float)
    patients = np.array([r.patient for r in validation_records(card)])
    if retune:
        card = retune_thresholds(folder, y, probs)
    per = DemoService(Zoo(ZooSource(folder.parent))).test_results(card)
    reliable = np.array([is_reliable(per.get(lab, {}).get("auroc_ci95")) is not False for lab in card.label_names])
    sick = np.nansum(y, axis=1) > 0
    out = {"model": card.name, "weights_sha256": card.sha256, "n_validation_images": len(y),
           "n_with_a_finding": int(sick.sum()), "true_findings_per_image": float(np.nansum(y) / len(y)),
           "true_findings_per_image_with_a_finding": float(np.nansum(y[sick]) / max(1, sick.sum())),
           "not_flagged_as_unreliable": [lab for lab, ok in zip(card.label_names, reliable, strict=True) if not ok],
           "threshold_rule": card.training.get("thresholds", {}).get("rule"),
           "operating_points": {}}
    oof = out_of_fold_thresholds(y, probs, patients, card.label_names)
    test = stored_test_predictions(folder, card)
    if test is not None:
        out["test"] = {"n_images": len(test[0]), "true_findings_per_image": float(np.nansum(test[0]) / len(test[0])),
                       "operating_points": {}}
    for op in card.operating_points:
        thr = np.array([card.threshold(op, lab) for lab in card.label_names])
        out["operating_points"][op] = {**rates(y, probs >= thr, reliable),
                                       "out_of_fold": rates(y, probs >= oof[op], reliable)}
        if test is not None:
            out["test"]["operating_points"][op] = rates(test[0], test[1] >= thr, reliable)
    out["out_of_fold_scheme"] = (f"thresholds tuned on {FOLDS - 1} of {FOLDS} patient-disjoint folds of validation "
                                 "(GroupKFold by patient) with the card's rule, applied to the fifth")
    out["per_finding"] = {op: finding_stats(y, probs, card, op) for op in card.operating_points}
    out["command"] = f"python -m training.flag_rates {'--retune ' if retune else ''}{folder}"
    return out


def rates(y: np.ndarray, flags: np.ndarray, reliable: np.ndarray) -> dict:
    """Flags per image, all and as the app shows them (unreliable findings never flagged), against the truth."""
    shown = flags & reliable
    sick = np.nansum(y, axis=1) > 0
    return {"flags_per_image": float(flags.sum() / len(y)),
            "flags_per_image_as_shown": float(shown.sum() / len(y)),
            "ratio_to_true_as_shown": float(shown.sum() / max(1.0, np.nansum(y))),
            "ratio_to_true_all_flags": float(flags.sum() / max(1.0, np.nansum(y))),
            "flags_per_image_with_a_finding_as_shown": float(shown[sick].sum() / max(1, sick.sum()))}


def out_of_fold_thresholds(y: np.ndarray, probs: np.ndarray, patients: np.ndarray, labels: list[str]) -> dict:
    """Per operating point, an (images x findings) array of thresholds, each image's tuned without its patient's
    fold."""
    out = {op: np.zeros_like(probs) for op in OPERATING_POINTS}
    for fit_idx, held in GroupKFold(n_splits=FOLDS).split(probs, groups=patients):
        tuned = tune_card_thresholds(y[fit_idx], probs[fit_idx], labels)
        for op, per_label in tuned.items():
            out[op][held] = np.array([per_label[lab] for lab in labels])
    return out


def retune_thresholds(folder: Path, y: np.ndarray, probs: np.ndarray):
    """The card's thresholds tuned again on its validation predictions; ``eval.json``'s operating points
    recomputed from the stored test probabilities."""
    card = read_card(folder)
    card.thresholds = tune_card_thresholds(y, probs, card.label_names)
    card.training["thresholds"] = threshold_record(len(y), f"python -m training.flag_rates --retune {folder}")
    write_card(card, folder)
    test = stored_test_predictions(folder, card)
    eval_path = folder / EVAL_FILE
    if test is not None and eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        ev["operating_points"] = operating_points_section(card, *test)
        eval_path.write_text(json.dumps(ev, indent=2) + "\n")
    return card


def finding_stats(y: np.ndarray, probs: np.ndarray, card, op: str) -> dict[str, dict]:
    """Per finding at ``op``: validation sensitivity, specificity, prevalence and PPV at that prevalence
    (None where a finding has no validation positive or no flag)."""
    stats = {}
    for j, lab in enumerate(card.label_names):
        known = ~np.isnan(y[:, j])
        t, flagged = y[known, j] > 0.5, probs[known, j] >= card.threshold(op, lab)
        pos, neg = int(t.sum()), int((~t).sum())
        stats[lab] = {
            "sensitivity": float((flagged & t).sum() / pos) if pos else None,
            "specificity": float((~flagged & ~t).sum() / neg) if neg else None,
            "ppv": float((flagged & t).sum() / flagged.sum()) if flagged.sum() else None,
            "prevalence": float(pos / max(1, pos + neg)), "positives": pos,
        }
    return stats


def store_in_card(folder: Path, result: dict) -> None:
    """Keep the per-finding validation meaning of each flag in the card (``training.flag_meaning``) for the
    app's /predict rows."""
    card = read_card(folder)
    card.training["flag_meaning"] = {"source_file": f"docs/flags/{card.name}.json", "split": "validation",
                                     "per_operating_point": result["per_finding"]}
    write_card(card, folder)  # the timm fields' num_features is kept from the file


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--retune", action="store_true", help="re-tune the card's thresholds on validation first")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "flags")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in args.folders:
        result = flag_rates(folder, args.retune)
        (args.out / f"{result['model']}.json").write_text(json.dumps(result, indent=1) + "\n")
        store_in_card(folder, result)
        print(json.dumps({k: result[k] for k in ("model", "true_findings_per_image", "operating_points", "test")
                          if k in result}, indent=1))


if __name__ == "__main__":
    main()
