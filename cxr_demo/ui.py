"""The Gradio app: ``build_demo()`` returns the Blocks; nothing heavy happens at import."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import html
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from cxr_demo import INTENDED_USE, calibration
from cxr_demo.boxes import IMAGE_FREE_SOURCES
from cxr_demo.cam import CAM_LABELS, PRIOR_LABELS, SLOW_CAM_METHODS, prior_text
from cxr_demo.card import OPERATING_POINT_HELP, ModelCard
from cxr_demo.groundtruth import boxed_findings, default_examples
from cxr_demo.images import IMAGE_SUFFIXES, XRay
from cxr_demo.labels import display_name
from cxr_demo.memory import HEATMAP_NICE, HEATMAP_THREADS, NicedThreads, with_torch_threads
from cxr_demo.ood import measurement as ood_measurement
from cxr_demo.ood import rate_text
from cxr_demo.overlay import OUTLINE_COLOUR, PRED_COLOUR, TRUTH_COLOUR, colour_bar_css
from cxr_demo.paths import PROJECT_ROOT
from cxr_demo.service import USER_ERRORS, ClientGone, DemoService
from cxr_demo.uploads import MAX_FILES_PER_UPLOAD, UploadGuard, UploadStore, client_identity
from cxr_demo.zoo import Zoo

log = logging.getLogger(__name__)

UPLOAD_TYPES = list(IMAGE_SUFFIXES)
MAX_FILE_SIZE = "64mb"
# A bounded queue: a burst beyond it is told the server is busy instead of waiting without end.
QUEUE_MAX_SIZE = 32
# Two lanes of the queue: a heatmap, a report or a compare (seconds, or minutes for Score-CAM) never holds up a
# /predict (a fraction of a second). The heatmap lane runs two at a time so that one slow heatmap (at most one,
# DemoService refuses a second) does not hold up the fast ones. DemoService keeps their models apart. Two
# /predicts at a time starved the heatmaps under load (README, Speed).
PREDICT_LANE, HEATMAP_LANE = "predict", "heatmap"
PREDICT_SLOTS, HEATMAP_SLOTS = 1, 2
# Intra-op threads: a /predict every core the process has (read here, in the importing thread, before any request),
# set and restored by each call (Gradio reuses its worker threads); the heatmap lane's own threads
# CXR_DEMO_HEATMAP_THREADS (cxr_demo.memory; 0, the default: the same), set once as each starts.
PREDICT_THREADS = torch.get_num_threads()
HEATMAP_LANE_THREADS = HEATMAP_THREADS or PREDICT_THREADS
# The heatmap lane's calls run in threads of their own at a lower scheduling priority (cxr_demo.memory.HEATMAP_NICE),
# each with HEATMAP_LANE_THREADS intra-op threads: when a heatmap and a /predict both want a core, the /predict gets it.
# One spare thread beyond the lane's slots.
HEATMAP_POOL = NicedThreads(HEATMAP_SLOTS + 1, HEATMAP_NICE, "heatmap-lane", torch_threads=HEATMAP_LANE_THREADS)
# (every, older than) seconds: an overlay is a whole radiograph; it is fetched within seconds of being made.
CACHE_CLEANING = (60, 120)
# seconds a result stays once it has been delivered (DeliveredResults): time for the page to draw it
DELIVERED_GRACE_S = 10.0
MOST_PROBABLE = "(most probable)"
# On a phone the bar column gives way, so the numbers, thresholds and flags stay in view.
APP_CSS = """
@media (max-width: 640px) {
  .cxr-findings .cxr-bar { display: none; }
  .cxr-findings table { font-size: 12px !important; }
}
.cxr-findings th, .cxr-findings td, .cxr-compare th, .cxr-compare td { padding: 2px 4px; }
#examples .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important;
                            grid-template-rows: none !important; grid-auto-rows: auto !important; }
#examples .grid-wrap { min-height: 0 !important; max-height: none !important; height: auto !important;
                       overflow-y: visible !important; padding-top: 44px !important; }
#examples .caption-label { font-size: 11px; }
"""


def checked_slider(*args, **kwargs) -> gr.Slider:
    """A slider whose value reaches the handler unchecked, so the service answers a bad API value ("abc",
    None, NaN, out of range) with its own sentence instead of Gradio's bare comparison error. (An instance
    override, not a subclass: Gradio writes a .pyi stub beside the module of every Component subclass.)"""
    slider = gr.Slider(*args, **kwargs)
    slider.preprocess = lambda payload: payload
    return slider


def user_errors_as_gr_error(fn: Callable) -> Callable:
    """Turn the service's user errors into ``gr.Error`` carrying their sentence (API clients see exactly
    that sentence) and one log line without a traceback; anything else is a bug and propagates."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            # One line per user error: which handler and which kind, never a traceback, a path or a file name.
            log.info("user error in %s: %s", fn.__name__, type(e).__name__)
            raise gr.Error(str(e), title="Cannot analyse this input", print_exception=False) from None
        except ClientGone:
            log.info("%s stopped: its client has gone", fn.__name__)
            raise gr.Error("Stopped: the page that asked for this result was closed.", print_exception=False) from None

    return wrapper


FINDINGS_PLACEHOLDER = ("<div class='cxr-findings cxr-empty'><p>Upload a chest X-ray or click an example: the findings "
                        "appear here as soon as the film is read.</p></div>")
HEATMAP_PLACEHOLDER = "Choose a finding and press **Show heatmap** to see where the model looked."
COMPARE_PLACEHOLDER = ("<p class='cxr-empty'>Press the button to run every model of the chosen model's task on this "
                       "film.</p>")


