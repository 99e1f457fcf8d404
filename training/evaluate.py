"""Evaluate a checkpoint folder on its task's test images and write ``eval.json``.

    python -m training.evaluate checkpoints/nih14-efficientnet-lite0

Writes ``eval.json`` (per-finding AUROC with bootstrap 95% CI and positive counts, macro AUROC,
precision/recall/F1 and exact match at each operating point; for NIH, box IoU/IoBB over every
radiologist box of the evaluation images; for multi-class tasks, accuracy and the confusion matrix)
and ``roc.png`` beside the card (with the card's calibration, also its before/after numbers and
``reliability.png``: ``training.calibration``), then copies the headline numbers into the card.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from cxr_demo import paths
from cxr_demo.boxes import chest_frame, finding_boxes, predicted_boxes
from cxr_demo.cam import compute_heatmap, explain_settings, resize_heatmap
from cxr_demo.card import EVAL_FILE, PREDICTIONS_FILE, EvalMetrics, read_card, write_card
from cxr_demo.inference import normalise_batch, predict_array
from cxr_demo.zoo import load_checkpoint
from training.data import add_data_root_argument, cached_pixels, nih_box_pairs, nih_boxes, study_halves
from training.metrics import bootstrap_auroc, operating_point_metrics, per_finding, safe_auroc, score_rule, summarise
from training.tasks import load_task

log = logging.getLogger(__name__)



def _roc_plot(Y: np.ndarray, P: np.ndarray, labels: list[str], aucs: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(7, 7), dpi=100)
    for j, name in enumerate(labels):
        if aucs[j] is None:
            continue
        fpr, tpr, _ = roc_curve(Y[:, j], P[:, j])
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} {aucs[j]:.2f} (n+={int(Y[:, j].sum())})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def box_study(model, card, records, pixels, boxes_by_image, lung_folder: Path | None = None) -> dict:
    """IoU/IoBB against the radiologist boxes of the localisation study's ``report`` half (the patient-disjoint
    half on which no setting was chosen), with the settings the app uses by default for this model
    (``explain_defaults`` from the study, its anatomical prior included; else Grad-CAM, no prior)."""
    from cxr_demo.images import read_xray
    from cxr_demo.lungs import LungSegmenter, apply_prior, default_lung_folder

    settings = explain_settings(card, "default")
    pairs = nih_box_pairs(records, boxes_by_image, card.label_names)
    pairs = [pairs[i] for i in study_halves(pairs)["report"]]
    lungs = None
    if settings.prior is not None or settings.per_finding:
        folder = lung_folder or default_lung_folder()
        if folder is None:
            raise FileNotFoundError(f"{card.name}'s defaults use the anatomical prior, but no lung model is installed")
        lungs = LungSegmenter(folder)
    heats, boxes = [], []
    t0 = time.time()
    for p in pairs:
        x_in = normalise_batch(pixels[p["index"] : p["index"] + 1], card.mean, card.std)
        heat = compute_heatmap(model, card, x_in, card.label_names.index(p["finding"]), settings.method,
                               layer=settings.layer)
        heat = resize_heatmap(heat, p["width"], p["height"], card.crop)
        frame = fields = None
        if lungs is not None:
            res = lungs.segment(read_xray(records[p["index"]].path).pixels)
            if res.found():
                frame = chest_frame(res.region("hull", p["width"], p["height"]))
                fields = res.region("lungs", p["width"], p["height"])
                if settings.prior is not None:
                    heat = apply_prior(heat, res.region(settings.prior, p["width"], p["height"]))
        heats.append(heat)
        # the app's boxes (DemoService.explain): the finding's studied box source, else the box rule
        choice = settings.box_source(p["finding"])
        chosen = None if choice is None else finding_boxes(heat, choice, frame, p["width"], p["height"], fields)
        boxes.append(chosen if chosen is not None else predicted_boxes(heat, settings.rule))
    seconds = time.time() - t0
    rows = score_rule(heats, pairs, settings.rule, boxes)
    note = (f"settings chosen by the localisation study on the other, patient-disjoint half ({card.explain_defaults.source_file})"
            if card.explain_defaults else "fixed settings (no localisation study for this model): Grad-CAM, plain box rule")
    return {
        "method": settings.method,
        "layer": settings.layer,
        "box_rule": settings.rule.describe(),
        "box_sources_per_finding": ({f: c.text for f, c in settings.per_finding.items()} if settings.per_finding
                                    else None),
        "prior": settings.prior,
        "settings": note,
        "boxes": "the localisation study's report half only (boxed official-test images, split 50/50 by patient)",
        "overall": summarise(rows),
        "per_finding": per_finding(rows),
        "seconds_per_heatmap": round(seconds / max(len(pairs), 1), 4),
    }


def operating_points_section(card, Y: np.ndarray, P: np.ndarray) -> dict:
    """``eval.json``'s ``operating_points``: macro and per-finding precision/recall/F1 and exact match at each of
    the card's operating points (multi-class: the top class)."""
    ops = {}
    for op in card.operating_points:
        if op == "argmax":  # multi-class: the top class is the prediction
            thr = np.full(len(card.label_names), 0.5)
            m = operating_point_metrics(Y, np.eye(len(card.label_names))[P.argmax(1)], thr)
        else:
            thr = np.array([card.threshold(op, n) for n in card.label_names])
            m = operating_point_metrics(Y, P, thr)
        ops[op] = {k: v for k, v in m.items() if not k.startswith("per_label")}
        ops[op]["per_label"] = {
            n: {"threshold": float(thr[j]) if op != "argmax" else None, "precision": m["per_label_precision"][j], "recall": m["per_label_recall"][j],
                "f1": m["per_label_f1"][j]}
            for j, n in enumerate(card.label_names)
        }
    return ops


