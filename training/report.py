"""Rebuild the model-zoo reports from the committed cards and evaluation files.

    python -m training.report          # rewrite README.md's zoo table and docs/MODEL_ZOO.md
    python -m training.report --tsne   # also recompute the t-SNE maps (loads each model; minutes on a CPU)
    python -m training.report --check  # exit 1 if either report is stale (the tests run this)

Every number comes from a committed file: ``checkpoints/<name>/eval.json`` and ``config.json``, the
t-SNE maps' ``docs/zoo/tsne-<name>.json`` (which records the sha256 of the weights it was made from),
and ``docs/zoo-retrain.json`` when present.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from cxr_demo.card import EVAL_FILE, F1_FLAG_BUDGET, ModelCard, checkpoint_folders, read_card, zoo_order
from cxr_demo.paths import DEFAULT_CHECKPOINTS
from cxr_demo.paths import PROJECT_ROOT as ROOT
from cxr_demo.zoo import PINS_FILE
from training.model_card import MODEL_CARD_FILE, model_card

log = logging.getLogger(__name__)

START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
ZOO_DOC = ROOT / "docs" / "MODEL_ZOO.md"
TSNE_DIR = ROOT / "docs" / "zoo"


# The in-domain pretraining comparison (training/recipes.py trains these): same architecture, input size
# and recipe; only the initial weights differ.
PRETRAINING_ROWS = [
    ("random", "nih14-lite0-160-random"),
    ("ImageNet", "nih14-lite0-160-imagenet"),
    ("in-domain (pretrained from random)", "nih14-lite0-160-indomain"),
    ("ImageNet, then in-domain", "nih14-lite0-160-imagenet-indomain"),
]
PRETRAINING_TEXT = (
    "EfficientNet-Lite0 at 160 px, fine-tuned on NIH with one recipe (`training/recipes.py`), from four starting "
    "points. In-domain pretraining (`pretrain/`) is supervised multi-task training on every chest X-ray we hold "
    "that is not an NIH test image and not an NIH fine-tuning validation image: NIH train images (14 findings) and "
    "the Kermany training images (normal / bacterial / viral), one sigmoid head with each image's unknown labels "
    "masked. COVID-19 database images are left out (their 'Normal' images are renamed NIH images of unknown split). "
    "Same evaluation images for all four rows."
)


def _checkpoints(checkpoints: Path) -> list[tuple[Path, ModelCard, dict | None]]:
    out = []
    for folder in checkpoint_folders(checkpoints):
        card = read_card(folder)
        ev_path = folder / EVAL_FILE
        out.append((folder, card, json.loads(ev_path.read_text()) if ev_path.is_file() else None))
    return out


def _auc(ev: dict) -> str:
    ci = ev.get("macro_auroc_ci95")
    return f"{ev['macro_auroc']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" if ci else f"{ev['macro_auroc']:.3f}"


def _init(card: ModelCard) -> str:
    return card.init.split(" (")[0]


def zoo_table(checkpoints: Path = DEFAULT_CHECKPOINTS, prefix: str = "") -> str:
    """A markdown table with one row per checkpoint, every number read from its eval.json."""
    lines = [
        "| model | task | architecture | init | train images | val macro AUROC | test macro AUROC (95% CI) | "
        "test images | mean box IoU (boxes) | eval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    entries = _checkpoints(checkpoints)
    default = zoo_order([c for _, c, _ in entries])[:1]
    for folder, card, ev in entries:
        n_train = card.training.get("n_train", "?")
        val = card.training.get("val_macro_auroc")
        val = f"{val:.3f}" if isinstance(val, int | float) else "—"
        name = f"**{card.name}** (app default)" if [card.name] == default else card.name
        if ev is None:
            lines.append(f"| {name} | {card.task} | `{card.architecture}` | {_init(card)} | {n_train} | {val} | "
                         "not evaluated | | | |")
            continue
        loc_doc = ev.get("localisation") or {}
        loc = loc_doc.get("overall")
        how = ("studied defaults" if str(loc_doc.get("settings", "")).startswith("settings chosen") else "unstudied")
        how += ", report half" if "boxes" in loc_doc else ", all boxes"
        iou = f"{loc['mean_iou']:.3f} ({loc['n_boxes']}; {how})" if loc else "—"
        lines.append(
            f"| {name} | {card.task} | `{card.architecture}` {card.input_size}px | {_init(card)} | {n_train} | {val} | "
            f"{_auc(ev)}{'' if ev.get('bootstrap', {}).get('unit') == 'patient' else ' †'} | {ev['n_images']} | {iou} | [eval.json]({prefix}checkpoints/{folder.name}/{EVAL_FILE}) |"
        )
    lines += ["", "The app's default (bold) is the NIH model with the best validation macro AUROC; test numbers play no "
              "part in that choice. 95% intervals resample patients (596 patients behind the 796 NIH test images)"
              + (", except those marked †, evaluated earlier with images resampled (narrower than they should be)."
                 if any("†" in line for line in lines) else ".")]
    return "\n".join(lines)


def model_zoo_doc(checkpoints: Path = DEFAULT_CHECKPOINTS) -> str:
    """The whole of docs/MODEL_ZOO.md."""
    entries = _checkpoints(checkpoints)
    out = [
        "# Model zoo",
        "",
        "Generated by `python -m training.report` from the committed cards and evaluation files; a test fails "
        "when this page is stale. Research demo, not for diagnostic use.",
        "",
        "Every model here was trained on this project's small local copies of the data (NIH: 1.2k training "
        "images of the 86.5k in the full release); the NIH test images are a biased sample of the official "
        "test list (chosen for their boxes). Numbers are far below published results and say so.",
        "",
        "## All checkpoints",
        "",
        zoo_table(checkpoints, prefix="../"),
        "",
    ]
    nih = [(f, c, e) for f, c, e in entries if c.task == "nih14" and e]
    if nih:
        labels = nih[0][1].label_names
        out += ["## NIH ChestX-ray14: AUROC per finding (positives in the test images)", "",
                "| model | " + " | ".join(f"{lab} ({nih[0][2]['per_label'][lab]['positives']})" for lab in labels) + " |",
                "|---|" + "---|" * len(labels)]
        for _, card, ev in nih:
            cells = [f"{ev['per_label'][lab]['auroc']:.2f}" if ev["per_label"][lab]["auroc"] is not None else "—" for lab in labels]
            out.append(f"| {card.name} | " + " | ".join(cells) + " |")
        out += ["", "## Operating points (thresholds tuned on validation images only)", "",
                f"| model | F1 (flag budget {F1_FLAG_BUDGET}x): macro F1 / recall | Youden: macro F1 / recall | screening: macro F1 / recall | exact match (F1 point) |",
                "|---|---|---|---|---|"]
        for _, card, ev in nih:
            ops = ev["operating_points"]
            out.append(f"| {card.name} | " + " | ".join(
                f"{ops[op]['macro_f1']:.3f} / {ops[op]['macro_recall']:.3f}" for op in ("f1", "youden", "screening"))
                + f" | {ops['f1']['exact_match']:.3f} |")
        out.append("")
    multi = [(f, c, e) for f, c, e in entries if c.task_kind == "multiclass" and e]
    if multi:
        out += ["## Other tasks", "", "| model | task | classes | accuracy | macro AUROC (95% CI) | test images | crop |",
                "|---|---|---|---|---|---|---|"]
        for _, card, ev in multi:
            out.append(f"| {card.name} | {card.task} | {', '.join(card.label_names)} | {ev['accuracy']:.3f} | {_auc(ev)} | "
                       f"{ev['n_images']} | {'lung region' if card.crop else 'none'} |")
        out.append("")
    out += calibration_section(entries)
    out += ood_section(entries)
    out += ["## Training runs", "", "| model | init | epochs run (best) | val macro AUROC | loss | lr | input | train seconds | command |",
            "|---|---|---|---|---|---|---|---|---|"]
    for _, card, _ in entries:
        t = card.training
        out.append(f"| {card.name} | {card.init} | {t.get('epochs_run', '?')} ({t.get('best_epoch', '?')}) | "
                   f"{t.get('val_macro_auroc', float('nan')):.3f} | {t.get('loss', '?')} | {t.get('lr', '?')} | "
                   f"{card.input_size}px | {t.get('wall_seconds', '?')} | `{t.get('command', '')}` |")
    out.append("")
    retrain = ROOT / "docs" / "zoo-retrain.json"
    if retrain.is_file():
        runs = json.loads(retrain.read_text())["runs"]
        total = sum(r["wall_seconds"] for r in runs.values())
        nih = [r["wall_seconds"] for n, r in runs.items() if n.startswith(("nih14-", "pretrain-"))]
        out += ["## Full CPU retrain", "",
                f"`python -m training.recipes` trains every entry one after another (training and evaluation): the NIH "
                f"architectures, the pretraining comparison, the paediatric and COVID-19 models. "
                f"Measured wall time of the runs recorded in [zoo-retrain.json](zoo-retrain.json): "
                f"{total / 60:.0f} min for {len(runs)} runs, of which NIH and pretraining {sum(nih) / 60:.0f} min for "
                f"{len(nih)} runs ({next(iter(runs.values()))['machine']}; measured while tests and other work often "
                f"shared the two cores, so an idle machine is faster)."]
        from training.recipes import RECIPES

        untimed = [n for n in RECIPES if n not in runs]
        if untimed:
            out.append(f"Not timed by `training.recipes` (trained before it existed, by the command in its card): "
                       f"{', '.join(untimed)}.")
        out.append("")
    searches = sorted((ROOT / "docs" / "search").glob("*.json"))
    if searches:
        out += ["## Hyperparameter searches (Optuna TPE, validation only)", "",
                "Recorded by `python -m training.search`; the objective is the best validation macro AUROC of each "
                "run. With ~200 validation images, differences of a few hundredths are within noise.", ""]
        for path in searches:
            rec = json.loads(path.read_text())
            out += [f"### {rec['study']}", "", f"`{rec['sampler']}`, Optuna {rec['optuna']}; every trial: "
                    f"`python -m training.train {' '.join(rec['train_args'])}` plus the sampled values. "
                    f"Record: [{path.name}](search/{path.name}).", "",
                    "| trial | sampled by | lr | weight decay | drop rate | val macro AUROC | best epoch / run | seconds |",
                    "|---|---|---|---|---|---|---|---|"]
            for t in rec["trials"]:
                pr = t["params"]
                out.append(f"| {t['number']} | {t.get('sampled_by', '?')} | {pr['lr']:.2e} | {pr['weight_decay']:.2e} | "
                           f"{pr['drop_rate']:.2f} | {t['val_macro_auroc']:.3f} | {t['best_epoch']} / {t['epochs_run']} | "
                           f"{t['seconds']} |")
            if rec.get("best"):
                out += ["", f"Best: trial {rec['best']['number']}; `{rec['best']['command']}`"]
            out.append("")
    by_name = {c.name: (c, e) for _, c, e in entries}
    rows = [(label, by_name[n]) for label, n in PRETRAINING_ROWS if n in by_name and by_name[n][1]]
    if rows:
        out += ["## In-domain pretraining", "", PRETRAINING_TEXT, "",
                "| init | model | val macro AUROC | test macro AUROC (95% CI) | best epoch |", "|---|---|---|---|---|"]
        for label, (card, ev) in rows:
            out.append(f"| {label} | {card.name} | {card.training['val_macro_auroc']:.3f} | {_auc(ev)} | "
                       f"{card.training.get('best_epoch')} of {card.training.get('epochs_run')} |")
        out.append("")
    out += finding_analysis_section()
    tsne = [(c, json.loads((TSNE_DIR / f"tsne-{c.name}.json").read_text())) for _, c, _ in entries
            if (TSNE_DIR / f"tsne-{c.name}.json").is_file()]
    if tsne:
        out += ["## t-SNE of penultimate features on the test images", "",
                "Each point is a test image placed by t-SNE of the model's pooled penultimate features; colour is its "
                "finding when it has exactly one (grey: several; black cross: none). Recompute with `python -m training.report --tsne`.", ""]
        for card, meta in tsne:
            out += [f"### {card.name}", "", f"![t-SNE {card.name}](zoo/tsne-{card.name}.png)", "",
                    f"{meta['n_images']} images; perplexity {meta['perplexity']}; weights sha256 {meta['weights_sha256'][:12]}…", ""]
    out += ["## Per-model files", ""]
    for folder, card, ev in entries:
        roc = f", [ROC](../checkpoints/{folder.name}/roc.png)" if (folder / "roc.png").is_file() else ""
        if (folder / "reliability.png").is_file():
            roc += f", [reliability](../checkpoints/{folder.name}/reliability.png)"
        out.append(f"- **{card.name}**: [card](../checkpoints/{folder.name}/config.json)"
                   + (f", [eval.json](../checkpoints/{folder.name}/{EVAL_FILE})" if ev else "") + roc)
    return "\n".join(out) + "\n"


def ood_section(entries) -> list[str]:
    """docs/MODEL_ZOO.md's table of every model's out-of-distribution check (``docs/ood/<model>.json``)."""
    from cxr_demo.ood import measurement, rate_text

    docs = [(card, d) for _, card, _ in entries if (d := measurement(card, ROOT)) is not None]
    if not docs:
        return []

    def pct(r: dict) -> str:
        return rate_text(r, "count")

    out = ["## Out-of-distribution check (the right model for the film)", "",
           "Written by `python -m training.ood checkpoints/<model>`: a distance check and a population check on the "
           "model's own penultimate features (or, where named, those of a model of the same training films), each passing 99% of its validation films (thresholds and the population "
           "check's strength are set without any test film). A warning in `/predict` when either fires. False alarms "
           "on the model's own test films; catches on other populations' test films, on non-X-ray images and on its "
           "own test films inverted or rotated. Details per model in [docs/ood/](ood/).", "",
           "| model | false alarms, own test films | other populations caught | photos / synthetic caught | "
           "inverted / rotated 90 / rotated 180 caught |", "|---|---|---|---|---|"]
    for card, d in docs:
        own = d["false_alarm_on_own_films"][f"{card.task} test"]
        others = "; ".join(f"{k}: {pct(v)}" for k, v in d["catch_rate_on_other_populations_test_films"].items())
        nx = " / ".join(pct(v) for v in d["catch_rate_on_non_xray"].values())
        tr = " / ".join(pct(v) for v in d["catch_rate_on_transformed_own_test_films"].values())
        name = card.name + (f" (features of {card.ood.features_from})" if card.ood and card.ood.features_from else "")
        out.append(f"| {name} | {pct(own)} | {others} | {nx} | {tr} |")
    notes = sorted({d["note"] for _, d in docs if d.get("note")})
    out += [""] + [f"*{n}*" for n in notes] + ([""] if notes else [])
    return out


def calibration_section(entries) -> list[str]:
    """docs/MODEL_ZOO.md's calibration tables: per model the method chosen on validation and ECE / Brier before and
    after, out of fold on validation and on the test images (``eval.json``'s ``calibration``)."""
    rows = [(c, e["calibration"]) for _, c, e in entries if e and e.get("calibration", {}).get("validation_out_of_fold")]
    if not rows:
        return []
    out = ["## Calibration (post-hoc, fitted on validation only)", "",
           "Written by `python -m training.calibration checkpoints/<model>`: identity, temperature and Platt scaling "
           "(per finding) scored out of fold over 5 patient-disjoint folds of each model's validation images, the "
           "lowest log loss chosen and refitted on all of them; the app, `/compare`, the batch tool and evaluation "
           "show calibrated probabilities (raw ones stay in the JSON as `raw_probability`). ECE: 10 equal-width bins. "
           "Before → after.", ""]
    nih = [(c, k) for c, k in rows if c.task_kind == "multilabel"]
    if nih:
        k = nih[0][1]
        out[-2] += (f" The NIH test images hold almost no normal films (mean label {k['test_before']['prevalence']:.3f} "
                    f"per finding against {k['validation_out_of_fold']['before']['prevalence']:.3f} on validation), a "
                    "shift no calibration fitted on realistic data can remove, so test ECE stays higher.")
        out += ["| model | method | val OOF worst-finding ECE | val OOF pooled ECE | val OOF Brier | test worst-finding ECE "
                "| test pooled ECE | test Brier |", "|---|---|---|---|---|---|---|---|"]
        for c, k in nih:
            v, tb, ta = k["validation_out_of_fold"], k["test_before"], k["test_after"]
            cells = [f"{v['before'][m]:.3f} → {v['after'][m]:.3f}" for m in ("ece_max_over_findings", "ece_pooled", "brier")]
            cells += [f"{tb[m]:.3f} → {ta[m]:.3f}" for m in ("ece_max_over_findings", "ece_pooled", "brier")]
            out.append(f"| {c.name} | {k['method']} | " + " | ".join(cells) + " |")
        out.append("")
    other = [(c, k) for c, k in rows if c.task_kind == "multiclass"]
    if other:
        out += ["| model | method | val OOF top-class ECE | val OOF Brier | test top-class ECE | test Brier |",
                "|---|---|---|---|---|---|"]
        for c, k in other:
            v, tb, ta = k["validation_out_of_fold"], k["test_before"], k["test_after"]
            out.append(f"| {c.name} | {k['method']} | {v['before']['ece_top_class']:.3f} → {v['after']['ece_top_class']:.3f} "
                       f"| {v['before']['brier']:.3f} → {v['after']['brier']:.3f} | {tb['ece_top_class']:.3f} → "
                       f"{ta['ece_top_class']:.3f} | {tb['brier']:.3f} → {ta['brier']:.3f} |")
        out.append("")
    return out


def finding_analysis_section(path: Path = ROOT / "docs" / "analysis" / "findings.json") -> list[str]:
    """docs/MODEL_ZOO.md's section on the findings the models fail, from ``training.finding_analysis``."""
    if not path.is_file():
        return []
    d = json.loads(path.read_text())
    out = ["## Why Cardiomegaly and Consolidation fail", "",
           f"From `{d['command']}` ([findings.json](analysis/findings.json)). Validation: {d['validation']['images']} "
           f"films, {d['validation']['with_a_finding']} with at least one finding; the test images here almost all "
           "carry a finding.", "",
           "| finding | train positives | validation positives | test positives (of images) | test: also Effusion / Atelectasis / Infiltration / Pneumonia / Edema |",
           "|---|---|---|---|---|"]
    for f, c in d["counts"].items():
        co = c["test_co_occurrence"]
        out.append(f"| {f} | {c['train']} of {c['train_images']} | {c['validation']} | {c['test']} of {c['test_images']} | "
                   + " / ".join(str(co.get(k, "—")) for k in ("Effusion", "Atelectasis", "Infiltration", "Pneumonia", "Edema"))
                   + " |")
    out += ["", "| model | finding | val AUROC, all films | val AUROC, films with a finding | test AUROC | "
            "test AUROC among films with Atelectasis / without |", "|---|---|---|---|---|---|"]

    def fmt(v):
        return "—" if v is None else f"{v:.2f}"

    for model, rows in d["models"].items():
        for f, r in rows.items():
            co = r["test_auroc_by_co_finding"]
            out.append(f"| {model} | {f} | {fmt(r['val_auroc_all_films'])} | {fmt(r['val_auroc_films_with_a_finding'])} | "
                       f"{fmt(r['test_auroc'])} | {fmt(co.get('with Atelectasis'))} / {fmt(co.get('without Atelectasis'))} |")
    out += ["", "Reading: a finding's score that ranks well over all validation films but near chance over the films "
            "with a finding separates abnormal from normal films rather than the finding itself; the test images, "
            "nearly all abnormal, then show chance. That is what Consolidation does; Cardiomegaly keeps part of its "
            "signal but rests on few positives (see the counts). The recipe ablation "
            "([ABLATION.md](ABLATION.md)) tries choosing the epoch on the validation films with a finding.", ""]
    return out


def compute_tsne(folder: Path, out_dir: Path = TSNE_DIR, data_root: Path | None = None, perplexity: float = 30.0) -> dict:
    """t-SNE map of one checkpoint's penultimate features on its task's test images (PNG + JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from cxr_demo.inference import feature_array
    from cxr_demo.zoo import load_checkpoint
    from training.data import cached_pixels
    from training.tasks import load_task

    card = read_card(folder)
    model = load_checkpoint(folder)
    records = load_task(card.task, data_root).test
    pixels = cached_pixels(records, card.input_size, card.crop)
    f = feature_array(model, pixels, card.mean, card.std)
    xy = TSNE(n_components=2, perplexity=min(perplexity, (len(f) - 1) / 3), init="pca", random_state=0).fit_transform(
        (f - f.mean(0)) / (f.std(0) + 1e-6))
    Y = np.stack([r.labels for r in records])
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    n_pos = Y.sum(1)
    none, several = n_pos == 0, n_pos > 1
    if none.any():
        ax.scatter(xy[none, 0], xy[none, 1], s=6, c="black", marker="x", linewidths=0.5, label=f"no finding ({none.sum()})")
    if several.any():
        ax.scatter(xy[several, 0], xy[several, 1], s=6, c="lightgrey", label=f"several findings ({several.sum()})")
    cmap = plt.get_cmap("tab20")
    for j, name in enumerate(card.label_names):
        m = (n_pos == 1) & (Y[:, j] == 1)
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=9, color=cmap(j % 20), label=f"{name} ({m.sum()})")
    ax.set(title=f"{card.name}: t-SNE of penultimate features, {card.task} test images", xticks=[], yticks=[])
    ax.legend(fontsize=6, markerscale=1.5, loc="best")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"tsne-{card.name}.png")
    plt.close(fig)
    meta = {"model": card.name, "weights_sha256": card.sha256, "n_images": len(f), "perplexity": min(perplexity, (len(f) - 1) / 3),
            "features": int(f.shape[1]), "command": "python -m training.report --tsne"}
    (out_dir / f"tsne-{card.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def pins_json(checkpoints: Path = DEFAULT_CHECKPOINTS) -> str:
    """The pinned sha256 of every committed checkpoint's weights and OOD file (cxr_demo/pinned_weights.json)."""
    from cxr_demo.lungs import DEFAULT_LUNG_MODEL, LUNG_CARD_FILE, read_lung_card

    models = {card.name: {"sha256": card.sha256, "ood_sha256": card.ood.sha256 if card.ood else None}
              for _, card, _ in _checkpoints(checkpoints)}
    doc = {"comment": "written by python -m training.report; the app serves only these weights", "models": models}
    if (checkpoints / DEFAULT_LUNG_MODEL / LUNG_CARD_FILE).is_file():
        lung = read_lung_card(checkpoints / DEFAULT_LUNG_MODEL)
        doc["lung_model"] = {"name": lung.name, "sha256": lung.sha256}
    return json.dumps(doc, indent=2) + "\n"


def render(readme: str, table: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--tsne", action="store_true", help="recompute the t-SNE maps whose weights changed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.tsne:
        for folder, card, ev in _checkpoints(DEFAULT_CHECKPOINTS):
            meta_path = TSNE_DIR / f"tsne-{card.name}.json"
            if ev and (not meta_path.is_file() or json.loads(meta_path.read_text())["weights_sha256"] != card.sha256):
                log.info("t-SNE for %s", card.name)
                compute_tsne(folder)
    path = ROOT / "README.md"
    text = path.read_text()
    new = render(text, zoo_table())
    doc = model_zoo_doc()
    cards = {folder / MODEL_CARD_FILE: model_card(folder) for folder, _, _ in _checkpoints(DEFAULT_CHECKPOINTS)}
    pins = pins_json()
    if args.check:
        pages = [(path, text, new), (ZOO_DOC, ZOO_DOC.read_text() if ZOO_DOC.is_file() else "", doc),
                 (PINS_FILE, PINS_FILE.read_text() if PINS_FILE.is_file() else "", pins),
                 *[(p, p.read_text() if p.is_file() else "", fresh) for p, fresh in cards.items()]]
        stale = [str(p.relative_to(ROOT)) for p, old, fresh in pages if old != fresh]
        for card in (c for _, c, _ in _checkpoints(DEFAULT_CHECKPOINTS)):
            meta_path = TSNE_DIR / f"tsne-{card.name}.json"
            if meta_path.is_file() and json.loads(meta_path.read_text())["weights_sha256"] != card.sha256:
                stale.append(f"{meta_path.relative_to(ROOT)} (made from other weights)")
        if stale:
            print(f"stale: {', '.join(stale)}; run python -m training.report --tsne", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    PINS_FILE.write_text(pins)
    for p, fresh in cards.items():
        p.write_text(fresh)
    ZOO_DOC.parent.mkdir(parents=True, exist_ok=True)
    ZOO_DOC.write_text(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
