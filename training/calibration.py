"""Fit, choose and measure a post-hoc calibration per model, on its validation images only.

    python -m training.calibration checkpoints/nih14-ensemble [more folders]

For each checkpoint (an ensemble through its members):

1. Its raw probabilities on its own patient-disjoint validation images (never a test image).
2. Candidates: ``identity`` (raw), ``temperature`` (one slope per finding on the logit scale; one for a
   multi-class model), ``platt`` (slope and offset per finding, Platt's smoothed targets; multi-label only),
   and ``isotonic`` (measured for reference only: its steps tie films that the model ranks apart, which would
   change AUROCs and flags, so it is never chosen). Each is scored out of fold: validation is cut into
   ``--folds`` patient-disjoint folds, fitted on the others, applied to the held-out fold. The candidate with
   the lowest out-of-fold log loss (summed over findings) is chosen and refitted on all validation images.
3. It goes into the card (``calibration``), where ``/predict``, ``/compare``, the batch tool and evaluation
   apply it; ``docs/calibration/<model>.json`` keeps every candidate's numbers.
4. Before and after: ECE (10 equal-width probability bins, per finding and pooled over all film-finding
   pairs; for multi-class the top-class confidence), Brier score, mean probability against prevalence and
   reliability-diagram data, out of fold on validation and on the test images (the committed
   ``test_predictions.npz`` of ``training.evaluate``, so no model runs on test images here), written into
   ``eval.json`` under ``calibration`` and plotted as ``reliability.png`` beside ``roc.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import GroupKFold

from cxr_demo import calibration as cal
from cxr_demo.card import EVAL_FILE, PREDICTIONS_FILE, Calibration, ModelCard, read_card, write_card
from cxr_demo.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

BINS = 10
BINNING = f"{BINS} equal-width bins of the predicted probability over [0, 1], weighted by the films in each bin"
CHOOSABLE = ("identity", "temperature", "platt")
SLOPE_BOUNDS = (0.05, 20.0)
OFFSET_BOUNDS = (-20.0, 20.0)


# --- metrics ---------------------------------------------------------------------------------------------

def ece(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error with equal-width bins: sum over bins of (films in bin / films) x |mean
    outcome - mean probability|."""
    y, p = np.asarray(y, float).ravel(), np.asarray(p, float).ravel()
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for k in range(bins):
        m = idx == k
        if m.any():
            total += m.sum() * abs(y[m].mean() - p[m].mean())
    return float(total / max(len(y), 1))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> list[dict]:
    """Reliability-diagram data: per non-empty bin its range, films, mean probability and observed rate."""
    y, p = np.asarray(y, float).ravel(), np.asarray(p, float).ravel()
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for k in range(bins):
        m = idx == k
        if m.any():
            out.append({"bin": [k / bins, (k + 1) / bins], "n": int(m.sum()), "mean_probability": float(p[m].mean()),
                        "observed_rate": float(y[m].mean())})
    return out


def multiclass_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean negative log probability of the true class (``y`` one-hot)."""
    return float(-np.mean(np.log(np.clip((p * y).sum(1), cal.EPS, 1))))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, float), cal.EPS, 1 - cal.EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def calibration_metrics(y: np.ndarray, p: np.ndarray, task_kind: str, labels: list[str]) -> dict:
    """ECE, Brier score and reliability data of probabilities ``p`` (N, K) against labels ``y`` (N, K)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    if task_kind == "multiclass":
        conf, correct = p.max(1), (p.argmax(1) == y.argmax(1)).astype(float)
        return {"ece_top_class": ece(correct, conf), "brier": float(np.mean(np.sum((p - y) ** 2, axis=1))),
                "log_loss": multiclass_log_loss(y, p),
                "mean_confidence": float(conf.mean()), "accuracy": float(correct.mean()),
                "reliability_top_class": reliability(correct, conf)}
    per = {lab: {"ece": ece(y[:, j], p[:, j]), "brier": float(np.mean((p[:, j] - y[:, j]) ** 2)),
                 "mean_probability": float(p[:, j].mean()), "prevalence": float(y[:, j].mean()),
                 "positives": int(y[:, j].sum())}
           for j, lab in enumerate(labels)}
    eces = [v["ece"] for v in per.values()]
    return {"ece_pooled": ece(y, p), "ece_mean_over_findings": float(np.mean(eces)),
            "ece_max_over_findings": float(np.max(eces)), "brier": float(np.mean((p - y) ** 2)),
            "mean_probability": float(p.mean()), "prevalence": float(y.mean()), "per_finding": per,
            "reliability_pooled": reliability(y, p)}