def findings_html(doc: dict[str, Any]) -> str:
    """A sorted bar chart of probabilities with each threshold marked; flagged findings stand out. It scrolls
    sideways inside its column rather than being cut off on a narrow screen."""
    rows = sorted(doc["findings"], key=lambda r: -r["probability"])
    lines = [
        '<div class="cxr-findings" style="overflow-x:auto;max-width:100%">'
        '<table style="width:100%;border-collapse:collapse;font-size:14px">',
        "<thead><tr><th style='text-align:left'>Finding</th><th class='cxr-bar' style='text-align:left;width:38%;min-width:90px'>"
        f"Probability (black tick = threshold)</th><th>{'calibrated ' if doc.get('calibrated') else ''}probability</th>"
        "<th>threshold</th><th>flag</th></tr></thead><tbody>",
    ]
    for r in rows:
        p = r["probability"]
        t = r["threshold"]
        pos = r["positive"]
        colour = "#d9480f" if pos else "#4c6ef5"
        tick = (
            f"<div style='position:absolute;left:{100 * t:.1f}%;top:-3px;bottom:-3px;width:2px;background:#000'></div>"
            if t is not None else ""
        )
        bar = (
            "<div style='position:relative;height:14px;background:#e9ecef;border-radius:3px'>"
            f"<div style='width:{100 * p:.1f}%;height:100%;background:{colour};border-radius:3px'></div>{tick}</div>"
        )
        flag = "<b style='color:#d9480f'>&#9888; POSITIVE</b>" if pos else "—"
        meaning = ", ".join(f"{k} {r[key]:.2f}" for k, key in (("sensitivity", "validation_sensitivity"),
                                                               ("specificity", "validation_specificity"),
                                                               ("PPV", "validation_ppv")) if r.get(key) is not None)
        if meaning:
            flag = f"<span title='this flag on validation images: {html.escape(meaning)}'>{flag}</span>"
        if r.get("reliable") is False:
            flag = ("<span style='color:#868e96' title='test AUROC 95% CI includes 0.5: no better than chance for "
                    "this model, never flagged'>not reliable</span>")
        weight = "bold" if pos else "normal"
        lines.append(
            f"<tr class='{'flagged' if pos else 'not-flagged'}' style='border-bottom:1px solid #dee2e6'>"
            f"<td style='font-weight:{weight}'>{html.escape(display_name(r['name']))}</td><td class='cxr-bar'>{bar}</td>"
            f"<td style='text-align:right'>{p:.3f}</td><td style='text-align:right'>"
            + ("<span title='a multi-class model has one decision rule: the most probable class is its answer'>top "
               "class</span>" if t is None else f"{t:.3f}") + "</td>"
            f"<td style='text-align:center;white-space:nowrap'>{flag}</td></tr>"
        )
    lines.append("</tbody></table></div>")
    n_pos = sum(r["positive"] for r in rows)
    lines.append(
        f"<p>{n_pos} of {len(rows)} findings pass the <b>{html.escape(doc['operating_point'])}</b> thresholds "
        "(hover a flag for its validation sensitivity, specificity and PPV). "
        f"<i>{html.escape(INTENDED_USE)}</i></p>"
    )
    if doc.get("calibration_text"):
        lines.append(f"<p style='color:#495057'>{html.escape(doc['calibration_text'])}</p>")
    unreliable = [display_name(r["name"]) for r in rows if r.get("reliable") is False]
    if unreliable:
        lines.append(f"<p style='color:#868e96'>Not reliable for this model (test AUROC 95% CI includes 0.5), so never "
                     f"flagged: {html.escape(', '.join(unreliable))}.</p>")
    for w in doc.get("warnings", []):
        lines.append(f"<p style='color:#d9480f'>&#9888; {html.escape(w)}</p>")
    return "\n".join(lines)


def card_markdown(card: ModelCard, eval_path: Path | None) -> str:
    """The model card rendered for people."""
    m = card.eval_metrics
    out = [f"## {card.name} (v{card.version})", f"**{INTENDED_USE}**", "", card.description, "",
           f"- **Architecture:** `{card.architecture}` {json.dumps(card.model_args)}, input {card.input_size} px, "
           f"mean {card.mean}, std {card.std}",
           f"- **Initialisation:** {card.init}", f"- **Training data:** {card.data_source}",
           f"- **Task:** {card.task} ({card.task_kind}), labels: {', '.join(map(display_name, card.label_names))}",
           f"- **Heatmap layer:** `{card.cam_target_layer}`", f"- **License:** {card.license}",
           f"- **Weights sha256:** `{card.sha256}`", ""]
    if m is not None:
        ci = f" (95% CI {m.macro_auroc_ci95[0]:.3f}–{m.macro_auroc_ci95[1]:.3f})" if m.macro_auroc_ci95 else ""
        out += [f"### Evaluation (from `{m.source_file}`)", f"{m.dataset}, {m.n_images} images.", ""]
        if m.macro_auroc is not None:
            out.append(f"- **Macro AUROC:** {m.macro_auroc:.3f}{ci}")
        ev = json.loads(eval_path.read_text()) if eval_path is not None and eval_path.is_file() else {}
        if m.mean_box_iou is not None:
            loc = ev.get("localisation") or {}
            how = "; ".join(str(loc[k]) for k in ("settings", "boxes") if loc.get(k))
            out.append(f"- **Mean box IoU** (heatmap box vs radiologist box): {m.mean_box_iou:.3f} over {m.n_boxes} boxes"
                       + (f" ({how})" if how else ""))
        if card.explain_defaults is None and card.task == "nih14":
            out.append("- **Heatmap defaults:** not studied for this model (Grad-CAM at its last layer, plain box rule)")
        elif card.explain_defaults is not None:
            d = card.explain_defaults
            out.append(f"- **Heatmap defaults** (localisation study, `{d.source_file}`): {CAM_LABELS.get(d.method, d.method)} "
                       f"at `{d.layer}`, anatomical prior: {prior_text(d.prior)}")
            if d.adds_over_image_free() is not None:
                verdict = ("better than" if d.adds_over_image_free() else
                           "**no better than** (read its heatmaps as where the model looked, not where the finding is)")
                out.append(f"  - on the study's report half: mean box IoU {d.report_mean_iou:.3f}, {verdict} a box drawn "
                           f"without looking at the film ({d.image_free_mean_iou:.3f})")
        per = ev.get("per_label", {})
        if per:
            out += ["", "| finding | AUROC | 95% CI | positives |", "|---|---|---|---|"]
            for k, v in per.items():
                ci_k = v.get("auroc_ci95")
                auc = "n/a" if v.get("auroc") is None else f"{v['auroc']:.3f}"
                ci_s = "n/a" if not ci_k else f"{ci_k[0]:.3f}–{ci_k[1]:.3f}"
                out.append(f"| {display_name(k)} | {auc} | {ci_s} | {v.get('positives')} |")
            if ev.get("caution"):
                out += ["", f"*{ev['caution']}*"]
        elif m.per_label_auroc:
            out += ["", "| finding | AUROC |", "|---|---|"] + [f"| {display_name(k)} | {v:.3f} |" for k, v in m.per_label_auroc.items()]
    else:
        out.append("*No evaluation file: this model's performance is unknown.*")
    if card.limitations:
        out += ["", "### Limitations"] + [f"- {line}" for line in card.limitations]
    out += calibration.card_lines(card, ev if m is not None else {}, "The reliability plot is below this card.")
    out += ["", "### Operating points"] + [f"- `{k}`: {v}" for k, v in OPERATING_POINT_HELP.items() if k in card.operating_points]
    out += flags_per_image_lines(card)
    out += ood_lines(card)
    out += ["", "### Changelog"] + [f"- {c}" for c in card.changelog]
    return "\n".join(out)