def evaluate_checkpoint(folder: Path, data_root: Path | None = None, n_boot: int = 1000,
                        lung_folder: Path | None = None) -> dict:
    """Evaluate ``folder`` on its task's test images in ``data_root`` (for NIH, the official test list);
    write eval.json."""
    folder = Path(folder)
    data_root = Path(data_root) if data_root is not None else paths.data_root()
    card = read_card(folder)
    task = load_task(card.task, data_root)
    if task.label_names != card.label_names:
        raise ValueError(f"{card.name}: card labels {card.label_names} differ from task {card.task}'s {task.label_names}")
    records = task.test
    if not records:
        raise ValueError(f"{card.name}: task {card.task} has no test images under {data_root}")
    model = load_checkpoint(folder)
    pixels = cached_pixels(records, card.input_size, card.crop)
    Y = np.stack([r.labels for r in records])
    P = predict_array(model, pixels, card.mean, card.std, card.task_kind)
    aucs = [safe_auroc(Y[:, j], P[:, j]) for j in range(Y.shape[1])]
    patients = np.array([r.patient for r in records])
    cis, macro_ci = bootstrap_auroc(Y, P, n_boot=n_boot, groups=patients)
    valid = [a for a in aucs if a is not None]
    macro = float(np.mean(valid))
    per_label = {
        name: {"auroc": aucs[j], "auroc_ci95": cis[j], "positives": int(Y[:, j].sum()), "negatives": int(len(Y) - Y[:, j].sum())}
        for j, name in enumerate(card.label_names)
    }
    ops = operating_points_section(card, Y, P)
    boxes = box_study(model, card, records, pixels, nih_boxes(data_root / "nih14"), lung_folder) if card.task == "nih14" else None
    _roc_plot(Y, P, card.label_names, aucs, folder / "roc.png",
              f"{card.name}: {card.task} test images (n={len(Y)}), macro AUROC {macro:.3f}")
    caution = ("These test images are a biased sample (collected for their boxes; almost no 'No Finding'); "
               "not the official benchmark. " if card.task == "nih14" else "")
    result = {
        "model": card.name,
        "weights_sha256": card.sha256,
        "dataset": task.test_description,
        "caution": caution + "Thresholds were tuned on validation images only.",
        "n_images": len(Y),
        "n_patients": len({r.patient for r in records}),
        "macro_auroc": macro,
        "macro_auroc_ci95": macro_ci,
        "bootstrap": {"resamples": n_boot, "unit": "patient", "interval": "percentile 95%"},
        "per_label": per_label,
        "operating_points": ops,
        "localisation": boxes,
        "command": f"python -m training.evaluate {folder}",
    }
    if card.calibration is not None:
        from training.calibration import eval_section

        result["calibration"] = eval_section(folder, card, Y, P)
    if card.task_kind == "multiclass":
        from sklearn.metrics import confusion_matrix

        truth, guess = Y.argmax(1), P.argmax(1)
        result["accuracy"] = float((truth == guess).mean())
        result["confusion_matrix"] = {"rows_true_columns_predicted": card.label_names,
                                      "counts": confusion_matrix(truth, guess, labels=range(len(card.label_names))).tolist()}
    (folder / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    # Per-image test probabilities, so that models can be compared (paired, training.compare) or
    # combined without loading them again.
    np.savez_compressed(folder / PREDICTIONS_FILE, images=np.array([r.path.name for r in records]), patients=patients,
                        labels=Y.astype(np.uint8), probabilities=P.astype(np.float32),
                        label_names=np.array(card.label_names), weights_sha256=np.array(card.sha256))
    card.eval_metrics = EvalMetrics(
        source_file=EVAL_FILE, dataset="NIH14 official test images here" if card.task == "nih14" else task.test_description,
        n_images=len(Y), macro_auroc=macro,
        macro_auroc_ci95=macro_ci, per_label_auroc={n: a for n, a in zip(card.label_names, aucs) if a is not None},
        mean_box_iou=boxes["overall"]["mean_iou"] if boxes else None, n_boxes=boxes["overall"]["n_boxes"] if boxes else None,
    )
    head, sep, _ = card.summary.rpartition(" | val macro AUROC")
    base = head if sep else card.summary.split(" | test macro AUROC")[0]
    card.summary = f"{base} | test macro AUROC {macro:.3f} (n={len(Y)})"
    write_card(card, folder, num_features=getattr(model, "num_features", None))
    log.info("%s: macro AUROC %.3f %s%s", card.name, macro, macro_ci,
             f", mean box IoU {boxes['overall']['mean_iou']:.3f} over {boxes['overall']['n_boxes']} boxes" if boxes else "")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    add_data_root_argument(p)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for folder in args.folders:
        evaluate_checkpoint(folder, args.data_root, n_boot=args.bootstrap)


if __name__ == "__main__":
    main()
