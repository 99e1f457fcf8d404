"""The Gradio app: ``build_demo()`` returns the Blocks; nothing heavy happens at import."""

from __future__ import annotations

import functools
import html
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from cxr_demo import INTENDED_USE
from cxr_demo.cam import CAM_LABELS
from cxr_demo.card import OPERATING_POINT_HELP, ModelCard
from cxr_demo.groundtruth import boxed_findings, default_examples
from cxr_demo.images import IMAGE_SUFFIXES, XRay
from cxr_demo.overlay import PRED_COLOUR, TRUTH_COLOUR
from cxr_demo.service import USER_ERRORS, DemoService
from cxr_demo.uploads import UploadStore
from cxr_demo.zoo import Zoo

log = logging.getLogger(__name__)

UPLOAD_TYPES = list(IMAGE_SUFFIXES)
MAX_FILE_SIZE = "64mb"
MOST_PROBABLE = "(most probable)"


def user_errors_as_gr_error(fn: Callable) -> Callable:
    """Turn the service's user errors into ``gr.Error`` carrying their sentence (API clients see exactly
    that sentence); anything else is a bug and propagates."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise gr.Error(str(e), title="Cannot analyse this input") from e

    return wrapper


def findings_html(doc: dict[str, Any]) -> str:
    """A sorted bar chart of probabilities with each threshold marked; flagged findings stand out."""
    rows = sorted(doc["findings"], key=lambda r: -r["probability"])
    lines = [
        '<div class="cxr-findings"><table style="width:100%;border-collapse:collapse;font-size:14px">',
        "<thead><tr><th style='text-align:left'>Finding</th><th style='text-align:left;width:50%'>Probability "
        "(black tick = threshold)</th><th>p</th><th>threshold</th><th>flag</th></tr></thead><tbody>",
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
        weight = "bold" if pos else "normal"
        lines.append(
            f"<tr class='{'flagged' if pos else 'not-flagged'}' style='border-bottom:1px solid #dee2e6'>"
            f"<td style='font-weight:{weight}'>{html.escape(r['name'])}</td><td>{bar}</td>"
            f"<td style='text-align:right'>{p:.3f}</td><td style='text-align:right'>{'' if t is None else f'{t:.3f}'}</td>"
            f"<td style='text-align:center'>{flag}</td></tr>"
        )
    lines.append("</tbody></table>")
    n_pos = sum(r["positive"] for r in rows)
    lines.append(
        f"<p>{n_pos} of {len(rows)} findings pass the <b>{html.escape(doc['operating_point'])}</b> thresholds. "
        f"<i>{html.escape(INTENDED_USE)}</i></p>"
    )
    for w in doc.get("warnings", []):
        lines.append(f"<p style='color:#d9480f'>&#9888; {html.escape(w)}</p>")
    lines.append("</div>")
    return "\n".join(lines)


def card_markdown(card: ModelCard, eval_path: Path | None) -> str:
    """The model card rendered for people."""
    m = card.eval_metrics
    out = [f"## {card.name} (v{card.version})", f"**{INTENDED_USE}**", "", card.description, "",
           f"- **Architecture:** `{card.architecture}` {json.dumps(card.model_args)}, input {card.input_size} px, "
           f"mean {card.mean}, std {card.std}",
           f"- **Initialisation:** {card.init}", f"- **Training data:** {card.data_source}",
           f"- **Task:** {card.task} ({card.task_kind}), labels: {', '.join(card.label_names)}",
           f"- **Heatmap layer:** `{card.cam_target_layer}`", f"- **License:** {card.license}",
           f"- **Weights sha256:** `{card.sha256}`", ""]
    if m is not None:
        ci = f" (95% CI {m.macro_auroc_ci95[0]:.3f}–{m.macro_auroc_ci95[1]:.3f})" if m.macro_auroc_ci95 else ""
        out += [f"### Evaluation (from `{m.source_file}`)", f"{m.dataset}, {m.n_images} images.", ""]
        if m.macro_auroc is not None:
            out.append(f"- **Macro AUROC:** {m.macro_auroc:.3f}{ci}")
        if m.mean_box_iou is not None:
            out.append(f"- **Mean box IoU** (heatmap box vs radiologist box): {m.mean_box_iou:.3f} over {m.n_boxes} boxes")
        per = {}
        if eval_path is not None and eval_path.is_file():
            ev = json.loads(eval_path.read_text())
            per = ev.get("per_label", {})
        if per:
            out += ["", "| finding | AUROC | 95% CI | positives |", "|---|---|---|---|"]
            for k, v in per.items():
                ci_k = v.get("auroc_ci95")
                auc = "n/a" if v.get("auroc") is None else f"{v['auroc']:.3f}"
                ci_s = "n/a" if not ci_k else f"{ci_k[0]:.3f}–{ci_k[1]:.3f}"
                out.append(f"| {k} | {auc} | {ci_s} | {v.get('positives')} |")
            if ev.get("caution"):
                out += ["", f"*{ev['caution']}*"]
        elif m.per_label_auroc:
            out += ["", "| finding | AUROC |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in m.per_label_auroc.items()]
    else:
        out.append("*No evaluation file: this model's performance is unknown.*")
    if card.limitations:
        out += ["", "### Limitations"] + [f"- {line}" for line in card.limitations]
    out += ["", "### Operating points"] + [f"- `{k}`: {v}" for k, v in OPERATING_POINT_HELP.items() if k in card.operating_points]
    out += ["", "### Changelog"] + [f"- {c}" for c in card.changelog]
    return "\n".join(out)


class Handlers:
    """The app's event handlers: Gradio values in, Gradio values out, user errors as ``gr.Error``.

    Every handler that takes an image takes the upload's path and the session's decoded image
    (``gr.State``); :class:`UploadStore` decides which one to analyse. They can be called without a
    browser or a server.
    """

    def __init__(self, zoo: Zoo, examples: list[str]) -> None:
        self.zoo = zoo
        self.service = DemoService(zoo)
        self.store = UploadStore({Path(p).name for p in examples})

    def model_info(self, name: str | None):
        """Summary, operating points, findings and card of the chosen model."""
        if not name or name not in self.zoo.cards:
            return "", gr.update(), gr.update(), ""
        card = self.zoo.cards[name]
        ops = card.operating_points
        return (
            f"**{card.summary}**  \n{INTENDED_USE}",
            gr.update(choices=ops, value=ops[0]),
            gr.update(choices=[MOST_PROBABLE] + card.label_names, value=MOST_PROBABLE),
            card_markdown(card, self.zoo.eval_file(name)),
        )

    @user_errors_as_gr_error
    def on_upload(self, path: str | None, model_name: str | None, state: XRay | None):
        """Decode a new upload: preview, the finding the radiologist boxed, a note, the session's image."""
        if not path:
            return None, gr.update(), "", None
        xray = self.store.take(path, state)
        boxed = boxed_findings(xray.name)
        note = f"{xray.source_format}, {xray.width} x {xray.height} px."
        if boxed:
            note += f" Radiologist boxes available for: {', '.join(boxed)}."
        note += "".join(f"  \n&#9888; {w}" for w in xray.warnings)
        update = gr.update()
        if boxed and model_name in self.zoo.cards and boxed[0] in self.zoo.cards[model_name].label_names:
            update = gr.update(value=boxed[0])
        return xray.to_uint8(), update, note, xray

    def models_api(self) -> list[dict]:
        """Every zoo entry: name, task, label names, operating points and headline metrics."""
        return self.service.models()

    @user_errors_as_gr_error
    def predict(self, path: str | None, model_name: str, operating_point: str, state: XRay | None = None
                ) -> tuple[dict, str]:
        """Probability, threshold and flag for every finding of the chosen model."""
        pred = self.service.predict(self.store.take(path, state), model_name, operating_point)
        return pred.document, findings_html(pred.document)

    @user_errors_as_gr_error
    def explain(self, path: str | None, model_name: str, finding: str | None, method: str, ground_truth_box: str = "",
                opacity: float = 0.5, box_threshold: float = 0.0, state: XRay | None = None):
        """Heatmap overlay for one finding, its box, and IoU/IoBB against ground truth when there is one."""
        if finding in ("", MOST_PROBABLE):
            finding = None
        overlay, doc = self.service.explain(self.store.take(path, state), model_name, finding, method,
                                            ground_truth_box, opacity, box_threshold)
        return overlay, doc, explain_markdown(doc)

    @user_errors_as_gr_error
    def compare(self, path: str | None, operating_point: str, state: XRay | None = None,
                progress=gr.Progress()) -> tuple[str, dict]:
        """Every zoo model on the same image, probabilities side by side."""
        xray = self.store.take(path, state)
        results = {}
        for name in progress.tqdm(self.zoo.names, desc="Running every model"):
            card = self.zoo.cards[name]
            op = operating_point if operating_point in card.operating_points else card.operating_points[0]
            results[name] = self.service.predict(xray, name, op).document
        return compare_html(results), {"operating_point": operating_point, "results": results}