def ood_lines(card: ModelCard) -> list[str]:
    """What the model's out-of-distribution check catches and how often it false-alarms (``training.ood``'s file)."""
    if card.ood is None:
        return ["", "### The right model for the film", "No out-of-distribution check for this model."]
    d = ood_measurement(card, PROJECT_ROOT)
    if d is None:
        return []
    own = d["false_alarm_on_own_films"].get(f"{card.task} test")
    caught = [f"{k}: {rate_text(v)}" for k, v in d["catch_rate_on_other_populations_test_films"].items()]
    out = ["", "### The right model for the film",
           f"Out-of-distribution check (`{card.ood.source_file}`): warns on "
           + "; ".join(caught) + (f"; false alarms on {rate_text(own)} own test films." if own else ".")]
    if card.ood.features_from:
        out.append(f"The check reads the features of `{card.ood.features_from}`, a model of the same training films "
                   "that tells them from other populations better than this one's own (one more forward pass per film).")
    if d.get("note"):
        out.append(f"*{d['note']}*")
    return out


def flags_per_image_lines(card: ModelCard) -> list[str]:
    """How many findings per validation image each operating point flags, beside how many are truly present
    (``training.flag_rates``' file, when it is shipped with the project)."""
    source = (card.training.get("flag_meaning") or {}).get("source_file")
    path = PROJECT_ROOT / source if source else None
    if path is None or not path.is_file():
        return []
    d = json.loads(path.read_text())
    if d.get("weights_sha256") != card.sha256:
        return []
    ops = d.get("operating_points", {})
    parts = [f"`{op}` {v['flags_per_image_as_shown']:.2f}" for op, v in ops.items() if op in card.operating_points]
    return ["", f"Findings flagged per validation image ({d['n_validation_images']} images): " + ", ".join(parts)
            + f"; truly present: {d['true_findings_per_image']:.2f} per image (`{source}`; the thresholds were tuned "
            "on these images, so the rates are optimistic)."]


REPORT_LIFETIME_S = 120


def write_report(pdf: bytes, model_name: str) -> str:
    """``pdf`` in a private folder of the app's temporary directory, as ``cxr-report-<model>-<UTC time>.pdf`` (no
    patient file name); the folder is removed after :data:`REPORT_LIFETIME_S` (Gradio serves its own copy, which
    its cache cleaner removes)."""
    folder = Path(tempfile.mkdtemp(prefix="report-", dir=os.environ.get("GRADIO_TEMP_DIR") or None))
    path = folder / f"cxr-report-{model_name}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}.pdf"
    path.write_bytes(pdf)
    timer = threading.Timer(REPORT_LIFETIME_S, shutil.rmtree, args=(folder,), kwargs={"ignore_errors": True})
    timer.daemon = True
    timer.start()
    return str(path)


def client_gone_check(demo: gr.Blocks | None, request: gr.Request | None) -> Callable[[], bool] | None:
    """A check that answers True once the client behind ``request`` has gone: Gradio marks the running jobs of a
    session dead when its event stream closes (a closed tab, a dropped connection, a client that stopped
    reading) but cannot stop a function already running in a worker thread, so long work asks this between its
    steps. None without a server (tests, scripts). Reads Gradio 6's queue (``active_jobs``, ``Event.alive``);
    if those ever go, the check answers False and the work runs to its end as before."""
    session = getattr(request, "session_hash", None) if request is not None else None
    if demo is None or not session:
        return None

    def gone() -> bool:
        try:
            for jobs in list(getattr(demo._queue, "active_jobs", None) or []):
                for job in list(jobs or []):
                    if getattr(job, "session_hash", None) == session and getattr(job, "alive", True) is False:
                        return True
        except (AttributeError, RuntimeError, TypeError):
            return False
        return False

    return gone


def who(request: gr.Request | None) -> str | None:
    """The client behind a request (None when called without a server: tests, scripts)."""
    if request is None:
        return None
    client = getattr(request, "client", None)
    return client_identity(request.headers or {}, getattr(client, "host", None))


