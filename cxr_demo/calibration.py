"""Calibrated probabilities: the card's post-hoc calibration applied to a model's raw probabilities.

One implementation for ``/predict``, ``/compare``, the batch tool and evaluation. The maps are strictly
increasing (slope ``a > 0``), so a film's ranking, every AUROC and every flag are the same before and after;
a flag is decided on the raw probability against the raw threshold, and both are shown calibrated.
"""

from __future__ import annotations

import numpy as np

from cxr_demo.card import Calibration, ModelCard

EPS = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))  # overflow-free


def platt(p: np.ndarray, a: float, b: float) -> np.ndarray:
    """``sigmoid(a * logit(p) + b)``: Platt scaling (temperature scaling when ``b == 0``)."""
    return sigmoid(a * logit(p) + b)


def softmax_temperature(p: np.ndarray, a: float) -> np.ndarray:
    """Multi-class probabilities (..., K) rescaled as ``softmax(a * log p)``."""
    z = a * np.log(np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0))
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def apply(calibration: Calibration | None, task_kind: str, label_names: list[str], probs: np.ndarray) -> np.ndarray:
    """Calibrated probabilities of shape ``probs`` ((K,) or (N, K)); the raw ones when there is no calibration."""
    probs = np.asarray(probs, dtype=np.float64)
    if calibration is None or calibration.method == "identity":
        return probs.copy()
    if task_kind == "multiclass":
        return softmax_temperature(probs, calibration.params["*"][0])
    out = np.empty_like(probs)
    for j, name in enumerate(label_names):
        a, b = calibration.params[name]
        out[..., j] = platt(probs[..., j], a, b)
    return out


def calibrate(card: ModelCard, probs: np.ndarray) -> np.ndarray:
    """The card's calibration applied to raw probabilities (N, K) or (K,)."""
    return apply(card.calibration, card.task_kind, card.label_names, probs)


def calibrated_threshold(card: ModelCard, label: str, threshold: float) -> float:
    """A multi-label threshold on the calibrated scale: the same films pass it (the map is increasing)."""
    if card.calibration is None or card.calibration.method == "identity":
        return float(threshold)
    a, b = card.calibration.params[label]
    return float(platt(np.array(threshold), a, b))


def describe(card: ModelCard) -> str:
    """One sentence for people: what the shown probabilities are."""
    c = card.calibration
    if c is None:
        return ("Probabilities are the model's raw outputs (no calibration has been fitted for this model): "
                "do not read them as chances.")
    if c.method == "identity":
        return (f"Probabilities are the model's raw outputs: on {c.fitted_on} no calibration beat them "
                f"({c.source_file}).")
    how = "temperature scaling" if c.method == "temperature" else "Platt scaling per finding"
    return f"Probabilities are calibrated ({how}, fitted on {c.fitted_on}; {c.source_file})."


def card_lines(card: ModelCard, ev: dict, plot_note: str = "") -> list[str]:
    """The model's calibration in a few lines: method, and ECE / Brier before and after, out of fold on validation
    and on the test images (from ``eval.json``'s ``calibration``, written by ``training.calibration``)."""
    out = ["", "### Calibration", describe(card)]
    c = ev.get("calibration") or {}
    if not c or c.get("method") != (card.calibration.method if card.calibration else None):
        return out
    multi = card.task_kind == "multilabel"
    key = "ece_max_over_findings" if multi else "ece_top_class"
    what = "worst finding's ECE" if multi else "top-class ECE"
    out += ["", f"| images | {what} before → after | {'pooled ECE' if multi else 'log loss'} before → after | "
                "Brier before → after |", "|---|---|---|---|"]
    second = "ece_pooled" if multi else "log_loss"
    for label, part in (("validation, out of fold", c.get("validation_out_of_fold")),
                        ("test", {"before": c.get("test_before"), "after": c.get("test_after")})):
        if part and part.get("before") and part.get("after"):
            b, a = part["before"], part["after"]
            out.append(f"| {label} | {b[key]:.3f} → {a[key]:.3f} | {b[second]:.3f} → {a[second]:.3f} | "
                       f"{b['brier']:.3f} → {a['brier']:.3f} |")
    out += ["", f"*ECE: {c.get('binning', '')}. {c.get('caution', '')} {plot_note}*".replace(" *", "*")]
    return out
