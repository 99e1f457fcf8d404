"""Metrics: AUROC with bootstrap CIs, per-finding thresholds, and box localisation against radiologist boxes."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score, roc_curve

from cxr_demo.boxes import Box, BoxRule, match_truth, predicted_boxes, predicted_boxes_for_rules
from cxr_demo.card import F1_FLAG_BUDGET


def safe_auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUROC, or ``None`` when only one class is present."""
    if len(y) == 0 or y.min() == y.max():
        return None
    return float(roc_auc_score(y, p))


def macro_auroc(Y: np.ndarray, P: np.ndarray) -> float | None:
    """Mean AUROC over the labels that have both classes; NaN labels (unknown) are left out per label."""
    known = ~np.isnan(Y)
    vals = [a for j in range(Y.shape[1]) if (a := safe_auroc(Y[known[:, j], j], P[known[:, j], j])) is not None]
    return float(np.mean(vals)) if vals else None


def resample_indices(n: int, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample of ``n`` rows: rows drawn with replacement, or, with ``groups`` (patient ids),
    whole patients drawn with replacement and all their rows taken (a patient's films are not independent)."""
    if groups is None:
        return rng.integers(0, n, n)
    _, inverse = np.unique(groups, return_inverse=True)
    rows_of = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    picks = rng.integers(0, len(rows_of), len(rows_of))
    return np.concatenate([rows_of[i] for i in picks])


def _ci(values: list[float]) -> tuple[float, float] | None:
    return (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if len(values) > 10 else None


def bootstrap_auroc(
    Y: np.ndarray, P: np.ndarray, n_boot: int = 1000, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[list[tuple[float, float] | None], tuple[float, float] | None]:
    """95% percentile bootstrap intervals per label and for the macro mean; patients are resampled when
    ``groups`` gives each row's patient, else images."""
    rng = np.random.default_rng(seed)
    k = Y.shape[1]
    per = [[] for _ in range(k)]
    macro = []
    for _ in range(n_boot):
        idx = resample_indices(len(Y), groups, rng)
        vals = []
        for j in range(k):
            a = safe_auroc(Y[idx, j], P[idx, j])
            if a is not None:
                per[j].append(a)
                vals.append(a)
        if vals:
            macro.append(np.mean(vals))
    return [_ci(v) for v in per], _ci(macro)


def paired_bootstrap_difference(Y: np.ndarray, P_a: np.ndarray, P_b: np.ndarray, groups: np.ndarray | None = None,
                                n_boot: int = 1000, seed: int = 0) -> dict:
    """Macro AUROC of ``P_a`` minus that of ``P_b`` on the same images, with a paired 95% bootstrap interval
    (both models scored on each resample, patients resampled when ``groups`` is given) and per label."""
    rng = np.random.default_rng(seed)
    k = Y.shape[1]
    macro, per = [], [[] for _ in range(k)]
    for _ in range(n_boot):
        idx = resample_indices(len(Y), groups, rng)
        diffs = []
        for j in range(k):
            a, b = safe_auroc(Y[idx, j], P_a[idx, j]), safe_auroc(Y[idx, j], P_b[idx, j])
            if a is not None and b is not None:
                per[j].append(a - b)
                diffs.append(a - b)
        if diffs:
            macro.append(float(np.mean(diffs)))
    return {"difference": macro_auroc(Y, P_a) - macro_auroc(Y, P_b), "ci95": _ci(macro),
            "per_label": [{"difference": (safe_auroc(Y[:, j], P_a[:, j]) or 0.0) - (safe_auroc(Y[:, j], P_b[:, j]) or 0.0),
                           "ci95": _ci(per[j])} for j in range(k)],
            "resamples": n_boot, "unit": "patient" if groups is not None else "image"}


# The ``f1`` rule keeps to ``F1_FLAG_BUDGET`` (cxr_demo.card). Plain F1-optimal thresholds of weak models flag far
# more than is there (the ensemble 2.0, ViT 5.0 findings per true finding on validation); a clinician reads a flag
# as "probably present". With the budget every NIH model of the zoo flags at most 1.35x the true findings on
# validation, also out of fold (``training.flag_rates``, docs/flags/).
THRESHOLD_RULE = (f"f1: highest F1 among thresholds flagging at most {F1_FLAG_BUDGET}x the finding's validation "
                  "positives; youden: highest sensitivity + specificity - 1; screening: highest threshold keeping "
                  "sensitivity >= 0.9")


def threshold_record(n_images: int, command: str) -> dict:
    """The card's ``training.thresholds``: how and on what its thresholds were tuned."""
    return {"split": "validation", "n_images": n_images, "rule": THRESHOLD_RULE, "command": command}


def tune_thresholds(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.9,
                    max_flag_ratio: float | None = F1_FLAG_BUDGET) -> dict[str, float]:
    """F1, Youden and screening (sensitivity >= ``min_sensitivity``) thresholds for one label.

    ``f1``: the threshold of highest F1 among those that flag at most ``max_flag_ratio`` times as many images as
    there are positives (None: no budget, plain F1-optimal). With no positives (or no negatives) the thresholds
    fall back to 0.5.
    """
    if y.min() == y.max():
        return {"f1": 0.5, "youden": 0.5, "screening": 0.5}
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0.0, 1.0)
    youden = float(thr[int(np.argmax(tpr - fpr))])
    ok = np.nonzero(tpr >= min_sensitivity)[0]
    screening = float(thr[ok[0]]) if len(ok) else float(thr[-1])
    # Every distinct score as a threshold, highest first: flags and true positives are cumulative counts.
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], (y[order] == 1)
    last = np.r_[ps[1:] != ps[:-1], True]  # the last image of each run of equal scores
    flagged, tp, cands = np.arange(1, len(p) + 1)[last], np.cumsum(ys)[last], ps[last]
    pos = float(ys.sum())
    f1 = 2 * tp / (flagged + pos)
    if max_flag_ratio is not None:
        f1 = np.where(flagged <= max_flag_ratio * pos, f1, -1.0)
    best = int(np.argmax(f1))  # the highest threshold among equals
    return {"f1": float(cands[best]) if f1[best] > 0 else float(cands[0]), "youden": youden, "screening": screening}


def tune_card_thresholds(Y: np.ndarray, P: np.ndarray, labels: list[str]) -> dict[str, dict[str, float]]:
    """A card's ``thresholds``: per operating point and finding, tuned on validation labels ``Y`` (NaN =
    unknown, left out) and probabilities ``P``."""
    known = ~np.isnan(Y)
    per_label = [tune_thresholds(Y[known[:, j], j], P[known[:, j], j]) if known[:, j].any()
                 else {"f1": 0.5, "youden": 0.5, "screening": 0.5} for j in range(len(labels))]
    return {op: {name: per_label[j][op] for j, name in enumerate(labels)} for op in ("f1", "youden", "screening")}


def macro_auroc_with_finding(Y: np.ndarray, P: np.ndarray) -> float | None:
    """Macro AUROC over the images with at least one finding: NIH validation holds ~40% 'No Finding' films
    and the test images almost none, so both views are reported."""
    with_finding = np.nansum(Y, axis=1) > 0
    return macro_auroc(Y[with_finding], P[with_finding]) if with_finding.sum() > 1 else None


def operating_point_metrics(Y: np.ndarray, P: np.ndarray, thresholds: np.ndarray) -> dict:
    """Per-label and macro precision/recall/F1 and exact-match ratio at given thresholds."""
    pred = (P >= thresholds[None, :]).astype(int)
    prec, rec, f1, _ = precision_recall_fscore_support(Y.astype(int), pred, average=None, zero_division=0)
    return {
        "macro_precision": float(np.mean(prec)),
        "macro_recall": float(np.mean(rec)),
        "macro_f1": float(np.mean(f1)),
        "exact_match": float(np.mean((pred == Y.astype(int)).all(axis=1))),
        "per_label_f1": [float(v) for v in f1],
        "per_label_recall": [float(v) for v in rec],
        "per_label_precision": [float(v) for v in prec],
    }


# --- localisation: heatmap boxes against radiologist boxes --------------------------------------


def mask_iou(heat: np.ndarray, box: Box, t: float) -> float:
    """The source study's metric (Wang et al. 2017): IoU of the mask ``heat >= t`` with the filled box."""
    mask = heat >= t
    x, y, w, h = (int(round(v)) for v in box)
    boxmask = np.zeros_like(mask)
    boxmask[y : y + h, x : x + w] = True
    union = np.logical_or(mask, boxmask).sum()
    return float(np.logical_and(mask, boxmask).sum() / union) if union else 0.0


def box_rows(pair: dict, pred: list, heat: np.ndarray) -> list[dict]:
    """One row per ground-truth box of ``pair``: IoU/IoBB of the best-matching box of ``pred``, and whether the
    heatmap's peak lies in the ground-truth box (the pointing game)."""
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return [{"finding": pair["finding"], "iou": iou, "iobb": iobb,
             "pointing": bool(t[0] <= px <= t[0] + t[2] and t[1] <= py <= t[1] + t[3]), "n_pred": len(pred)}
            for t, (iou, iobb) in zip(pair["truth"], match_truth(pred, pair["truth"]), strict=True)]


def score_rule(heats: list[np.ndarray], pairs: list[dict], rule: BoxRule | None,
               boxes: list[list] | None = None) -> list[dict]:
    """:func:`box_rows` over pairs, for the boxes the app would draw (:func:`cxr_demo.boxes.predicted_boxes` of
    ``rule``, or ``boxes[k]`` for pair k when given)."""
    return [row for k, (heat, pair) in enumerate(zip(heats, pairs, strict=True))
            for row in box_rows(pair, boxes[k] if boxes is not None else predicted_boxes(heat, rule), heat)]


def score_rules(heat: np.ndarray, pair: dict, rules: list[BoxRule]) -> list[list[dict]]:
    """:func:`score_rule` of one heatmap under every rule (shared labellings), one list of rows per rule."""
    return [box_rows(pair, pred, heat) for pred in predicted_boxes_for_rules(heat, rules)]


def summarise(rows: list[dict]) -> dict:
    """Box metrics over rows (one row per ground-truth box)."""
    if not rows:
        return {"n_boxes": 0}
    iou = np.array([r["iou"] for r in rows])
    findings = sorted({r["finding"] for r in rows})
    per_f = {f: float(np.mean([r["iou"] for r in rows if r["finding"] == f])) for f in findings}
    return {
        "n_boxes": len(rows),
        "mean_iou_over_findings": float(np.mean(list(per_f.values()))),
        "mean_iou": float(iou.mean()),
        "mean_iobb": float(np.mean([r["iobb"] for r in rows])),
        "hit_rate_iou_0.1": float((iou > 0.1).mean()),
        "hit_rate_iou_0.25": float((iou > 0.25).mean()),
        "hit_rate_iou_0.5": float((iou > 0.5).mean()),
        "pointing_game": float(np.mean([r["pointing"] for r in rows])),
        "mean_predicted_boxes": float(np.mean([r["n_pred"] for r in rows])),
    }


def per_finding(rows: list[dict]) -> dict:
    """:func:`summarise` per finding."""
    return {f: summarise([r for r in rows if r["finding"] == f]) for f in sorted({r["finding"] for r in rows})}