def reliability_image(folder: Path) -> np.ndarray | None:
    """The model's reliability plot (``reliability.png`` beside its card), when it has one."""
    path = folder / "reliability.png"
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError):
        return None


def without_empty_temp_file(component):
    """``component`` (a gr.File or gr.UploadButton of type ``filepath``) without the empty ``tmp*`` file that
    Gradio 6.31's ``_process_single_file`` creates (and never deletes) in the cache folder for every request that
    hands a file path on: one per /predict, 201 after 200 calls. The path handed on is the same. Set on the
    instance: a subclass would make Gradio write a ``.pyi`` stub beside this module."""
    from gradio.utils import NamedString
    from gradio_client import utils as client_utils

    def process_single_file(f):
        if component.file_types and not client_utils.is_valid_file(f.path, component.file_types):
            raise gr.Error(f"Invalid file type. Please upload a file that is one of these formats: {component.file_types}")
        return NamedString(f.path)

    if component.type == "filepath":
        component._process_single_file = process_single_file
    return component


class Handlers:
    """The app's event handlers: Gradio values in, Gradio values out, user errors as ``gr.Error``.

    Every handler that takes an image takes the upload's path and the session's decoded image
    (``gr.State``); :class:`UploadStore` decides which one to analyse. They can be called without a
    browser or a server.
    """

    def __init__(self, zoo: Zoo, examples: list[str]) -> None:
        self.zoo = zoo
        self.examples = list(examples)
        self.service = DemoService(zoo)
        self.store = UploadStore(kept=lambda: kept_files(self.demo) if self.demo is not None else set())
        self.demo: gr.Blocks | None = None  # set by build_demo: long work asks its queue whether the client has gone

    def model_info(self, name: str | None):
        """Summary, operating points, findings and card of the chosen model."""
        if not name or name not in self.zoo.cards:
            return "", gr.update(), gr.update(), "", None
        card = self.zoo.cards[name]
        ops = card.operating_points
        return (
            f"**{card.summary}**  \n{INTENDED_USE}",
            gr.update(choices=ops, value=ops[0]),
            gr.update(choices=[MOST_PROBABLE] + [(display_name(lab), lab) for lab in card.label_names],
                      value=MOST_PROBABLE),
            card_markdown(card, self.zoo.eval_file(name)),
            reliability_image(self.zoo.eval_file(name).parent),
        )

    @staticmethod
    def cleared_results() -> tuple:
        """Every result view emptied: findings, findings JSON, overlay, explain JSON and note, compare view
        and JSON, PDF report. A new film (or none) must never sit next to the previous film's results."""
        return FINDINGS_PLACEHOLDER, None, None, None, HEATMAP_PLACEHOLDER, COMPARE_PLACEHOLDER, None, None

    @user_errors_as_gr_error
    def on_upload(self, path: str | None, model_name: str | None, state: XRay | None,
                  request: gr.Request | None = None):
        """Decode a new upload (or a cleared one): preview, the finding the radiologist boxed, a note, the
        session's image, and every result view cleared."""
        if not path:
            return (None, gr.update(), "", None, *self.cleared_results())
        xray = self.store.take(path, state, who(request))
        boxed = boxed_findings(xray.box_name)
        note = f"{xray.source_format}, {xray.width} x {xray.height} px."
        if boxed:
            note += f" Radiologist boxes available for: {', '.join(map(display_name, boxed))}."
        note += "".join(f"  \n&#9888; {w}" for w in xray.warnings)
        update = gr.update()
        if boxed and model_name in self.zoo.cards and boxed[0] in self.zoo.cards[model_name].label_names:
            update = gr.update(value=boxed[0])
        return (xray.to_uint8(), update, note, xray, *self.cleared_results())

    def predict_new_film(self, path: str | None, model_name: str, operating_point: str, state: XRay | None = None,
                         request: gr.Request | None = None):
        """The findings of a film just uploaded; nothing to do when the film was cleared (``on_upload`` has
        emptied the views already)."""
        if not path:
            return gr.update(), gr.update()
        return self.predict(path, model_name, operating_point, state, request)

    def pick_example(self, evt: gr.SelectData) -> str:
        """The example film whose thumbnail was clicked, into the upload box (which starts the analysis)."""
        return self.examples[evt.index]

    def models_api(self) -> list[dict]:
        """Every zoo entry: name, task, label names, operating points and headline metrics."""
        return self.service.models()

    @user_errors_as_gr_error
    @with_torch_threads(PREDICT_THREADS)
    def predict(self, path: str | None, model_name: str, operating_point: str, state: XRay | None = None,
                request: gr.Request | None = None) -> tuple[dict, str]:
        """Probability, threshold and flag for every finding of the chosen model."""
        pred = self.service.predict(self.store.take(path, state, who(request)), model_name, operating_point)
        return pred.document, findings_html(pred.document)

    @user_errors_as_gr_error
    @HEATMAP_POOL.runs
    def report(self, path: str | None, model_name: str, operating_point: str, finding: str | None = None,
               method: str = "default", ground_truth_box: str = "", state: XRay | None = None,
               request: gr.Request | None = None) -> str:
        """A one-page PDF of this film's analysis (findings, heatmap of the chosen finding with the model's studied
        settings, model and weights hash, date, disclaimer); the file is deleted two minutes after it is made."""
        from cxr_demo.report import report_pdf  # fpdf2 costs 0.6 s to import: not at start-up

        xray = self.store.take(path, state, who(request))
        pred = self.service.predict(xray, model_name, operating_point)
        overlay, explained = self.service.explain(xray, model_name, None if finding in ("", MOST_PROBABLE) else finding,
                                                  method or "default", ground_truth_box or None,
                                                  client_gone=client_gone_check(self.demo, request))
        pdf = report_pdf(pred.document, pred.card, xray.to_uint8(), overlay, explained, xray.name)
        return write_report(pdf, pred.card.name)

    @user_errors_as_gr_error
    @HEATMAP_POOL.runs
    def explain(self, path: str | None, model_name: str, finding: str | None, method: str, ground_truth_box: str = "",
                opacity: float = 0.5, box_threshold: float = 0.0, prior: str = "default", lung_outline: bool = False,
                state: XRay | None = None, progress=gr.Progress(), request: gr.Request | None = None):
        """Heatmap overlay for one finding, its box, and IoU/IoBB against ground truth when there is one; the
        heatmap restricted to the chest (anatomical prior) and the lungs outlined on request. A slow method (when
        the server allows them) shows its batches of forward passes done in Gradio's progress bar, not only the
        queue's guess from earlier calls."""
        if finding in ("", MOST_PROBABLE):
            finding = None
        overlay, doc = self.service.explain(self.store.take(path, state, who(request)), model_name, finding, method,
                                            ground_truth_box, opacity, box_threshold, prior, lung_outline,
                                            client_gone=client_gone_check(self.demo, request), progress=progress.tqdm)
        return overlay, doc, explain_markdown(doc)

    def explain_studied_prior(self, path: str | None, model_name: str, finding: str | None, method: str,
                              ground_truth_box: str = "", opacity: float = 0.5, box_threshold: float = 0.0,
                              state: XRay | None = None, progress=gr.Progress(), request: gr.Request | None = None):
        """``/explain`` as it was before the anatomical prior (seven values): the model's studied prior, no
        outline, so HTTP callers that send every value keep working; ``/explain_prior`` takes both."""
        return self.explain(path, model_name, finding, method, ground_truth_box, opacity, box_threshold,
                            "default", False, state=state, progress=progress, request=request)

    @user_errors_as_gr_error
    @HEATMAP_POOL.runs
    def compare(self, path: str | None, operating_point: str, model_name: str | None = None,
                state: XRay | None = None, progress=gr.Progress(), request: gr.Request | None = None
                ) -> tuple[str, dict]:
        """Every zoo model of the chosen model's task on the same film (the default model's task when no model
        is given), probabilities side by side with each model's operating point and flags."""
        xray = self.store.take(path, state, who(request))
        names = self.zoo.names
        task = self.zoo.card(model_name).task if model_name else (self.zoo.cards[names[0]].task if names else None)
        results = {}
        gone = client_gone_check(self.demo, request)
        for name in progress.tqdm([n for n in names if self.zoo.cards[n].task == task], desc="Running every model"):
            if gone is not None and gone():
                raise ClientGone("the client of this comparison has gone")
            card = self.zoo.cards[name]
            op = operating_point if operating_point in card.operating_points else card.operating_points[0]
            results[name] = self.service.predict(xray, name, op).document
        return compare_html(results, task), {"task": task, "operating_point": operating_point, "results": results}


