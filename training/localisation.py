"""Weakly-supervised localisation study: which heatmap, which box rule, how well it matches the boxes.

    python -m training.localisation checkpoints/nih14-efficientnet-lite0

Over every radiologist box of the official-test images in ``../shared/data/nih14`` the study
computes each CAM method's heatmap once per (image, finding), then scores a grid of heatmap -> box
rules. The boxed images are split into two patient-disjoint halves: the method, layer and box rule
are chosen on the ``select`` half (best mean IoU over findings among methods that cost at most
``--max-cost`` x one forward+backward pass), and the numbers are reported on the ``report`` half only.

Writes ``docs/localisation/<model>.json``, stores the chosen defaults in the model card
(``explain_defaults``), which the app then uses, and re-runs ``training.evaluate`` so that
``eval.json``'s box numbers describe those defaults. ``python -m training.localisation --table`` rebuilds
``docs/LOCALISATION.md`` from the committed JSON files.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import GroupShuffleSplit

from cxr_demo import paths
from cxr_demo.boxes import MAX_BOXES, BoxRule
from cxr_demo.cam import compute_heatmap, resize_heatmap, resolve_module
from cxr_demo.card import ExplainDefaults, read_card, write_card
from cxr_demo.inference import normalise_batch
from cxr_demo.zoo import load_checkpoint
from training.data import add_data_root_argument, cached_pixels, nih_box_pairs, nih_boxes, nih_records
from training.evaluate import evaluate_checkpoint
from training.metrics import mask_iou, per_finding, score_rule, summarise

log = logging.getLogger(__name__)

DOCS = paths.PROJECT_ROOT / "docs"
SOURCE_STUDY_THRESHOLDS = (0.1, 0.15, 0.25, 0.35, 0.45)
FAST_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam")
PERTURBATION_METHODS = ("ablationcam",)


def rule_grid() -> list[BoxRule]:
    """Every heatmap -> box rule the study scores."""
    rules = []
    for regions in ("largest", "all"):
        for fit in ("rect", "moments"):
            rules += [BoxRule(t, "relative", regions, fit) for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)]
            rules += [BoxRule(k, "adaptive", regions, fit) for k in (0.5, 1.0, 1.5, 2.0, 2.5)]
    return rules


def higher_resolution_layer(model: torch.nn.Module, architecture: str) -> str | None:
    """A CAM layer one stage earlier than the default (twice the resolution), where the family has one."""
    if "efficientnet" in architecture or "mobilenet" in architecture:
        return f"blocks.{len(model.blocks) - 3}"
    if architecture.startswith("resnet"):
        return "layer3.-1"
    if architecture.startswith("densenet"):
        return "features.denseblock3"
    return None


def _forward_backward_seconds(model, x: torch.Tensor, repeats: int = 10) -> float:
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        model(x)[0, 0].backward()
    t0 = time.perf_counter()
    for _ in range(repeats):
        model(x)[0, 0].backward()
    model.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / repeats


def run_study(folder: Path, data_root: Path | None = None, perturbation_pairs: int = 8,
              max_cost: float = 1.5, seed: int = 0, limit_pairs: int | None = None) -> dict:
    """Run the study for one checkpoint folder; returns the JSON-able result."""
    data_root = Path(data_root) if data_root is not None else paths.data_root()
    card = read_card(folder)
    model = load_checkpoint(folder)
    records = [r for r in nih_records(data_root / "nih14", card.label_names) if r.split == "test"]
    pixels = cached_pixels(records, card.input_size, card.crop)
    pairs = nih_box_pairs(records, nih_boxes(data_root / "nih14"), card.label_names)
    if limit_pairs:
        pairs = pairs[:limit_pairs]
    images = sorted({p["image"] for p in pairs})
    patient_of = {p["image"]: p["patient"] for p in pairs}
    split = GroupShuffleSplit(n_splits=1, test_size=0.5, random_state=seed)
    sel_idx, rep_idx = next(split.split(images, groups=[patient_of[n] for n in images]))
    half_of = {images[i]: "select" for i in sel_idx} | {images[i]: "report" for i in rep_idx}
    assert not {patient_of[images[i]] for i in sel_idx} & {patient_of[images[i]] for i in rep_idx}
    halves = {h: [i for i, p in enumerate(pairs) if half_of[p["image"]] == h] for h in ("select", "report")}

    x_all = normalise_batch(pixels, card.mean, card.std)
    fwd_bwd = _forward_backward_seconds(model, x_all[:1].clone())
    log.info("forward+backward of one image: %.3f s", fwd_bwd)

    variants = [(m, card.cam_target_layer) for m in FAST_METHODS]
    hi_res = higher_resolution_layer(model, card.architecture)
    if hi_res is not None:
        resolve_module(model, hi_res)
        variants += [(m, hi_res) for m in ("gradcam", "hirescam", "layercam")]
    variants += [(m, card.cam_target_layer) for m in PERTURBATION_METHODS]
    rules = rule_grid()
    methods: dict[str, dict] = {}
    grid: list[dict] = []
    for method, layer in variants:
        key = method if layer == card.cam_target_layer else f"{method}@{layer}"
        subset = None
        if method in PERTURBATION_METHODS:
            rng = np.random.default_rng(seed)
            subset = {h: sorted(rng.choice(idx, min(perturbation_pairs, len(idx)), replace=False).tolist())
                      for h, idx in halves.items()}
        use = sorted(set(subset["select"] + subset["report"])) if subset else list(range(len(pairs)))
        heats: dict[int, np.ndarray] = {}
        t0 = time.perf_counter()
        for i in use:
            p = pairs[i]
            heat = compute_heatmap(model, card, x_all[p["index"] : p["index"] + 1], card.label_names.index(p["finding"]),
                                   method, layer=layer)
            heats[i] = resize_heatmap(heat, p["width"], p["height"], card.crop)
        seconds = (time.perf_counter() - t0) / max(len(use), 1)
        log.info("%s: %.3f s per heatmap (%.2fx forward+backward) over %d heatmaps", key, seconds, seconds / fwd_bwd, len(use))
        h_idx = {h: (subset[h] if subset else idx) for h, idx in halves.items()}
        best_rule, best_score = None, -1.0
        for rule in rules:
            rows = score_rule([heats[i] for i in h_idx["select"]], [pairs[i] for i in h_idx["select"]], rule)
            s = summarise(rows)
            grid.append({"method": key, "rule": asdict(rule), "select": s})
            if s["mean_iou_over_findings"] > best_score:
                best_rule, best_score = rule, s["mean_iou_over_findings"]
        report_rows = score_rule([heats[i] for i in h_idx["report"]], [pairs[i] for i in h_idx["report"]], best_rule)
        source_metric = {
            h: {str(t): float(np.mean([mask_iou(heats[i], b, t) for i in h_idx[h] for b in pairs[i]["truth"]]))
                for t in SOURCE_STUDY_THRESHOLDS}
            for h in ("select", "report")
        }
        methods[key] = {
            "method": method, "layer": layer, "seconds_per_heatmap": seconds, "cost_vs_forward_backward": seconds / fwd_bwd,
            "subset": subset is not None, "n_heatmaps": len(use),
            "best_rule_on_select": asdict(best_rule), "best_rule_text": best_rule.describe(),
            "select": summarise(score_rule([heats[i] for i in h_idx["select"]], [pairs[i] for i in h_idx["select"]], best_rule)),
            "report": summarise(report_rows),
            "report_per_finding": per_finding(report_rows),
            "source_study_mask_iou": source_metric,
        }
    eligible = {k: v for k, v in methods.items() if not v["subset"] and v["cost_vs_forward_backward"] <= max_cost}
    if not eligible:
        eligible = {k: v for k, v in methods.items() if not v["subset"]}
    chosen_key = max(eligible, key=lambda k: eligible[k]["select"]["mean_iou_over_findings"])
    chosen = methods[chosen_key]
    return {
        "model": card.name,
        "weights_sha256": card.sha256,
        "data": "NIH ChestX-ray14 official-test images in ../shared/data/nih14/images with official boxes",
        "n_pairs": len(pairs), "n_boxes": sum(len(p["truth"]) for p in pairs), "n_images": len(images),
        "halves": {h: {"n_images": len({pairs[i]["image"] for i in idx}), "n_boxes": sum(len(pairs[i]["truth"]) for i in idx),
                       "n_patients": len({pairs[i]["patient"] for i in idx})} for h, idx in halves.items()},
        "selection": (f"method, layer and box rule with the best mean IoU over findings on the 'select' half among "
                      f"methods costing <= {max_cost}x forward+backward; numbers under 'report' come from the other, "
                      "patient-disjoint half"),
        "iou_definition": (f"per ground-truth box, IoU with the best-matching predicted box (at most {MAX_BOXES} "
                           "boxes per heatmap); IoBB = intersection / ground-truth box area; pointing = heatmap "
                           "maximum inside the box; source_study_mask_iou = IoU of the mask heatmap >= t with the box"),
        "forward_backward_seconds": fwd_bwd,
        "chosen": {"key": chosen_key, "method": chosen["method"], "layer": chosen["layer"],
                   "rule": chosen["best_rule_on_select"], "rule_text": chosen["best_rule_text"],
                   "cost_vs_forward_backward": chosen["cost_vs_forward_backward"],
                   "report": chosen["report"], "report_per_finding": chosen["report_per_finding"]},
        "methods": methods,
        "grid_on_select": grid,
        "command": f"python -m training.localisation {folder}",
    }


def write_table(docs: Path = DOCS) -> Path:
    """Rebuild docs/LOCALISATION.md from every docs/localisation/*.json."""
    out = ["# Localisation study", "",
           "Generated by `python -m training.localisation --table` from the JSON files in `docs/localisation/`;",
           "each JSON is produced by `python -m training.localisation checkpoints/<model>`.", "",
           "Heatmap boxes are compared with the radiologists' boxes on the NIH official-test images here. The",
           "boxed images are split by patient into a `select` half, on which the method, layer and box rule are",
           "chosen, and a `report` half, on which every number below is measured. For reference, the source study",
           "reported mean IoU 0.133 (Grad-CAM) and 0.137 (EigenCAM) for its best model.", "",
           "Per ground-truth box, IoU and IoBB are those of the best-matching predicted box (at most "
           f"{MAX_BOXES} boxes per heatmap: the rule \"every connected region\" keeps the {MAX_BOXES} largest).",
           "At a layer followed by global average pooling and a linear head, Grad-CAM, HiResCAM and XGrad-CAM",
           "produce the same map up to a positive scale (the gradient is spatially constant), so their rows agree",
           "there; they differ at an inner layer.", ""]
    for path in sorted((docs / "localisation").glob("*.json")):
        d = json.loads(path.read_text())
        c = d["chosen"]
        r = c["report"]
        out += [f"## {d['model']}", "",
                f"Chosen on the select half ({d['halves']['select']['n_boxes']} boxes): **{c['key']}**, {c['rule_text']}; "
                f"cost {c['cost_vs_forward_backward']:.2f}x one forward+backward ({d['forward_backward_seconds'] * 1000:.0f} ms).", "",
                f"Report half ({d['halves']['report']['n_boxes']} boxes, {d['halves']['report']['n_patients']} patients): "
                f"mean IoU over findings **{r['mean_iou_over_findings']:.3f}**, mean IoU {r['mean_iou']:.3f}, "
                f"IoBB {r['mean_iobb']:.3f}, hit rate IoU>0.1 **{r['hit_rate_iou_0.1']:.3f}**, >0.25 {r['hit_rate_iou_0.25']:.3f}, "
                f">0.5 {r['hit_rate_iou_0.5']:.3f}, pointing game {r['pointing_game']:.3f}.", "",
                "| finding | boxes | mean IoU | IoBB | IoU>0.1 | IoU>0.25 | IoU>0.5 | pointing |", "|---|---|---|---|---|---|---|---|"]
        for f, s in c["report_per_finding"].items():
            out.append(f"| {f} | {s['n_boxes']} | {s['mean_iou']:.3f} | {s['mean_iobb']:.3f} | {s['hit_rate_iou_0.1']:.3f} | "
                       f"{s['hit_rate_iou_0.25']:.3f} | {s['hit_rate_iou_0.5']:.3f} | {s['pointing_game']:.3f} |")
        out += ["", "Every method at its best box rule on the select half, measured on the report half "
                "(perturbation methods on a random subset of pairs, marked *):", "",
                "| method | layer | s / heatmap | x fwd+bwd | box rule (chosen on select) | mean IoU (findings) | IoU>0.1 | pointing | "
                + " | ".join(f"mask IoU t={t}" for t in SOURCE_STUDY_THRESHOLDS) + " |",
                "|---|---|---|---|---|---|---|---|" + "---|" * len(SOURCE_STUDY_THRESHOLDS)]
        for key, m in d["methods"].items():
            rr = m["report"]
            src = m["source_study_mask_iou"]["report"]
            out.append(f"| {key}{' *' if m['subset'] else ''} | `{m['layer']}` | {m['seconds_per_heatmap']:.3f} | "
                       f"{m['cost_vs_forward_backward']:.2f} | {m['best_rule_text']} | {rr['mean_iou_over_findings']:.3f} | "
                       f"{rr['hit_rate_iou_0.1']:.3f} | {rr['pointing_game']:.3f} | "
                       + " | ".join(f"{src[str(t)]:.3f}" for t in SOURCE_STUDY_THRESHOLDS) + " |")
        out.append("")
    path = docs / "LOCALISATION.md"
    path.write_text("\n".join(out) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="*")
    add_data_root_argument(p)
    p.add_argument("--perturbation-pairs", type=int, default=8, help="pairs per half for the slow perturbation methods")
    p.add_argument("--max-cost", type=float, default=1.5, help="most a default may cost, in forward+backward passes")
    p.add_argument("--out", type=Path, default=DOCS / "localisation")
    p.add_argument("--limit-pairs", type=int, default=None, help="only the first N (image, finding) pairs (smoke runs)")
    p.add_argument("--no-card", action="store_true", help="do not write the chosen defaults into the card")
    p.add_argument("--table", action="store_true", help="only rebuild docs/LOCALISATION.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for folder in args.folders:
        result = run_study(folder, args.data_root, args.perturbation_pairs, args.max_cost, limit_pairs=args.limit_pairs)
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"{result['model']}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        if not args.no_card:
            card = read_card(folder)
            c = result["chosen"]
            card.explain_defaults = ExplainDefaults(
                method=c["method"], layer=c["layer"], box_rule=BoxRule(**c["rule"]).__dict__,
                source_file=f"docs/localisation/{result['model']}.json",
            )
            write_card(card, folder)
            # eval.json's box numbers describe what the app shows by default: refresh them.
            evaluate_checkpoint(folder, args.data_root)
        log.info("wrote %s; chosen %s (%s)", out, result["chosen"]["key"], result["chosen"]["rule_text"])
    if args.table or args.folders:
        write_table(args.out.parent)


if __name__ == "__main__":
    main()
