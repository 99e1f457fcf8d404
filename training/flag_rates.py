"""What a flag means, on validation: per finding and operating point its sensitivity, specificity and PPV, and
how many findings a multi-label model flags per image against how many are truly present.

    python -m training.flag_rates checkpoints/nih14-ensemble

Runs the checkpoint (an ensemble through its members) on its own patient-disjoint validation images (never a
test image), applies each operating point's thresholds, and writes ``docs/flags/<model>.json``: mean flags
per image, mean true findings per image and their ratio, with and without the findings that the app does not
flag because their test AUROC CI includes 0.5 (``cxr_demo.service``), and on the validation films that have
at least one finding. The per-finding numbers also go into the card (``training.flag_meaning``), from where
``/predict`` shows them beside each flag. The same thresholds were tuned on these images, so every rate here is
optimistic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cxr_demo.card import read_card
from cxr_demo.paths import PROJECT_ROOT
from cxr_demo.service import DemoService, is_reliable
from cxr_demo.zoo import Zoo, ZooSource
from training.robustness import validation_predictions


def flag_rates(folder: Path) -> dict:
    folder = Path(folder)
    card = read_card(folder)
    if card.task_kind != "multilabel":
        raise SystemExit(f"{card.name} is multi-class: it flags exactly one class per image")
    y, probs = validation_predictions([folder])
    y, probs = y.astype(float), probs[card.name]
    per = DemoService(Zoo(ZooSource(folder.parent))).test_results(card)
    reliable = np.array([is_reliable(per.get(lab, {}).get("auroc_ci95")) is not False for lab in card.label_names])
    sick = np.nansum(y, axis=1) > 0
    out = {"model": card.name, "weights_sha256": card.sha256, "n_validation_images": len(y),
           "n_with_a_finding": int(sick.sum()), "true_findings_per_image": float(np.nansum(y) / len(y)),
           "true_findings_per_image_with_a_finding": float(np.nansum(y[sick]) / max(1, sick.sum())),
           "not_flagged_as_unreliable": [lab for lab, ok in zip(card.label_names, reliable, strict=True) if not ok],
           "operating_points": {}}
    for op in card.operating_points:
        thr = np.array([card.threshold(op, lab) for lab in card.label_names])
        flags = probs >= thr
        shown = flags & reliable
        out["operating_points"][op] = {
            "flags_per_image": float(flags.sum() / len(y)),
            "flags_per_image_as_shown": float(shown.sum() / len(y)),
            "ratio_to_true_as_shown": float(shown.sum() / max(1.0, np.nansum(y))),
            "flags_per_image_with_a_finding_as_shown": float(shown[sick].sum() / max(1, sick.sum())),
        }
    out["per_finding"] = {op: finding_stats(y, probs, card, op) for op in card.operating_points}
    out["command"] = f"python -m training.flag_rates {folder}"
    return out


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
    from cxr_demo.card import write_card

    card = read_card(folder)
    card.training["flag_meaning"] = {"source_file": f"docs/flags/{card.name}.json", "split": "validation",
                                     "per_operating_point": result["per_finding"]}
    write_card(card, folder)  # the timm fields' num_features is kept from the file


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "flags")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in args.folders:
        result = flag_rates(folder)
        (args.out / f"{result['model']}.json").write_text(json.dumps(result, indent=1) + "\n")
        store_in_card(folder, result)
        print(json.dumps({k: v for k, v in result.items() if k != "per_finding"}, indent=1))


if __name__ == "__main__":
    main()