def explain_markdown(doc: dict[str, Any]) -> str:
    """The explain result in words, under the image: finding, method, box rule, a legend and colour scale
    (outside the image), IoU per ground-truth box, and each warning once."""
    truth = bool(doc["ground_truth_boxes"])
    usual = doc.get("box_source") in IMAGE_FREE_SOURCES  # the box comes from the lung model, not the heatmap
    legend = (f"<span style='color:rgb{PRED_COLOUR}'>&#9632;</span> P = "
              + ("the finding's usual place in these lungs (not the heatmap)" if usual else "model's box"))
    if truth:
        legend += f", <span style='color:rgb{TRUTH_COLOUR}'>&#9632;</span> T = radiologist's box"
    if doc.get("lung_outline"):
        legend += f", <span style='color:rgb{OUTLINE_COLOUR}'>&#9632;</span> lung outline"
    paragraphs = [
        f"**{display_name(doc['finding'])}** (probability {doc['probability']:.3f}), {CAM_LABELS[doc['method']]} "
        f"at `{doc['layer']}`, box: {doc['box_rule']}. Anatomical prior: {doc['prior_text']}"
        + (" (the study's choice for this model)." if doc.get("studied_defaults") else "."),
        "<div class='cxr-colour-bar' style='display:flex;align-items:center;gap:6px;font-size:12px'>"
        "<span>low</span><span style='flex:1;max-width:260px;height:10px;border-radius:2px;"
        f"background:{colour_bar_css()}'></span><span>high attention</span>"
        f"<span style='margin-left:12px'>{legend}</span></div>",
    ]
    if doc["iou"] is not None:
        paragraphs.append(f"**IoU {doc['iou']:.3f}**, IoBB {doc['iobb']:.3f} (ground truth: "
                          f"{doc['ground_truth_source']}).")
        paragraphs.append("\n".join(f"- T{i} {b['ground_truth']}: IoU {b['iou']:.3f}, IoBB {b['iobb']:.3f}"
                                     for i, b in enumerate(doc["per_box"], 1)))
    elif not any("IoU" in w or "box" in w for w in doc["warnings"]):
        paragraphs.append("No ground truth for this finding: no IoU.")
    if doc["warnings"]:
        paragraphs.append("  \n".join(f"&#9888; {w}" for w in doc["warnings"]))
    return "\n\n".join(paragraphs)


def _short(name: str, task: str | None) -> str:
    """A model's name without its task prefix, for narrow column headers."""
    return name[len(task) + 1:] if task and name.startswith(task + "-") else name


