"""Recipe ablations, judged on validation only (the patient-disjoint split of ``train_val``).

    python -m training.ablation --study lite0-224            # every variant of that study, one after another
    python -m training.ablation --study lite0-224 --table    # only rebuild docs/ABLATION.md
    python -m training.ablation --study lite0-224 --record-only --only <variant>  # record a run trained before

Each variant is an ordinary ``python -m training.train`` command (no test evaluation) written to
``runs/ablation/<variant>``. For each, the record keeps the validation macro AUROC (all validation
images, and only those with at least one finding, since the test images hold almost no normal films),
per-finding validation AUROC, the change of probabilities under half-step noise and between a film's PNG
and JPEG copies (``training.robustness``) and the wall time. Only the variant chosen here is evaluated on test images,
by copying its folder into ``checkpoints/`` and running ``training.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from cxr_demo.card import ModelCard, read_card
from cxr_demo.inference import predict_array
from cxr_demo.paths import PROJECT_ROOT
from cxr_demo.zoo import load_checkpoint
from training.cam_prior import measure_loaded
from training.data import cached_pixels
from training.metrics import macro_auroc, safe_auroc
from training.robustness import half_step_noise_change, jpeg_change, validation_records
from training.train import main as train_main

log = logging.getLogger(__name__)

DOCS = PROJECT_ROOT / "docs"
LITE0 = ["--task", "nih14", "--arch", "tf_efficientnet_lite0", "--init", "imagenet", "--epochs", "14"]
STUDIES: dict[str, dict[str, list[str]]] = {
    # The committed nih14-efficientnet-lite0 recipe, then one change at a time.
    "lite0-224": {
        "nih14-lite0-a0-baseline": LITE0,
        "nih14-lite0-a1-stembn": [*LITE0, "--freeze-stem-bn"],
        "nih14-lite0-a2-stembn-noise": [*LITE0, "--freeze-stem-bn", "--noise", "1"],
        "nih14-lite0-a3-stembn-noise-ema": [*LITE0, "--freeze-stem-bn", "--noise", "1", "--ema", "0.99"],
        # The baseline peaks at epoch 2-4 and then overfits: a third of the learning rate.
        "nih14-lite0-a4-stembn-noise-ema-lr3e-4": [*LITE0, "--freeze-stem-bn", "--noise", "1", "--ema", "0.99",
                                                   "--lr", "3e-4"],
        # docs/analysis: validation holds ~40% normal films, the test images almost none, and a score that
        # only tells abnormal from normal films wins on validation (Consolidation). Choose the epoch on
        # the validation films that carry a finding.
        "nih14-lite0-a5-a4-select-on-findings": [*LITE0, "--freeze-stem-bn", "--noise", "1", "--ema", "0.99",
                                                 "--lr", "3e-4", "--select-on", "findings"],
        # a1 (the best so far) with one change each: the shared images' full 384 px; the 662 train_val films that
        # exist here only at 64 x 64 (upsampled), in the training part only.
        "nih14-lite0-a6-stembn-384": [*LITE0, "--freeze-stem-bn", "--input-size", "384"],
        "nih14-lite0-a7-stembn-64px": [*LITE0, "--freeze-stem-bn", "--extra-64px"],
        # a1 again with other training seeds on the same validation films: how far one recipe moves by chance.
        "nih14-lite0-a1-stembn-seed1": [*LITE0, "--freeze-stem-bn", "--seed", "1", "--split-seed", "0"],
        "nih14-lite0-a1-stembn-seed2": [*LITE0, "--freeze-stem-bn", "--seed", "2", "--split-seed", "0"],
        # a1 with the 1,164 unlabelled adult films (lungseg, covid19/COVID; no NIH film) in the training part, soft
        # labels from the default model's calibrated probabilities (training.pseudo; semi-supervised, one round).
        "nih14-lite0-a8-stembn-pseudo": [*LITE0, "--freeze-stem-bn", "--pseudo-labels", "checkpoints/nih14-ensemble"],
        # a1 with a loss on the share of each positive finding's class activation outside the thorax (training.cam_prior;
        # #12: the heatmaps of every model put ~40% of their mass outside the chest).
        "nih14-lite0-a9-stembn-camprior": [*LITE0, "--freeze-stem-bn", "--cam-prior", "1"],
        # a1 trained to answer a film's JPEG copy as its PNG (stability training; #13: JPEG q95 moved the default's
        # probabilities by 0.014-0.038, and noise augmentation, a2, did not make the models less sensitive).
        "nih14-lite0-a10-stembn-jpeg-consistency": [*LITE0, "--freeze-stem-bn", "--consistency", "5"],
        # a10's term outweighed the task ~10:1 in the first epoch (logit gap 1.8 with the fresh head) and the model never
        # learned the findings (validation 0.57): a fifth of the weight.
        "nih14-lite0-a11-stembn-jpeg-consistency-1": [*LITE0, "--freeze-stem-bn", "--consistency", "1"],
        # The term on a model that already reads the findings: a1's weights (the ensemble member
        # nih14-efficientnet-lite0-stembn, chosen on these validation films) fine-tuned for a few epochs, a third of the
        # learning rate. Cheaper than retraining each ensemble member, if it holds.
        "nih14-lite0-a12-a1-then-jpeg-consistency": [
            "--task", "nih14", "--arch", "tf_efficientnet_lite0", "--init", "checkpoint",
            "--init-from", "checkpoints/nih14-efficientnet-lite0-stembn", "--epochs", "6", "--patience", "3",
            "--lr", "3e-4", "--freeze-stem-bn", "--consistency", "1"],
    },
}


def validation_record(folder: Path) -> dict:
    """Validation numbers of one trained variant (its own patient split, re-made from its card)."""
    card = read_card(folder)
    model = load_checkpoint(folder)
    val = validation_records(card)
    pixels = cached_pixels(val, card.input_size, card.crop)
    y = np.stack([r.labels for r in val])
    p = predict_array(model, pixels, card.mean, card.std, card.task_kind)
    with_finding = y.sum(1) > 0
    return {
        "command": card.training["command"],
        "val_images": int(len(y)), "val_images_with_finding": int(with_finding.sum()),
        "val_macro_auroc": macro_auroc(y, p),
        "val_macro_auroc_findings_only": macro_auroc(y[with_finding], p[with_finding]),
        "best_epoch": card.training["best_epoch"], "epochs_run": card.training["epochs_run"],
        "wall_seconds": card.training["wall_seconds"],
        "per_finding_val_auroc": {n: safe_auroc(y[:, j], p[:, j]) for j, n in enumerate(card.label_names)},
        "val_positives": card.training["val_positives"],
        "half_step_noise": half_step_noise_change(model, card, pixels),
        "jpeg95": jpeg_change(model, card, val),
        "cam_outside_thorax": cam_outside_thorax(card, model, val, pixels),
        "weights_sha256": card.sha256,
    }


def cam_outside_thorax(card: ModelCard, model: torch.nn.Module, val: list, pixels: np.ndarray) -> dict | None:
    """The share of class activation outside the thorax on validation (:func:`training.cam_prior.measure_loaded`);
    None for a model it does not apply to (a crop, a transformer) or without the lung model."""
    try:
        out = measure_loaded(card, model, val, pixels)
    except (SystemExit, ValueError) as e:
        log.info("%s: no CAM-outside-thorax measure (%s)", card.name, e)
        return None
    return {k: out[k] for k in ("shape", "mean", "pairs", "per_finding")}


def run_study(study: str, out: Path, only: list[str] | None = None, train: bool = True) -> dict:
    """Train (unless ``train`` is False: record the variants already trained in ``out``) and record each variant."""
    record_path = DOCS / "ablation" / f"{study}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"study": study, "variants": {}}
    for name, args in STUDIES[study].items():
        if only and name not in only:
            continue
        t0 = time.time()
        if train:
            train_main(["--name", name, "--out", str(out), "--no-eval", *args])
        elif not (out / name).is_dir():
            continue
        seconds = round(time.time() - t0) if train else read_card(out / name).training["wall_seconds"]
        record["variants"][name] = {**validation_record(out / name), "run_seconds": seconds}
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        log.info("%s: %s", name, json.dumps({k: v for k, v in record["variants"][name].items()
                                               if k.startswith("val_macro")}))
    write_table()
    return record


def write_table(docs: Path | None = None) -> Path:
    """docs/ABLATION.md from every docs/ablation/*.json (``docs``: the docs folder, default :data:`DOCS`)."""
    docs = DOCS if docs is None else docs
    out = ["# Recipe ablations (validation only)", "",
           "Generated by `python -m training.ablation --table` from `docs/ablation/*.json`. Every number is measured "
           "on the patient-disjoint validation split of `train_val` (no test image); only the chosen variant is "
           "evaluated on the test images (its `eval.json`). With about 200 validation images (and 10-60 positives "
           "per finding), differences of a few hundredths are within noise. Rows ending in `-seed<N>` repeat a recipe "
           "with another training seed on the same validation films (`--split-seed 0`): their spread is how far one "
           "recipe moves by chance, the least any other row must clear. *CAM outside thorax*: the share of each present "
           "finding's class activation map outside the film's thorax (lung model, `hull+0.05`, about half the film) on "
           "validation, mean over (film, finding) pairs (`python -m training.cam_prior`). *JPEG q95*: per validation film, the "
           "largest change of any raw probability between its PNG and a quality-95 JPEG of the same pixels, mean over films "
           "and the share of films above 0.02 (`python -m training.robustness`); - where not measured. A run has no "
           "calibration yet: the consistency term's raw gain shrinks once a model is calibrated, since it partly works by "
           "keeping the logits small (a11: 0.014 raw, 0.015 calibrated against a1's 0.025; docs/robustness/).", ""]
    for path in sorted((docs / "ablation").glob("*.json")):
        rec = json.loads(path.read_text())
        variants = rec["variants"]
        if not variants:
            continue
        labels = list(next(iter(variants.values()))["per_finding_val_auroc"])
        out += [f"## {rec['study']}", "",
                "| variant | val macro AUROC | val, films with a finding | half-step noise: mean / max change | "
                "JPEG q95: mean max change / films > 0.02 | CAM outside thorax | best epoch / run | minutes |",
                "|---|---|---|---|---|---|---|---|"]
        for name, v in variants.items():
            n = v["half_step_noise"]
            cam, jpeg = v.get("cam_outside_thorax"), v.get("jpeg95")
            jpeg_cell = "-" if not jpeg else f"{jpeg['mean_max_change']:.3f} / {jpeg['share_over_0_02']:.0%}"
            out.append(f"| {name} | {v['val_macro_auroc']:.3f} | {v['val_macro_auroc_findings_only']:.3f} | "
                       f"{n['mean_abs_change']:.4f} / {n['max_abs_change']:.3f} | {jpeg_cell} | "
                       f"{'-' if not cam else format(cam['mean'], '.2f')} | {v['best_epoch']} / {v['epochs_run']} | "
                       f"{v['run_seconds'] / 60:.0f} |")
        out += ["", "Per finding (validation AUROC; positives in brackets):", "",
                "| variant | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        first = next(iter(variants.values()))
        out.append("| positives | " + " | ".join(str(first["val_positives"][lab]) for lab in labels) + " |")
        for name, v in variants.items():
            cells = ["n/a" if v["per_finding_val_auroc"][lab] is None else f"{v['per_finding_val_auroc'][lab]:.2f}"
                     for lab in labels]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += ["", "Commands: " + "; ".join(f"`{v['command']}`" for v in variants.values()), ""]
    path = docs / "ABLATION.md"
    path.write_text("\n".join(out) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=sorted(STUDIES), default="lite0-224")
    p.add_argument("--only", nargs="+", help="just these variants")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--table", action="store_true", help="only rebuild docs/ABLATION.md")
    p.add_argument("--record-only", action="store_true",
                   help="do not train: record the variants already trained in --out (e.g. by the same train command)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.table:
        write_table()
        return
    run_study(args.study, args.out, args.only, train=not args.record_only)


if __name__ == "__main__":
    main()