def explain_markdown(doc: dict[str, Any]) -> str:
    """The explain result in words: finding, method, box rule, IoU per ground-truth box, warnings."""
    lines = [f"**{doc['finding']}** (p = {doc['probability']:.3f}), {CAM_LABELS[doc['method']]} at `{doc['layer']}`, "
             f"box: {doc['box_rule']}; "
             f"<span style='color:rgb{PRED_COLOUR}'>&#9632;</span> model's box, "
             f"<span style='color:rgb{TRUTH_COLOUR}'>&#9632;</span> radiologist's box."]
    if doc["iou"] is not None:
        lines.append(f"**IoU {doc['iou']:.3f}**, IoBB {doc['iobb']:.3f} (ground truth: {doc['ground_truth_source']}).")
        for i, b in enumerate(doc["per_box"], 1):
            lines.append(f"- box {i} {b['ground_truth']}: IoU {b['iou']:.3f}, IoBB {b['iobb']:.3f}")
    else:
        lines.append("No ground truth for this finding: no IoU.")
    lines += [f"&#9888; {w}" for w in doc["warnings"]]
    return "  \n".join(lines)


def compare_html(results: dict[str, dict]) -> str:
    """Findings as rows, models as columns; a value that passes its model's threshold is bold."""
    labels: list[str] = []
    for doc in results.values():
        labels += [r["name"] for r in doc["findings"] if r["name"] not in labels]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in results)
    body = []
    for lab in labels:
        cells = []
        for doc in results.values():
            row = next((r for r in doc["findings"] if r["name"] == lab), None)
            if row is None:
                cells.append("<td>—</td>")
            else:
                style = "font-weight:bold;color:#d9480f" if row["positive"] else ""
                cells.append(f"<td style='text-align:right;{style}'>{row['probability']:.3f}</td>")
        body.append(f"<tr><td>{html.escape(lab)}</td>{''.join(cells)}</tr>")
    return (f"<table style='width:100%'><thead><tr><th>finding</th>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table><p>Bold = passes that model's threshold.</p>")