def compare_html(results: dict[str, dict], task: str | None = None) -> str:
    """Findings as rows, models as columns (one task only), each column headed by its operating point; a
    value that passes its model's threshold is bold and marked. The table scrolls sideways inside its column,
    with the finding names kept in view."""
    labels: list[str] = []
    for doc in results.values():
        labels += [r["name"] for r in doc["findings"] if r["name"] not in labels]
    sticky = "position:sticky;left:0;background:var(--background-fill-primary, #fff);text-align:left"
    head = "".join(f"<th title='{html.escape(n)}' style='font-size:12px;min-width:60px;word-break:keep-all'>"
                   + html.escape(_short(n, task)).replace("-", "-<wbr>") + "</th>" for n in results)
    ops = "".join(f"<td style='font-size:12px;text-align:right'>{html.escape(d['operating_point'])}</td>"
                  for d in results.values())
    body = [f"<tr><td style='{sticky};font-size:12px'><i>operating point</i></td>{ops}</tr>"]
    for lab in labels:
        cells = []
        for doc in results.values():
            row = next((r for r in doc["findings"] if r["name"] == lab), None)
            if row is None:
                cells.append("<td>—</td>")
                continue
            t = row["threshold"]
            tip = f"threshold {t:.3f}" if t is not None else "no threshold (argmax rule)"
            text = f"{row['probability']:.3f}" + (" &#10003;" if row["positive"] else "")
            style = "font-weight:bold;color:#d9480f;" if row["positive"] else ""
            cells.append(f"<td title='{tip}' style='text-align:right;white-space:nowrap;{style}'>{text}</td>")
        body.append(f"<tr><td style='{sticky}'>{html.escape(display_name(lab))}</td>{''.join(cells)}</tr>")
    return ("<div class='cxr-compare' style='overflow-x:auto;max-width:100%'>"
            f"<table style='border-collapse:collapse;font-size:13px'><thead><tr><th style='{sticky}'>finding</th>{head}"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
            f"<p>{len(results)} models of the task {html.escape(str(task))}. Bold with &#10003; = passes that "
            "model's threshold at its operating point (hover a value for the threshold).</p>")


def _keep_examples_cached(demo: gr.Blocks, component: gr.components.Component, names: set[str]) -> None:
    """Exempt Gradio's cached copies of the example films from ``delete_cache``: Gradio 6 files them as
    temporary files but does not record them as kept, so the cleaner removed them ten minutes after start and
    every example click then failed."""
    for temp_set in demo.temp_file_sets:
        component.keep_in_cache.update(f for f in temp_set if Path(f).name in names)


