"""What the app does, without the UI: predict and explain on an already decoded radiograph.

Uploads are decoded by ``cxr_demo.uploads``; the Gradio layer (``cxr_demo.ui``) turns the
:data:`USER_ERRORS` into ``gr.Error``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cxr_demo.boxes import best_match, match_truth, predicted_boxes
from cxr_demo.cam import CAM_LABELS, SLOW_CAM_METHODS, explain_settings, heatmap_and_logits, resize_heatmap
from cxr_demo.card import ChoiceError, ModelCard, choice_number, choice_text
from cxr_demo.groundtruth import BoxInputError, nih_boxes_for, parse_boxes
from cxr_demo.images import ImageInputError, XRay
from cxr_demo.inference import features_and_logits, findings_table, logits_to_probabilities, preprocess
from cxr_demo.overlay import fit_overlay, render_overlay
from cxr_demo.zoo import UnknownModelError, Zoo

log = logging.getLogger(__name__)

LOW_PROBABILITY = 0.2
OOD_WARNING = ("This image looks unlike the chest X-rays this model was trained on (out-of-distribution check); "
               "its findings may be meaningless.")

NOT_RELIABLE = ("not reliable for this model: its test AUROC's 95% CI includes 0.5 (no better than chance), "
                "so it is never flagged")
OOD_UNAVAILABLE = ("This model's is-this-a-chest-X-ray check could not be loaded, so this film was not checked "
                   "against the model's training images.")

USER_ERRORS: tuple[type[Exception], ...] = (ImageInputError, UnknownModelError, BoxInputError, ChoiceError)


def is_reliable(auroc_ci95) -> bool | None:
    """A finding is reliable for a model when its test AUROC's 95% CI lies above 0.5 (None: no evaluation)."""
    return None if not auroc_ci95 else bool(auroc_ci95[0] > 0.5)


def _rounded(box) -> list[float]:
    return [round(v, 1) for v in box]


@dataclass
class Prediction:
    """A predict result: the JSON document plus what the UI shows."""

    document: dict[str, Any]
    xray: XRay
    card: ModelCard