def build_demo(zoo: Zoo | None = None, examples: list[str] | None = None) -> gr.Blocks:
    """Build the app. ``zoo`` defaults to the configured zoo (local checkpoints or the Hub)."""
    zoo = zoo or Zoo()
    names = zoo.names
    default_model = names[0] if names else None
    examples = default_examples() if examples is None else examples
    handlers = Handlers(zoo, examples)

    # Uploads are deleted as soon as they are decoded (UploadStore); generated overlays are deleted from
    # Gradio's cache after 10 minutes (checked every 5).
    with gr.Blocks(title="Chest X-ray model zoo", delete_cache=(300, 600)) as demo:
        # The decoded upload for this browser session; dropped with the session or after 30 minutes.
        image_state = gr.State(None, time_to_live=1800)
        gr.Markdown(
            f"# Chest X-ray model zoo\n**{INTENDED_USE}** Models trained by this project on small public data "
            "sets; see each model card for how well (or badly) it does."
        )
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Chest X-ray (PNG 8/16-bit, JPEG or DICOM)", file_types=UPLOAD_TYPES,
                                 type="filepath")
                preview = gr.Image(label="Image as read", interactive=False, height=320, type="numpy", format="png")
                image_note = gr.Markdown()
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[upload], label="Examples (NIH test images; the first have radiologist boxes)")
                model = gr.Dropdown(names, value=default_model, label="Model", allow_custom_value=True)
                model_summary = gr.Markdown()
                op = gr.Dropdown(["f1", "youden", "screening"], value="f1", label="Operating point",
                                 allow_custom_value=True,
                              info="f1 = F1-optimal, youden = max sens+spec, screening = sensitivity >= 0.9 (tuned on validation)")
                predict_btn = gr.Button("Predict findings", variant="primary")
            with gr.Column(scale=3):
                with gr.Tab("Findings"):
                    findings = gr.HTML(label="Findings")
                    with gr.Accordion("JSON", open=False):
                        findings_json = gr.JSON(label="predict result")
                with gr.Tab("Heatmap"):
                    with gr.Row():
                        finding = gr.Dropdown([MOST_PROBABLE], value=MOST_PROBABLE, label="Finding",
                                              allow_custom_value=True)
                        method = gr.Dropdown([("default (chosen by the localisation study)", "default")]
                                             + [(CAM_LABELS[k], k) for k in CAM_LABELS],
                                             value="default", label="Heatmap method", allow_custom_value=True)
                    with gr.Row():
                        opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap opacity")
                        box_threshold = gr.Slider(0.0, 0.95, value=0.0, step=0.05,
                                                  label="Box threshold (fraction of heatmap max; 0 = the model's tuned rule)")
                    gt_box = gr.Textbox(value="", label="Ground-truth box (optional): x, y, w, h in image pixels; ';' between boxes",
                                        placeholder="e.g. 120, 80, 60, 90 (leave empty to use the NIH box list)")
                    explain_btn = gr.Button("Show heatmap", variant="primary")
                    # JPEG: Gradio encodes the 384 px overlay in under 1 ms (PNG: ~50 ms, WebP: ~17 ms on 2 cores);
                    # it is a picture of where the model looked, not pixels to read a diagnosis from.
                    overlay = gr.Image(label="Heatmap overlay", type="numpy", interactive=False, format="jpeg",
                                       elem_id="overlay")
                    explain_note = gr.Markdown()
                    with gr.Accordion("JSON", open=False):
                        explain_json = gr.JSON(label="explain result")
                with gr.Tab("Compare models"):
                    compare_btn = gr.Button("Run every model on this image")
                    compare_table = gr.HTML()
                    compare_json = gr.JSON(visible=False)
                with gr.Tab("Model card"):
                    card_md = gr.Markdown()

        model.change(handlers.model_info, [model], [model_summary, op, finding, card_md], api_visibility="private")
        demo.load(handlers.model_info, [model], [model_summary, op, finding, card_md], api_visibility="private")
        upload.change(handlers.on_upload, [upload, model, image_state], [preview, finding, image_note, image_state],
                      api_visibility="private")
        gr.api(handlers.models_api, api_name="models")
        predict_btn.click(handlers.predict, [upload, model, op, image_state], [findings_json, findings], api_name="predict",
                          concurrency_id="model", concurrency_limit=1)
        explain_btn.click(handlers.explain, [upload, model, finding, method, gt_box, opacity, box_threshold, image_state],
                          [overlay, explain_json, explain_note], api_name="explain", concurrency_id="model",
                          concurrency_limit=1)
        compare_btn.click(handlers.compare, [upload, op, image_state], [compare_table, compare_json], api_name="compare",
                          concurrency_id="model", concurrency_limit=1)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Arguments for ``demo.launch``: upload limit, and file access to the example films only (not their folder)."""
    return {"max_file_size": MAX_FILE_SIZE, "allowed_paths": sorted(str(Path(p).resolve()) for p in default_examples())}