def build_demo(zoo: Zoo | None = None, examples: list[str] | None = None) -> gr.Blocks:
    """Build the app. ``zoo`` defaults to the configured zoo (local checkpoints or the Hub)."""
    zoo = zoo or Zoo()
    names = zoo.names
    default_model = names[0] if names else None
    examples = default_examples() if examples is None else examples
    handlers = Handlers(zoo, examples)
    op_help = ("f1: few flags, about as many as findings · youden: sensitivity + specificity · screening: "
               "sensitivity >= 0.9, many flags (validation)")

    # Uploads are deleted as soon as they are decoded (UploadStore); generated overlays are deleted from
    # Gradio's cache after 2 minutes, checked every minute by ResultCleaner (started with the server, not
    # Gradio's delete_cache, see there); the example films' cached copies are kept.
    with gr.Blocks(title="Chest X-ray model zoo") as demo:
        # The decoded upload for this browser session; dropped with the session or after 30 minutes.
        image_state = gr.State(None, time_to_live=1800)
        gr.Markdown(
            f"# Chest X-ray model zoo\n**{INTENDED_USE}** Models trained by this project on small public data "
            "sets; see each model card for how well (or badly) it does."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                upload = without_empty_temp_file(gr.File(
                    label="Chest X-ray (PNG 8/16-bit, JPEG or DICOM): drop a file here or click", file_types=UPLOAD_TYPES,
                    type="filepath", height=110))
                another = without_empty_temp_file(gr.UploadButton("Upload another film", file_types=UPLOAD_TYPES,
                                                                  size="sm", variant="secondary"))
                with gr.Row():
                    model = gr.Dropdown(names, value=default_model, label="Model", allow_custom_value=True,
                                        min_width=160)
                    op = gr.Dropdown(["f1", "youden", "screening"], value="f1", label="Operating point",
                                     allow_custom_value=True, min_width=120, info=op_help)
                predict_btn = gr.Button("Predict findings", variant="primary")
                model_summary = gr.Markdown()
                preview = gr.Image(label="Image as read", interactive=False, height=300, type="numpy", format="png")
                image_note = gr.Markdown()
                gallery = None
                if examples:
                    gallery = gr.Gallery(
                        value=[(p, Path(p).stem) for p in examples], label="Examples (NIH test films; the first six "
                        "have radiologist boxes): click one", columns=4, height="auto", allow_preview=False,
                        buttons=[], elem_id="examples", interactive=False)
            with gr.Column(scale=3, min_width=320):
                with gr.Tab("Findings"):
                    findings = gr.HTML(FINDINGS_PLACEHOLDER, label="Findings")
                    with gr.Row():
                        report_btn = gr.Button("Make a PDF report (findings + heatmap)", size="sm", min_width=160)
                        report_file = gr.File(label="PDF report (kept 2 minutes)", interactive=False, height=60,
                                              min_width=160)
                    with gr.Accordion("JSON", open=False):
                        findings_json = gr.JSON(label="predict result")
                with gr.Tab("Heatmap"):
                    with gr.Row():
                        finding = gr.Dropdown([MOST_PROBABLE], value=MOST_PROBABLE, label="Finding",
                                              allow_custom_value=True, min_width=140)
                        method = gr.Dropdown([("default (chosen by the localisation study)", "default")]
                                             + [(CAM_LABELS[k], k) for k in CAM_LABELS
                                                if k not in SLOW_CAM_METHODS or handlers.service.allow_slow_cam],
                                             value="default", label="Heatmap method", allow_custom_value=True,
                                             min_width=140)
                    with gr.Row():
                        opacity = checked_slider(0, 1, value=0.5, step=0.05, label="Heatmap opacity", min_width=140)
                        box_threshold = checked_slider(0.0, 0.95, value=0.0, step=0.05, min_width=140,
                                                  label="Box threshold (fraction of heatmap max; 0 = the model's tuned rule)")
                    with gr.Row():
                        prior = gr.Dropdown([(v, k) for k, v in PRIOR_LABELS.items()], value="default",
                                            label="Anatomical prior (heatmap and boxes kept inside the chest)",
                                            allow_custom_value=True, min_width=140)
                        lung_outline = gr.Checkbox(False, label="Outline the lungs", elem_id="lung-outline",
                                                   min_width=140)
                    gt_box = gr.Textbox(value="", label="Ground-truth box (optional): x, y, w, h in image pixels; ';' between boxes",
                                        placeholder="e.g. 120, 80, 60, 90 (leave empty to use the NIH box list)")
                    explain_btn = gr.Button("Show heatmap", variant="primary")
                    # PNG at the film's own resolution (up to 1024 px a side): ~50 ms to encode on 2 cores.
                    overlay = gr.Image(label="Heatmap overlay", type="numpy", interactive=False, format="png",
                                       elem_id="overlay")
                    explain_note = gr.Markdown(HEATMAP_PLACEHOLDER)
                    with gr.Accordion("JSON", open=False):
                        explain_json = gr.JSON(label="explain result")
                with gr.Tab("Compare"):
                    compare_btn = gr.Button("Run every model of this task on this film")
                    compare_table = gr.HTML(COMPARE_PLACEHOLDER)
                    compare_json = gr.JSON(visible=False)
                with gr.Tab("Model card"):
                    card_md = gr.Markdown()
                    reliability_plot = gr.Image(label="Reliability: raw and calibrated probabilities", type="numpy",
                                                interactive=False, format="png", buttons=[])

        results = [findings, findings_json, overlay, explain_json, explain_note, compare_table, compare_json, report_file]
        model.change(handlers.model_info, [model], [model_summary, op, finding, card_md, reliability_plot], api_visibility="private")
        demo.load(handlers.model_info, [model], [model_summary, op, finding, card_md, reliability_plot], api_visibility="private")
        # A new or cleared film clears every result, then (when there is a film) the analysis starts at once.
        upload.change(handlers.on_upload, [upload, model, image_state],
                      [preview, finding, image_note, image_state, *results], api_visibility="private").success(
            handlers.predict_new_film, [upload, model, op, image_state], [findings_json, findings],
            api_visibility="private", concurrency_id=PREDICT_LANE, concurrency_limit=PREDICT_SLOTS)
        # "Upload another film" replaces the film without clearing the box first. The file is handed on as is
        # (it already lies in Gradio's upload folder), so decoding it deletes it like any upload.
        another.upload(lambda path: path, another, upload, api_visibility="private")
        if gallery is not None:
            gallery.select(handlers.pick_example, None, upload, api_visibility="private")
            _keep_examples_cached(demo, gallery, {Path(p).name for p in examples})
        gr.api(handlers.models_api, api_name="models")
        predict_btn.click(handlers.predict, [upload, model, op, image_state], [findings_json, findings], api_name="predict",
                          concurrency_id=PREDICT_LANE, concurrency_limit=PREDICT_SLOTS)
        explain_btn.click(handlers.explain, [upload, model, finding, method, gt_box, opacity, box_threshold, prior,
                                             lung_outline, image_state],
                          [overlay, explain_json, explain_note], api_name="explain_prior", concurrency_id=HEATMAP_LANE,
                          concurrency_limit=HEATMAP_SLOTS)
        # /explain keeps its seven values (plain-HTTP callers must send every value of an endpoint); it is an
        # event of a button no one sees, with the model's studied prior.
        explain_compat = gr.Button(visible=False)
        explain_compat.click(handlers.explain_studied_prior, [upload, model, finding, method, gt_box, opacity,
                                                              box_threshold, image_state],
                             [overlay, explain_json, explain_note], api_name="explain", concurrency_id=HEATMAP_LANE,
                             concurrency_limit=HEATMAP_SLOTS)
        report_btn.click(handlers.report, [upload, model, op, finding, method, gt_box, image_state], report_file,
                         api_name="report", concurrency_id=HEATMAP_LANE, concurrency_limit=HEATMAP_SLOTS)
        compare_btn.click(handlers.compare, [upload, op, model, image_state], [compare_table, compare_json],
                          api_name="compare", concurrency_id=HEATMAP_LANE, concurrency_limit=HEATMAP_SLOTS)
    handlers.demo = demo
    return demo


def kept_files(demo: gr.Blocks) -> set[str]:
    """Temporary files a component keeps for the server's life (the example films' cached copies)."""
    keep: set[str] = set()
    for block in list(demo.blocks.values()):
        keep.update(getattr(block, "keep_in_cache", ()))
    return keep


def delete_empty_folders(root: Path, age_s: float | None) -> int:
    """Delete the folders directly under Gradio's temp folder ``root`` that are empty and have not changed for
    ``age_s`` seconds (all empty ones when None); returns how many went.

    Gradio files each upload and each result in a folder named by the sha256 of its content and makes it with
    ``mkdir(exist_ok=True)`` just before moving the file in. A request-time ``rmdir`` races with another request
    for the same content (a 500 on the upload: the folder went between its ``mkdir`` and the move), so a file's
    folder is left when the file is deleted and goes here, minutes later, once nothing has been put in it since
    (adding or removing a file updates a folder's mtime)."""
    now, gone = time.time(), 0
    try:
        children = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    for entry in children:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if age_s is not None and now - entry.stat(follow_symlinks=False).st_mtime <= age_s:
                continue
            os.rmdir(entry.path)  # fails when not empty
            gone += 1
        except OSError:
            pass  # not empty, or gone meanwhile
    return gone


def delete_old_files(demo: gr.Blocks, age_s: float | None) -> int:
    """Delete the files Gradio made for ``demo`` (overlays, reports' served copies, cached uploads) older than
    ``age_s`` seconds by ctime (all when None), except those a component keeps (the example films); returns how
    many went. What Gradio 6.31's ``delete_cache`` does, except that each set of files is read from a snapshot
    (Gradio's iterates the live sets while request threads add to them: one "Set changed size during iteration"
    ends its cleaning task for the server's life) and names of files already gone leave the set (Gradio's keeps
    every deleted upload's name, so each pass grows longer)."""
    keep = kept_files(demo)
    now, gone = time.time(), 0
    for temp_set in list(demo.temp_file_sets):
        for name in list(temp_set):
            if name in keep:
                continue
            try:
                if age_s is None or now - Path(name).lstat().st_ctime > age_s:
                    os.remove(name)
                    gone += 1
                else:
                    continue
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not delete a temporary file: %s", type(e).__name__)
                continue
            temp_set.discard(name)
    return gone


class ResultCleaner:
    """Every ``every_s`` seconds, :func:`delete_old_files` with ``age_s`` (:data:`CACHE_CLEANING`) in a daemon
    thread; an error is logged and the next round runs, so cleaning never stops for the server's life."""

    def __init__(self, demo: gr.Blocks, every_s: float = CACHE_CLEANING[0], age_s: float = CACHE_CLEANING[1]) -> None:
        self.demo, self.every_s, self.age_s = demo, every_s, age_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="result-cleaner", daemon=True)

    def start(self) -> ResultCleaner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                gone = delete_old_files(self.demo, self.age_s)
                if gone:
                    log.info("deleted %d temporary files older than %.0f s", gone, self.age_s)
                delete_empty_folders(Path(self.demo.GRADIO_CACHE), self.age_s)
            except Exception as e:  # noqa: BLE001 - the next round tries again
                log.error("cleaning temporary files failed: %s", type(e).__name__)