# --- fitting ---------------------------------------------------------------------------------------------

def _fit_binary(y: np.ndarray, p: np.ndarray, offset: bool) -> tuple[float, float]:
    """Slope (and offset) of ``sigmoid(a logit(p) + b)`` by maximum likelihood, with Platt's smoothed targets
    ((positives + 1) / (positives + 2), 1 / (negatives + 2)) so that a handful of positives cannot drive the
    map to 0 or 1; the slope is kept in :data:`SLOPE_BOUNDS` (positive: the ranking is kept)."""
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    z = cal.logit(p)

    def loss(theta):
        a, b = theta[0], theta[1] if offset else 0.0
        q = np.clip(cal.sigmoid(a * z + b), cal.EPS, 1 - cal.EPS)
        r = q - t  # d loss / d (a z + b)
        grad = [float(np.mean(r * z))] + ([float(np.mean(r))] if offset else [])
        return float(-np.mean(t * np.log(q) + (1 - t) * np.log1p(-q))), np.array(grad)

    x0, bounds = ([1.0, 0.0], [SLOPE_BOUNDS, OFFSET_BOUNDS]) if offset else ([1.0], [SLOPE_BOUNDS])
    res = minimize(loss, np.array(x0), jac=True, method="L-BFGS-B", bounds=bounds)
    return float(res.x[0]), float(res.x[1]) if offset else 0.0


def _fit_multiclass_temperature(y: np.ndarray, p: np.ndarray) -> float:
    def loss(theta):
        return multiclass_log_loss(y, cal.softmax_temperature(p, theta[0]))

    res = minimize(loss, np.array([1.0]), method="L-BFGS-B", bounds=[SLOPE_BOUNDS])
    return float(res.x[0])


def fit(method: str, y: np.ndarray, p: np.ndarray, task_kind: str, labels: list[str]):
    """Parameters of ``method`` fitted on (y, p): ``{label or '*': (a, b)}``, or fitted isotonic maps."""
    if task_kind == "multiclass":
        if method == "identity":
            return {"*": (1.0, 0.0)}
        if method == "temperature":
            return {"*": (_fit_multiclass_temperature(y, p), 0.0)}
        raise ValueError(f"{method} is not a multi-class calibration here")
    if method == "identity":
        return {lab: (1.0, 0.0) for lab in labels}
    if method in ("temperature", "platt"):
        return {lab: _fit_binary(y[:, j], p[:, j], offset=method == "platt") for j, lab in enumerate(labels)}
    if method == "isotonic":
        return [IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:, j], y[:, j])
                for j in range(len(labels))]
    raise ValueError(f"unknown calibration method {method!r}")


def transform(method: str, params, p: np.ndarray, task_kind: str, labels: list[str]) -> np.ndarray:
    if method == "isotonic":
        return np.stack([iso.predict(p[:, j]) for j, iso in enumerate(params)], axis=1)
    return cal.apply(Calibration(method=method, params=params, fitted_on="-", source_file="-"), task_kind, labels, p)


def candidates(task_kind: str) -> tuple[str, ...]:
    return ("identity", "temperature") if task_kind == "multiclass" else ("identity", "temperature", "platt", "isotonic")


