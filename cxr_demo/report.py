"""A one-page PDF of one analysis, to keep: the film and its heatmap, the findings table with what each flag
means, the model's name, version and weights hash, the date, and the disclaimer.

Written with fpdf2 (pinned in requirements.txt) rather than by hand. Its built-in fonts are Latin-1, so every
text goes through :func:`latin1`.
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import numpy as np
from fpdf import FPDF
from PIL import Image

from cxr_demo import INTENDED_USE
from cxr_demo.card import OPERATING_POINT_HELP, ModelCard
from cxr_demo.labels import display_name

MULTICLASS_RULE = "the most probable class is the answer (one decision rule; no per-class threshold)"
_REPLACEMENTS = {"\u2013": "-", "\u2014": "-", "\u2192": "->", "\u2265": ">=", "\u2264": "<=", "\u2018": "'",
                 "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...", "\u00d7": "x", "\u2022": "-"}


def latin1(text: Any) -> str:
    """Text the PDF's core fonts can draw: common typography replaced, anything else outside Latin-1 as '?'."""
    s = str(text)
    for a, b in _REPLACEMENTS.items():
        s = s.replace(a, b)
    return s.encode("latin-1", "replace").decode("latin-1")


def _png(pixels: np.ndarray, max_side: int = 900) -> io.BytesIO:
    im = Image.fromarray(pixels)
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    buf.seek(0)
    return buf


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report_pdf(predict_doc: dict, card: ModelCard, film: np.ndarray, overlay: np.ndarray | None = None,
               explain_doc: dict | None = None, file_name: str = "", when: dt.datetime | None = None) -> bytes:
    """The PDF of one analysis: ``predict_doc`` (``/predict``'s JSON), the film as shown (uint8 gray or RGB),
    optionally the heatmap overlay and ``/explain``'s JSON."""
    when = when or dt.datetime.now(dt.timezone.utc)
    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_auto_page_break(auto=False)
    pdf.set_margins(12, 10, 12)
    pdf.add_page()
    pdf.set_title(latin1(f"Chest X-ray analysis: {card.name}"))
    pdf.set_creator("cxr_demo (chest X-ray model zoo)")
    width = pdf.w - pdf.l_margin - pdf.r_margin

    pdf.set_font("Helvetica", "B", 13)
    pdf.cell(width, 7, latin1("Chest X-ray model zoo - analysis report"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "B", 8)
    pdf.set_text_color(200, 60, 15)
    pdf.multi_cell(width, 4, latin1(INTENDED_USE), new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0, 0, 0)
    pdf.set_font("Helvetica", "", 7.5)
    op = predict_doc.get("operating_point", "")
    op_line = MULTICLASS_RULE if op == "argmax" else OPERATING_POINT_HELP.get(op, op)
    facts = [
        f"Date (UTC): {when:%Y-%m-%d %H:%M}    File: {file_name or '(not named)'}",
        f"Model: {card.name} v{card.version} ({card.architecture}, {card.input_size} px)",
        f"Initialisation: {card.init}",
        f"Weights sha256: {card.sha256}",
        f"Operating point: {op} - {op_line}",
        predict_doc.get("calibration_text") or "",
    ]
    for line in facts:
        if line:
            pdf.multi_cell(width, 3.6, latin1(line), new_x="LMARGIN", new_y="NEXT")

    # the film and the overlay side by side
    top = pdf.get_y() + 2
    img_h = 96.0
    images = [("Film as read", film)] + ([("Heatmap overlay", overlay)] if overlay is not None else [])
    slot = width / 2 - 2
    for i, (label, pixels) in enumerate(images):
        h, w = pixels.shape[:2]
        scale = min(slot / w, img_h / h)
        x = pdf.l_margin + i * (slot + 4)
        pdf.image(_png(pixels), x=x, y=top + 4, w=w * scale, h=h * scale)
        pdf.set_xy(x, top)
        pdf.set_font("Helvetica", "B", 7.5)
        pdf.cell(slot, 4, latin1(label))
    y = top + 4 + img_h + 2
    pdf.set_xy(pdf.l_margin, y)
    if explain_doc is not None:
        pdf.set_font("Helvetica", "", 7)
        iou = explain_doc.get("iou")
        txt = (f"Heatmap: {display_name(explain_doc.get('finding', ''))} (p {_fmt(explain_doc.get('probability'))}), "
               f"{explain_doc.get('method')} at {explain_doc.get('layer')}; box rule {explain_doc.get('box_rule')}; "
               f"anatomical prior: {explain_doc.get('prior_text') or 'off'}; "
               + (f"IoU with the radiologist's box {iou:.2f} ({explain_doc.get('ground_truth_source')})."
                  if iou is not None else "no ground-truth box, IoU not computed.")
               + " The heatmap shows where the model looked, not a lesion outline.")
        pdf.multi_cell(width, 3.4, latin1(txt), new_x="LMARGIN", new_y="NEXT")

    # findings table
    multiclass = card.task_kind == "multiclass"
    cols = [("Finding", 34), ("Probability", 18), ("Threshold", 17), ("Flag", 22),
            ("Val. sens.", 15), ("Val. spec.", 15), ("Val. PPV", 14), ("Test AUROC (95% CI)", 36), ("Test pos.", 15)]
    pdf.ln(1)
    pdf.set_font("Helvetica", "B", 7)
    pdf.set_fill_color(233, 236, 239)
    for name, w in cols:
        pdf.cell(w, 4.6, latin1(name), border=1, fill=True)
    pdf.ln()
    pdf.set_font("Helvetica", "", 7)
    rows = sorted(predict_doc["findings"], key=lambda r: -r["probability"])
    for r in rows:
        if r["positive"]:
            flag = "POSITIVE"
        elif r.get("reliable") is False:
            flag = "not reliable"
        elif r.get("note"):
            flag = "not flagged*"
        else:
            flag = "-"
        ci = r.get("test_auroc_ci95")
        auc = "-" if r.get("test_auroc") is None else (f"{r['test_auroc']:.2f}"
                                                       + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""))
        cells = [display_name(r["name"]), f"{r['probability']:.3f}",
                 "top class" if multiclass else _fmt(r.get("threshold"), 3), flag,
                 _fmt(r.get("validation_sensitivity")), _fmt(r.get("validation_specificity")),
                 _fmt(r.get("validation_ppv")), auc, "-" if r.get("test_positives") is None else str(r["test_positives"])]
        pdf.set_font("Helvetica", "B" if r["positive"] else "", 7)
        for (_, w), c in zip(cols, cells, strict=True):
            pdf.cell(w, 4.2, latin1(c), border=1)
        pdf.ln()
    pdf.set_font("Helvetica", "", 6.5)
    n_pos = sum(r["positive"] for r in rows)
    notes = [f"{n_pos} of {len(rows)} findings flagged. Sensitivity, specificity and PPV (at the validation prevalence) "
             "are this flag's rates on the model's validation images; the test AUROC is on the NIH official-test images "
             "here (a biased sample, almost no normal films) or the task's own test split. A finding whose AUROC CI "
             "includes 0.5 is 'not reliable' and never flagged."]
    notes += sorted({f"* {r['note']}" for r in rows if r.get("note") and r.get("reliable") is not False})
    notes += [f"Warning: {w}" for w in predict_doc.get("warnings", [])]
    notes += [f"Heatmap warning: {w}" for w in (explain_doc or {}).get("warnings", [])]
    for line in notes:
        if pdf.get_y() > pdf.h - 22:
            pdf.multi_cell(width, 3.1, latin1("(further notes left out to keep one page)"), new_x="LMARGIN",
                           new_y="NEXT")
            break
        pdf.multi_cell(width, 3.1, latin1(line), new_x="LMARGIN", new_y="NEXT")
    pdf.set_xy(pdf.l_margin, pdf.h - 14)
    pdf.set_font("Helvetica", "I", 6.5)
    pdf.multi_cell(width, 3.1, latin1(f"{INTENDED_USE} Generated by the chest X-ray model zoo demo; the model, its "
                                      "version and weights hash above identify exactly what produced these numbers."),
                   new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