def written_ns(name: str) -> int | None:
    """When the file was last written (ns), or None when it is gone."""
    try:
        return os.stat(name).st_mtime_ns
    except OSError:
        return None


def delete_result(demo: gr.Blocks, name: str, delivered_ns: int | None = None) -> bool:
    """Delete one temporary file of ``demo`` (not a kept one); True when it went. With ``delivered_ns`` (when the
    delivered file had been written), a file written again since is left: Gradio names a result by its content, so the same film analysed the same way again (another client, or the
    same one twice) is the same path, rewritten for an answer whose client has not fetched it yet."""
    if name in kept_files(demo):
        return False
    if delivered_ns is not None and written_ns(name) not in (delivered_ns, None):
        return False
    try:
        os.remove(name)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not delete a delivered file: %s", type(e).__name__)
        return False
    for temp_set in list(demo.temp_file_sets):
        temp_set.discard(name)
    # Its folder (named by the content hash) stays for ResultCleaner: another request writing the same result
    # may have just made it and be about to write into it.
    return True


class DeliveredResults:
    """ASGI middleware on Gradio's file route (``GET .../file=<path>``): once a temporary file of the app (an
    overlay or the preview, each a whole radiograph; a report's served copy) has been sent whole (status 200),
    it is deleted ``grace_s`` seconds later, long enough for a page to draw it, instead of living
    :data:`CACHE_CLEANING` seconds. Example films (kept) and files of other requests are untouched; results
    nobody fetches still go with :class:`ResultCleaner`. A second fetch after the grace gets 404, so the page
    offers the report (PDF) to keep a heatmap. A result written again within the grace (the same answer for
    another request: same content, same path) is left for that request's own fetch."""

    def __init__(self, app, demo: gr.Blocks, grace_s: float = DELIVERED_GRACE_S) -> None:
        self.app, self.demo, self.grace_s = app, demo, grace_s

    def _is_result(self, name: str) -> bool:
        return any(name in temp_set for temp_set in list(self.demo.temp_file_sets)) and name not in kept_files(
            self.demo)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "GET" or "/file=" not in path:
            await self.app(scope, receive, send)
            return
        name = path.split("/file=", 1)[1]  # ASGI paths arrive percent-decoded
        sent: dict[str, Any] = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                sent["status"] = message.get("status")
            elif message["type"] == "http.response.pathsend" or (
                    message["type"] == "http.response.body" and not message.get("more_body", False)):
                sent["whole"] = True
            await send(message)

        await self.app(scope, receive, watch)
        if sent.get("status") == 200 and sent.get("whole") and self._is_result(name):
            asyncio.get_running_loop().call_later(self.grace_s, delete_result, self.demo, name, written_ns(name))


def configure_queue(demo: gr.Blocks) -> gr.Blocks:
    """The app's queue: lanes :data:`PREDICT_LANE` (one request running) and :data:`HEATMAP_LANE`
    (:data:`HEATMAP_SLOTS`), at most :data:`QUEUE_MAX_SIZE` waiting."""
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_MAX_SIZE)


def launch_kwargs(demo: gr.Blocks | None = None) -> dict[str, Any]:
    """Arguments for ``demo.launch``: upload size limit, the upload guard (who uploaded what; at most a few files
    per upload request), results deleted once delivered (:class:`DeliveredResults`, when ``demo`` is given), and
    file access to the example films only (not their folder)."""
    from starlette.middleware import Middleware

    middleware = [Middleware(UploadGuard, max_files=MAX_FILES_PER_UPLOAD)]
    if demo is not None:
        middleware.append(Middleware(DeliveredResults, demo=demo))
    return {"max_file_size": MAX_FILE_SIZE, "css": APP_CSS, "app_kwargs": {"middleware": middleware},
            "allowed_paths": sorted(str(Path(p).resolve()) for p in default_examples())}