def out_of_fold(method: str, y: np.ndarray, p: np.ndarray, groups: np.ndarray, task_kind: str, labels: list[str],
                folds: int) -> np.ndarray:
    """Each validation film calibrated by parameters fitted on the other patients' folds."""
    out = np.empty_like(p, dtype=float)
    for fit_idx, held in GroupKFold(n_splits=folds).split(p, y, groups):
        out[held] = transform(method, fit(method, y[fit_idx], p[fit_idx], task_kind, labels), p[held], task_kind, labels)
    return out


def nll(y: np.ndarray, p: np.ndarray, task_kind: str) -> float:
    if task_kind == "multiclass":
        return multiclass_log_loss(y, p)
    return float(sum(log_loss(y[:, j], p[:, j]) for j in range(y.shape[1])))


# --- the study -------------------------------------------------------------------------------------------

def study(card: ModelCard, y: np.ndarray, p: np.ndarray, groups: np.ndarray, folds: int = 5) -> tuple[dict, Calibration]:
    """Every candidate out of fold on validation, the choice and its refit on all validation films."""
    labels = card.label_names
    rows, oof = {}, {}
    for method in candidates(card.task_kind):
        q = p if method == "identity" else out_of_fold(method, y, p, groups, card.task_kind, labels, folds)
        oof[method] = q
        rows[method] = {"out_of_fold_log_loss": nll(y, q, card.task_kind),
                        **{k: v for k, v in calibration_metrics(y, q, card.task_kind, labels).items()
                           if not k.startswith("reliability") and k != "per_finding"}}
    chosen = min((m for m in rows if m in CHOOSABLE), key=lambda m: rows[m]["out_of_fold_log_loss"])
    n_patients = len(set(groups.tolist()))
    fitted_on = f"{card.name}'s {len(y)} validation images ({n_patients} patients; none from the test list)"
    source = f"docs/calibration/{card.name}.json"
    params = fit(chosen, y, p, card.task_kind, labels)
    calibration = Calibration(method=chosen, params=params, fitted_on=fitted_on, source_file=source)
    doc = {
        "model": card.name, "weights_sha256": card.sha256, "binning": BINNING,
        "validation": {"n_images": len(y), "n_patients": n_patients, "folds": folds,
                       "scheme": f"{folds} patient-disjoint folds (GroupKFold by patient): each fold calibrated by "
                                 "parameters fitted on the other folds"},
        "candidates": rows,
        "choice_rule": "lowest out-of-fold log loss among identity, temperature and platt (isotonic is measured only: "
                       "its ties change the ranking, so AUROCs and flags would change)",
        "chosen": chosen,
        "parameters": {k: list(v) for k, v in params.items()},
        "out_of_fold": {"before": calibration_metrics(y, p, card.task_kind, labels),
                        "after": calibration_metrics(y, oof[chosen], card.task_kind, labels)},
        "command": f"python -m training.calibration checkpoints/{card.name}",
    }
    return doc, calibration


def on_test_images(card: ModelCard, Y: np.ndarray, P: np.ndarray) -> dict:
    """Before and after calibration on the test images (raw probabilities ``P``), for ``eval.json``."""
    caution = ("The NIH test images here were collected for their boxes and hold almost no normal films: their "
               "prevalence (mean label) is far above validation's, a shift that no calibration fitted on "
               "realistic data can remove." if card.task == "nih14" else
               "Test images of the same source as training and validation.")
    return {"method": card.calibration.method if card.calibration else None,
            "fitted_on": card.calibration.fitted_on if card.calibration else None,
            "source_file": card.calibration.source_file if card.calibration else None,
            "binning": BINNING, "caution": caution,
            "test_before": calibration_metrics(Y, P, card.task_kind, card.label_names),
            "test_after": calibration_metrics(Y, cal.calibrate(card, P), card.task_kind, card.label_names)}