class DemoService:
    """Predict and explain with the models of a :class:`Zoo`.

    One lock serialises model use: pytorch-grad-cam hooks live on the shared module, so two CAMs
    (or a CAM and a forward pass) must not interleave on one model.
    """

    def __init__(self, zoo: Zoo, allow_slow_cam: bool | None = None) -> None:
        self.zoo = zoo
        self._model_lock = threading.RLock()
        self._test_results: dict[str, dict[str, dict]] = {}
        if allow_slow_cam is None:
            allow_slow_cam = os.environ.get("CXR_DEMO_SLOW_CAM", "") == "1"
        self.allow_slow_cam = allow_slow_cam

    def models(self) -> list[dict[str, Any]]:
        """Zoo entries for the ``/models`` endpoint, the default model first."""
        return [self.zoo.cards[name].summary_entry() for name in self.zoo.names]

    @staticmethod
    def _operating_point(card: ModelCard, operating_point: str | None) -> str:
        ops = card.operating_points
        op = operating_point or ops[0]
        if card.task_kind == "multiclass":
            return "argmax"
        if op not in ops:
            raise ChoiceError(
                f"Unknown operating point {str(op)[:40]!r} for {card.name}; choose one of: {', '.join(ops)}."
            )
        return op

    def test_results(self, card: ModelCard) -> dict[str, dict]:
        """Per finding, the model's test AUROC, its patient-level 95% CI and positives, from its ``eval.json``
        (empty when the model has none)."""
        if card.name not in self._test_results:
            per: dict[str, dict] = {}
            try:
                path = self.zoo.eval_file(card.name)
                if path.is_file():
                    per = json.loads(path.read_text()).get("per_label", {}) or {}
            except (OSError, ValueError) as e:
                log.warning("evaluation of %s unreadable: %s", card.name, type(e).__name__)
            self._test_results[card.name] = per
        return self._test_results[card.name]

    def _with_meaning(self, card: ModelCard, rows: list[dict], op: str | None = None) -> list[dict]:
        """Each row gains what its flag means at ``op`` on validation (sensitivity, specificity, PPV at the
        validation prevalence; None when the card has no ``training.flag_meaning``), its test AUROC (CI,
        positives) and whether the finding is reliable for this model; a multi-label finding whose CI includes
        0.5 is not flagged (``passes_threshold`` keeps the comparison)."""
        per = self.test_results(card)
        meaning = (card.training.get("flag_meaning") or {}).get("per_operating_point", {})
        for row in rows:
            stats = meaning.get(op, {}).get(row["name"], {}) if op else {}
            row["validation_sensitivity"] = stats.get("sensitivity")
            row["validation_specificity"] = stats.get("specificity")
            row["validation_ppv"] = stats.get("ppv")
            row["validation_prevalence"] = stats.get("prevalence")
            ev = per.get(row["name"], {})
            ci = ev.get("auroc_ci95")
            row["test_auroc"] = ev.get("auroc")
            row["test_auroc_ci95"] = list(ci) if ci else None
            row["test_positives"] = ev.get("positives")
            row["reliable"] = is_reliable(ci)
            row["passes_threshold"] = row["positive"]
            if card.task_kind == "multilabel" and row["reliable"] is False:
                row["positive"] = False
                row["note"] = NOT_RELIABLE
        return rows

    def predict(self, xray: XRay, model_name: str, operating_point: str | None = None) -> Prediction:
        """Probabilities, thresholds and flags for every finding of ``model_name``'s card."""
        card = self.zoo.card(model_name)
        op = self._operating_point(card, choice_text(operating_point, "operating point"))
        x = preprocess(xray.pixels, card)
        warnings = list(xray.warnings)
        with self._model_lock:
            model = self.zoo.model(card.name)
            try:
                detector = self.zoo.ood(card.name)
            except Exception as e:  # noqa: BLE001 - a damaged OOD file costs the check, not the answer
                log.warning("out-of-distribution check of %s unavailable: %s", card.name, type(e).__name__)
                detector = None
                warnings.append(OOD_UNAVAILABLE)
            with torch.inference_mode():
                features, logits = features_and_logits(model, x)  # one pass: findings and the OOD check
        probs = logits_to_probabilities(logits, card.task_kind)[0].float().numpy()
        if detector is not None and bool(detector.is_outlier(features.float().numpy())[0]):
            warnings.append(OOD_WARNING)
        doc = {
            "model": card.name,
            "operating_point": op,
            "findings": self._with_meaning(card, findings_table(card, probs, op), op),
            "warnings": warnings,
        }
        return Prediction(doc, xray, card)

    def explain(
        self,
        xray: XRay,
        model_name: str,
        finding: str | None = None,
        method: str | None = None,
        ground_truth: str | None = None,
        opacity: float = 0.5,
        box_threshold: float | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Heatmap overlay and box agreement for one finding.

        ``method="default"`` uses the method and layer the localisation study chose for this model
        (``explain_defaults`` in its card); ``box_threshold`` None or 0 uses the study's box rule,
        otherwise the largest region above that fraction of the heatmap's maximum.
        Ground truth comes from ``ground_truth`` (typed ``x, y, w, h`` in image pixels) or, when none
        is typed, from the NIH box list matched by the uploaded file's name.
        """
        card = self.zoo.card(model_name)
        finding = choice_text(finding, "finding")
        method = choice_text(method, "heatmap method")
        opacity = choice_number(opacity, "heatmap opacity", 0.0, 1.0)
        box_threshold = None if box_threshold is None else choice_number(box_threshold, "box threshold", 0.0, 0.95)
        if ground_truth is not None and not isinstance(ground_truth, str):
            raise BoxInputError("Type the ground-truth box as text: x, y, w, h (several separated by ';').")
        settings = explain_settings(card, method, box_threshold)
        if settings.method in SLOW_CAM_METHODS and not self.allow_slow_cam:
            raise ChoiceError(f"{CAM_LABELS[settings.method].replace(' (slow)', '')} takes minutes per image on this "
                              "server's CPU and would hold up everyone else, so it is switched off here; choose "
                              "Grad-CAM or another fast method.")
        if finding and finding not in card.label_names:
            raise ChoiceError(
                f"{card.name} has no finding {str(finding)[:40]!r}; choose one of: {', '.join(card.label_names)}."
            )
        x = preprocess(xray.pixels, card)
        warnings = list(xray.warnings)
        with self._model_lock:
            model = self.zoo.model(card.name)
            requested = card.label_names.index(finding) if finding else None
            heat, logits, index = heatmap_and_logits(model, card, x, requested, settings.method, layer=settings.layer)
        probs = logits_to_probabilities(logits.float(), card.task_kind)[0].numpy()
        finding = card.label_names[index]
        heat = resize_heatmap(heat, xray.width, xray.height, card.crop)
        pred_boxes = predicted_boxes(heat, settings.rule)

        typed = parse_boxes(ground_truth, xray.width, xray.height)
        source: str | None = None
        if typed:
            truth, source = typed, "typed by user"
        else:
            nih = nih_boxes_for(xray.name, xray.width, xray.height)
            truth = [b for f, b in nih if f == finding]
            if truth:
                source = "NIH BBox_List_2017.csv"
            elif nih:
                others = sorted({f for f, _ in nih})
                warnings.append(
                    f"The radiologist boxed {', '.join(others)} on this image, not {finding}; choose that finding to "
                    "see the overlap."
                )
            else:
                warnings.append("No ground-truth box for this image: IoU is not computed.")
        iou, iobb = best_match(pred_boxes, truth)
        prob = float(probs[index])
        if card.task_kind == "multilabel" and prob < LOW_PROBABILITY:
            warnings.append(
                f"The model gives {finding} a low probability ({prob:.2f}); this heatmap shows where it looked, "
                "not a finding it sees."
            )
        overlay = fit_overlay(render_overlay(xray.to_uint8(), heat, float(opacity), pred_boxes, truth))
        doc = {
            "finding": finding,
            "probability": prob,
            "method": settings.method,
            "layer": settings.layer,
            "box_rule": settings.rule.describe(),
            "image_size": [xray.width, xray.height],
            "predicted_boxes": [_rounded(b) for b in pred_boxes],
            "ground_truth_boxes": [_rounded(b) for b in truth],
            "ground_truth_source": source,
            "iou": iou,
            "iobb": iobb,
            "per_box": [{"ground_truth": _rounded(t), "iou": i, "iobb": b}
                        for t, (i, b) in zip(truth, match_truth(pred_boxes, truth), strict=True)],
            "warnings": warnings,
        }
        return overlay, doc


__all__ = ["DemoService", "Prediction", "USER_ERRORS"]
