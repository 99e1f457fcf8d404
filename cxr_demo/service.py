"""What the app does, without the UI: predict and explain on an already decoded radiograph.

Uploads are decoded by ``cxr_demo.uploads``; the Gradio layer (``cxr_demo.ui``) turns the
:data:`USER_ERRORS` into ``gr.Error``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cxr_demo import calibration
from cxr_demo.boxes import IMAGE_FREE_SOURCES, best_match, chest_frame, finding_boxes, match_truth, predicted_boxes
from cxr_demo.cam import (
    CAM_LABELS,
    CAM_PROGRESS,
    SLOW_CAM_METHODS,
    explain_settings,
    heatmap_and_logits,
    prior_text,
    resize_heatmap,
)
from cxr_demo.card import ChoiceError, ModelCard, choice_number, choice_text
from cxr_demo.groundtruth import BoxInputError, nih_boxes_for, parse_boxes
from cxr_demo.images import ImageInputError, XRay
from cxr_demo.inference import (
    features_and_logits,
    findings_table,
    logits_to_probabilities,
    ood_features,
    preprocess,
    with_whole_film,
)
from cxr_demo.lungs import LungResult, LungSegmenter, apply_prior, default_segmenter
from cxr_demo.models import WeightsError
from cxr_demo.overlay import fit_overlay, render_overlay
from cxr_demo.zoo import UnknownModelError, Zoo

log = logging.getLogger(__name__)

LOW_PROBABILITY = 0.2
OOD_WARNING = ("This image looks unlike the chest X-rays this model was trained on (out-of-distribution check); "
               "its findings may be meaningless.")
OTHER_POPULATION = ("This film looks like films of another population than the {population} this model was trained "
                    "on (e.g. an adult film given to a paediatric model): its answer may be meaningless here; choose a "
                    "model trained on films like this one.")
# Whom each task's models were trained on, in words.
TASK_POPULATION = {"nih14": "adult NIH ChestX-ray14 films", "kermany2": "paediatric films (children aged 1-5)",
                   "kermany3": "paediatric films (children aged 1-5)",
                   "covid3": "COVID-19 collection films (COVID-19, 'Normal' and paediatric viral pneumonia)"}

NOT_RELIABLE = ("not reliable for this model: its test AUROC's 95% CI includes 0.5 (no better than chance), "
                "so it is never flagged")
OOD_UNAVAILABLE = ("This model's is-this-a-chest-X-ray check could not be loaded, so this film was not checked "
                   "against the model's training images.")

NO_LUNG_MODEL = ("The lung-field model is not installed here (or its weights failed their check), so the anatomical "
                 "prior and the lung outline are off.")
NO_LUNGS = ("No lung fields were found in this image, so the heatmap is not restricted to the chest; is it a frontal "
            "chest X-ray?")
UNSTUDIED = ("No localisation study has been run for this model: the heatmap uses Grad-CAM at its last layer and "
             "the plain box rule, whose agreement with radiologists' boxes is unmeasured.")
NO_BETTER_THAN_A_FIXED_BOX = (
    "For this model the localisation study found that these heatmap settings agree with radiologists' boxes no better "
    "than a box drawn without looking at the film ({where}): mean box IoU {iou:.3f} against {free:.3f} on the study's "
    "report half. Read the heatmap as where the model looked, not as where the finding is.")
IMAGE_FREE_BOXES = {"central_box": "a fixed central box", "median_box_per_finding": "the finding's usual box"}
PEAK_OUTSIDE = ("Before the anatomical prior, this heatmap's peak lay outside the chest (the lungs closed over the "
                "mediastinum): the model also looked at {where}.")

CHEST_BOX = ("The box for {finding} is where that finding usually lies relative to the lungs found in this film (the "
             "localisation study chose it: boxes drawn from this model's heatmaps agreed with radiologists' boxes no "
             "better); it does not come from the heatmap, which shows where the model looked.")
NO_CHEST_FOR_BOX = ("The box for {finding} would be placed relative to the chest, but no chest was found in this "
                    "film: the box comes from the heatmap rule instead.")

NOT_A_CHEST = ("This does not look like an upright frontal chest X-ray: {problem}. No finding is flagged; the "
               "probabilities are shown as computed but mean little for such an image.")
NOT_FLAGGED_NOT_A_CHEST = "not flagged: the image did not pass the lung-based is-this-a-chest-X-ray check"

USER_ERRORS: tuple[type[Exception], ...] = (ImageInputError, UnknownModelError, BoxInputError, ChoiceError)


class ClientGone(Exception):
    """The client of a long request went away (its browser tab closed, its connection dropped): the work is
    stopped at its next step, since no one is left to see the answer."""


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


SLOW_HEATMAP_BUSY = ("Another slow heatmap (Score-CAM or Ablation-CAM) is being computed on this server right now; "
                     "only one runs at a time. Try again in a few minutes, or choose a fast method such as Grad-CAM.")


def _labelled_progress(progress: Callable[..., Iterable], method: str, loop: Iterable, desc: str) -> Iterable:
    """Hand a slow heatmap's loop to ``progress`` (``gr.Progress().tqdm``) under the method's name."""
    return progress(loop, desc=f"{method}: {desc}")


class InteractiveFirst:
    """Interactive work before slow work: while a ``/predict`` runs, and for ``linger_s`` after one ends (the next
    one in the queue is usually about to start), each step of a slow heatmap (Score-CAM, Ablation-CAM: hundreds of
    forward passes) waits, for at most ``max_wait_s`` a step, so the slow one still finishes under sustained
    load."""

    def __init__(self, max_wait_s: float = 2.0, linger_s: float = 0.25) -> None:
        self.max_wait_s, self.linger_s = max_wait_s, linger_s
        self._cond = threading.Condition()
        self._urgent = 0
        self._last_end = -math.inf

    @contextmanager
    def urgent(self):
        with self._cond:
            self._urgent += 1
        try:
            yield
        finally:
            with self._cond:
                self._urgent -= 1
                self._last_end = time.monotonic()
                self._cond.notify_all()

    def step_aside(self) -> None:
        deadline = time.monotonic() + self.max_wait_s
        with self._cond:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return
                if self._urgent:
                    self._cond.wait(deadline - now)
                elif now - self._last_end < self.linger_s:
                    self._cond.wait(min(deadline, self._last_end + self.linger_s) - now)
                else:
                    return


class DemoService:
    """Predict and explain with the models of a :class:`Zoo`.

    The app's two lanes (``predict``: one request at a time; ``heatmap``: two) run at once: forward passes use
    the zoo's model without a lock (eval mode under ``inference_mode`` changes nothing); heatmaps use the zoo's
    heatmap copies (:meth:`Zoo.heatmap_model`), because pytorch-grad-cam hooks the layers it explains: fast ones
    one at a time on one copy, a slow one (at most one) on another, stepping aside for ``/predict``
    (:class:`InteractiveFirst`); the lung model keeps its answers for the last films it saw, so a film's chest
    check and lung fields are computed once however many models it goes to.
    """

    def __init__(self, zoo: Zoo, allow_slow_cam: bool | None = None, lungs: LungSegmenter | None | bool = True) -> None:
        """``lungs``: the lung-field model (True: the project's, when installed; None or False: none)."""
        self.zoo = zoo
        if lungs is True:
            lungs = default_segmenter()
        self.lungs: LungSegmenter | None = lungs or None
        self._heatmap_lock = threading.Lock()
        self._slow_heatmap_lock = threading.Lock()
        self._interactive = InteractiveFirst()
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
        # No lock: forward passes of an eval-mode model under inference_mode do not change it, so /predicts run
        # side by side (heatmaps never use this instance).
        with self._interactive.urgent():
            model = self.zoo.model(card.name)
            try:
                detector = self.zoo.ood(card.name)
                feature_card, feature_model = self._ood_features_model(card)
            except Exception as e:  # noqa: BLE001 - a damaged OOD file costs the check, not the answer
                log.warning("out-of-distribution check of %s unavailable: %s", card.name, type(e).__name__)
                detector = feature_card = feature_model = None
                warnings.append(OOD_UNAVAILABLE)
            if feature_model is None or feature_model is model:
                whole = detector is not None and detector.whole_film and card.crop is not None
                if whole:  # the check also sees the film this model only sees a crop of: one batch of two
                    x = with_whole_film(x, xray.pixels, card)
                with torch.inference_mode():
                    features, logits = features_and_logits(model, x)  # one pass: findings and the OOD check
                if whole:
                    features, logits = features.reshape(1, -1), logits[:1]
            else:  # the check reads another model's features (card.ood.features_from): one more forward pass
                with torch.inference_mode():
                    logits = model(x)
                    features = ood_features(feature_model, feature_card, xray.pixels, detector.whole_film)
        probs = logits_to_probabilities(logits, card.task_kind)[0].float().numpy()
        ood = {"checked": detector is not None, "far_from_training_films": None, "other_population": None}
        if detector is not None:
            far, other = (bool(v[0]) for v in detector.outlier_kinds(features.float().numpy()))
            ood.update(far_from_training_films=far, other_population=other)
            if far:
                warnings.append(OOD_WARNING)
            if other:
                warnings.append(OTHER_POPULATION.format(population=TASK_POPULATION.get(card.task, "films")))
        findings = self._with_meaning(card, findings_table(card, probs, op), op)
        problem = self.chest_problem(xray)
        if problem is not None:
            warnings.append(NOT_A_CHEST.format(problem=problem))
            for row in findings:
                if row["positive"]:
                    row["positive"] = False
                    row["note"] = NOT_FLAGGED_NOT_A_CHEST
        cal = card.calibration
        doc = {
            "model": card.name,
            "operating_point": op,
            "calibrated": cal is not None and cal.method != "identity",
            "calibration": None if cal is None else {"method": cal.method, "fitted_on": cal.fitted_on,
                                                     "source_file": cal.source_file},
            "calibration_text": calibration.describe(card),
            "findings": findings,
            "warnings": warnings,
            "chest_check": {"checked": self.lungs is not None, "problem": problem},
            "out_of_distribution": ood,
        }
        return Prediction(doc, xray, card)

    def _ood_features_model(self, card: ModelCard) -> tuple[ModelCard, torch.nn.Module] | tuple[None, None]:
        """The card and model whose features the out-of-distribution check reads: another zoo model when the card
        says ``ood.features_from`` (its weights must be the ones the check was fitted on), else (None, None).

        Raises:
            WeightsError: ``features_from`` is not in the zoo or its weights changed since the check was fitted.
        """
        if card.ood is None or card.ood.features_from is None:
            return None, None
        name = card.ood.features_from
        if name not in self.zoo.cards or self.zoo.card(name).sha256 != card.ood.features_sha256:
            raise WeightsError(f"the out-of-distribution check of {card.name!r} reads the features of {name!r}, "
                               "which is not in the zoo with the weights it was fitted on")
        return self.zoo.card(name), self.zoo.model(name)

    def chest_problem(self, xray: XRay) -> str | None:
        """Why the lung model says this is not an upright frontal chest film (None: it is, or no lung model)."""
        result = self._segment(xray, views=True)
        return None if result is None else result.chest_problem()

    def _segment(self, xray: XRay, views: bool = False) -> LungResult | None:
        """The lung model's result (None when there is no usable lung model: it is then switched off, logged)."""
        if self.lungs is None:
            return None
        try:  # no lock: the segmenter's forward passes are inference-only, its answer cache has a lock of its own
            return self.lungs.segment(xray.pixels, views=views)
        except (WeightsError, OSError) as e:
            log.error("lung-field model switched off: %s", e)
            self.lungs = None
            return None

    def _slow_step(self, client_gone: Callable[[], bool] | None) -> Callable[[], None]:
        """What a slow heatmap does before each of its forward passes: stop if its client has gone, then step
        aside for interactive work."""
        if client_gone is None:
            return self._interactive.step_aside

        def step() -> None:
            if client_gone():
                raise ClientGone("the client of this slow heatmap has gone")
            self._interactive.step_aside()

        return step

    def explain(
        self,
        xray: XRay,
        model_name: str,
        finding: str | None = None,
        method: str | None = None,
        ground_truth: str | None = None,
        opacity: float = 0.5,
        box_threshold: float | None = None,
        prior: str | None = "default",
        lung_outline: bool = False,
        client_gone: Callable[[], bool] | None = None,
        progress: Callable[..., Iterable] | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Heatmap overlay and box agreement for one finding.

        ``method="default"`` uses the method and layer the localisation study chose for this model
        (``explain_defaults`` in its card); ``box_threshold`` None or 0 uses the study's box rule,
        otherwise the largest region above that fraction of the heatmap's maximum.
        Ground truth comes from ``ground_truth`` (typed ``x, y, w, h`` in image pixels) or, when none
        is typed, from the NIH box list matched by the uploaded file's name. ``prior`` restricts the heatmap and
        its boxes to the thorax found by the lung-field model (``"default"``: the shape the study chose for this
        model, ``"off"``, or a shape of :data:`cxr_demo.cam.PRIOR_LABELS`); ``lung_outline`` draws the lungs.
        ``client_gone``: asked before every step of a slow heatmap; once it answers True the heatmap stops with
        :class:`ClientGone` (the slow slot is free again within one step, not minutes later). ``progress``
        (``gr.Progress().tqdm`` in the app) is handed a slow heatmap's loop over its batches of forward passes,
        so a progress bar can count them.
        """
        card = self.zoo.card(model_name)
        finding = choice_text(finding, "finding")
        method = choice_text(method, "heatmap method")
        opacity = choice_number(opacity, "heatmap opacity", 0.0, 1.0)
        box_threshold = None if box_threshold is None else choice_number(box_threshold, "box threshold", 0.0, 0.95)
        if ground_truth is not None and not isinstance(ground_truth, str):
            raise BoxInputError("Type the ground-truth box as text: x, y, w, h (several separated by ';').")
        prior = choice_text(prior, "anatomical prior")
        if not isinstance(lung_outline, bool):
            raise ChoiceError("The lung outline switch must be true or false.")
        settings = explain_settings(card, method, box_threshold, prior)
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
        requested = card.label_names.index(finding) if finding else None
        if settings.method in SLOW_CAM_METHODS:
            # Beside the fast heatmaps (the heatmap lane runs two at a time), one at a time, stepping aside for
            # /predict; a second one is refused at once instead of taking the other slot.
            if not self._slow_heatmap_lock.acquire(blocking=False):
                raise ChoiceError(SLOW_HEATMAP_BUSY)
            shown = CAM_PROGRESS.set(None if progress is None else functools.partial(
                _labelled_progress, progress, CAM_LABELS[settings.method].replace(" (slow)", "")))
            try:
                heat, logits, index = heatmap_and_logits(self.zoo.heatmap_model(card.name, "slow"), card, x, requested,
                                                         settings.method, layer=settings.layer,
                                                         pause=self._slow_step(client_gone))
            finally:
                CAM_PROGRESS.reset(shown)
                self._slow_heatmap_lock.release()
        else:
            with self._heatmap_lock:
                heat, logits, index = heatmap_and_logits(self.zoo.heatmap_model(card.name), card, x, requested,
                                                         settings.method, layer=settings.layer)
        raw_probs = logits_to_probabilities(logits.float(), card.task_kind)[0].numpy()
        probs = calibration.calibrate(card, raw_probs)  # what /predict shows for this film
        finding = card.label_names[index]
        heat = resize_heatmap(heat, xray.width, xray.height, card.crop)
        lungs, lung_doc = self._lungs_for(xray, settings.prior is not None or lung_outline, warnings)
        chest = None
        if lungs is not None:
            chest = lungs.region("hull", xray.width, xray.height)
            py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
            lung_doc["peak_in_chest"] = bool(chest[py, px])
            if not chest[py, px]:
                where = "the " + ("upper" if py < xray.height / 3 else "lower" if py > 2 * xray.height / 3 else "middle")
                where += " " + ("left of the image" if px < xray.width / 3 else "right of the image"
                                if px > 2 * xray.width / 3 else "centre")
                warnings.append(PEAK_OUTSIDE.format(where=where))
            if settings.prior is not None:
                heat = apply_prior(heat, lungs.region(settings.prior, xray.width, xray.height))
        study = card.explain_defaults
        if settings.studied and study is not None and study.adds_over_image_free() is False:
            warnings.append(NO_BETTER_THAN_A_FIXED_BOX.format(
                where=IMAGE_FREE_BOXES.get(study.image_free_baseline, study.image_free_baseline),
                iou=study.report_mean_iou, free=study.image_free_mean_iou))
        if not settings.studied:
            if study is None:
                warnings.append(UNSTUDIED)
            else:
                warnings.append("These heatmap settings differ from the ones the localisation study chose for this "
                                "model (method 'default', prior 'default', box threshold 0); their agreement with "
                                "radiologists' boxes was measured only in the study's other rows.")
        pred_boxes, box_rule, box_source = predicted_boxes(heat, settings.rule), settings.rule.describe(), "rule"
        choice = settings.box_source(finding)
        if choice is not None:
            frame = chest_frame(chest) if chest is not None and choice.source != "heatmap" else None
            fields = lungs.region("lungs", xray.width, xray.height) if frame is not None and choice.source == "place" \
                else None
            chosen = finding_boxes(heat, choice, frame, xray.width, xray.height, fields)
            if chosen is None:
                warnings.append(NO_CHEST_FOR_BOX.format(finding=finding))
            else:
                pred_boxes, box_source = chosen, choice.source
                box_rule = f"{choice.text} (chosen for {finding} by the localisation study)"
                if choice.source in IMAGE_FREE_SOURCES:
                    warnings.append(CHEST_BOX.format(finding=finding))

        typed = parse_boxes(ground_truth, xray.width, xray.height)
        source: str | None = None
        if typed:
            truth, source = typed, "typed by user"
        else:
            nih = nih_boxes_for(xray.box_name, xray.width, xray.height)
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
        outline = lungs.outline(xray.width, xray.height) if lungs is not None and lung_outline else None
        overlay = fit_overlay(render_overlay(xray.to_uint8(), heat, float(opacity), pred_boxes, truth, outline))
        doc = {
            "finding": finding,
            "probability": prob,
            "raw_probability": float(raw_probs[index]),
            "method": settings.method,
            "layer": settings.layer,
            "box_rule": box_rule,
            "box_source": box_source,
            "prior": settings.prior if lungs is not None else None,
            "prior_text": prior_text(settings.prior if lungs is not None else None),
            "studied_defaults": settings.studied,
            "study": None if study is None else {
                "source_file": study.source_file, "report_mean_iou": study.report_mean_iou,
                "image_free_baseline": study.image_free_baseline, "image_free_mean_iou": study.image_free_mean_iou,
                "adds_over_image_free": study.adds_over_image_free()},
            "lungs": lung_doc,
            "lung_outline": outline is not None,
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

    def _lungs_for(self, xray: XRay, requested: bool, warnings: list[str]) -> tuple[LungResult | None, dict]:
        """The lung fields of a film (None when the lung model is missing or finds no lungs; a missing model is
        a warning only when the prior or the outline was ``requested``). They also tell whether the heatmap's
        peak lay in the chest, so they are looked for on every explain."""
        result = self._segment(xray)
        if result is None:
            if requested:
                warnings.append(NO_LUNG_MODEL)
            return None, {"checked": False}
        doc = {"checked": True, "model": self.lungs.card.name, "found": result.found(),
               "lung_fraction": round(result.fraction, 4)}
        if not result.found():
            warnings.append(NO_LUNGS)
            return None, doc
        return result, doc


__all__ = ["USER_ERRORS", "DemoService", "Prediction"]