def reliability_plot(card: ModelCard, panels: dict[str, tuple[list, list]], path: Path) -> None:
    """``reliability.png``: per panel (validation out of fold, test) the pooled reliability curve before and
    after calibration, with the share of films per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), dpi=100, squeeze=False)
    for ax, (title, (before, after)) in zip(axes[0], panels.items()):
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
        for rows, style, name in ((before, "o--", "raw"), (after, "s-", "calibrated")):
            ax.plot([r["mean_probability"] for r in rows], [r["observed_rate"] for r in rows], style, ms=4, label=name)
        for r in after:  # how many films stand behind each calibrated point
            ax.annotate(f"n={r['n']}", (r["mean_probability"], r["observed_rate"]), fontsize=6,
                        xytext=(3, -9), textcoords="offset points")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="observed rate", title=title)
        ax.legend(fontsize=8, loc="upper left")
    what = "every finding pooled" if card.task_kind == "multilabel" else "top-class confidence"
    fig.suptitle(f"{card.name}: reliability ({what}; {BINS} equal-width bins)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def eval_section(folder: Path, card: ModelCard, Y: np.ndarray, P: np.ndarray, study_doc: dict | None = None) -> dict:
    """``eval.json``'s ``calibration``: before and after on the test images (raw probabilities ``P``) and out of
    fold on validation (from the calibration study); draws ``reliability.png`` beside the card."""
    if study_doc is None and card.calibration is not None:
        path = PROJECT_ROOT / card.calibration.source_file
        study_doc = json.loads(path.read_text()) if path.is_file() else None
        if study_doc is not None and study_doc.get("weights_sha256") != card.sha256:
            study_doc = None
    section = on_test_images(card, Y, P)
    key = "reliability_pooled" if card.task_kind == "multilabel" else "reliability_top_class"
    panels = {}
    if study_doc is not None:
        oof = study_doc["out_of_fold"]
        section["validation_out_of_fold"] = {k: oof[k] for k in ("before", "after")}
        panels[f"validation, out of fold ({study_doc['validation']['n_images']} images)"] = (oof["before"][key],
                                                                                              oof["after"][key])
    panels[f"test ({len(Y)} images)"] = (section["test_before"][key], section["test_after"][key])
    reliability_plot(card, panels, Path(folder) / "reliability.png")
    return section


def stored_test_predictions(folder: Path, card: ModelCard) -> tuple[np.ndarray, np.ndarray] | None:
    """The raw test probabilities ``training.evaluate`` stored, when they belong to these weights."""
    path = folder / PREDICTIONS_FILE
    if not path.is_file():
        return None
    d = np.load(path)
    if str(d["weights_sha256"]) != card.sha256 or list(d["label_names"]) != card.label_names:
        raise ValueError(f"{path} belongs to other weights or labels; re-run python -m training.evaluate {folder}")
    return d["labels"].astype(float), d["probabilities"].astype(float)


def calibrate_checkpoint(folder: Path, out_dir: Path = PROJECT_ROOT / "docs" / "calibration", folds: int = 5) -> dict:
    from training.robustness import validation_predictions, validation_records

    folder = Path(folder)
    card = read_card(folder)
    y, probs = validation_predictions([folder])
    groups = np.array([r.patient for r in validation_records(card)])
    doc, calibration = study(card, y.astype(float), probs[card.name].astype(float), groups, folds)
    card.calibration = calibration
    write_card(card, folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{card.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    test = stored_test_predictions(folder, card)
    eval_path = folder / EVAL_FILE
    if test is not None and eval_path.is_file():
        ev = json.loads(eval_path.read_text())
        ev["calibration"] = eval_section(folder, card, *test, study_doc=doc)
        eval_path.write_text(json.dumps(ev, indent=2) + "\n")
    summary = {"model": card.name, "chosen": doc["chosen"],
               **{f"oof_{k}_{w}": doc["out_of_fold"][w].get(k) for w in ("before", "after")
                  for k in ("ece_max_over_findings", "ece_pooled", "ece_top_class", "brier") if k in doc["out_of_fold"][w]}}
    log.info("%s", summary)
    return doc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "calibration")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for folder in args.folders:
        calibrate_checkpoint(folder, args.out, args.folds)


if __name__ == "__main__":
    main()
