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

from cxr_demo import paths
from cxr_demo.boxes import MAX_BOXES, BoxRule, chest_frame, match_truth
from cxr_demo.cam import compute_heatmap, resize_heatmap, resolve_module
from cxr_demo.card import ExplainDefaults, read_card, write_card
from cxr_demo.inference import normalise_batch
from cxr_demo.lungs import PRIOR_SHAPES, LungSegmenter, apply_prior, default_lung_folder
from cxr_demo.zoo import load_checkpoint
from training.data import add_data_root_argument, cached_pixels, nih_box_pairs, nih_boxes, nih_records, study_halves
from training.evaluate import evaluate_checkpoint
from training.metrics import mask_iou, per_finding, score_rules, summarise

log = logging.getLogger(__name__)

DOCS = paths.PROJECT_ROOT / "docs"
SOURCE_STUDY_THRESHOLDS = (0.1, 0.15, 0.25, 0.35, 0.45)
FAST_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam")
PERTURBATION_METHODS = ("ablationcam",)


def rule_grid() -> list[BoxRule]:
    """Every heatmap -> box rule the study scores. Bounding rectangles only: the moment-fitted box never won on
    the select half of the first study (10 of 10 methods chose a rectangle, docs/localisation history)."""
    rules = []
    for regions in ("largest", "all"):
        rules += [BoxRule(t, "relative", regions, "rect") for t in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)]
        rules += [BoxRule(k, "adaptive", regions, "rect") for k in (0.5, 1.0, 1.5, 2.0, 2.5)]
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


# --- image-free baselines: what the finding's name (and the lungs) give without any heatmap ---------


def _norm(box, w, h):
    x, y, bw, bh = box
    return ((x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h)


def _denorm(cx, cy, bw, bh, x0, y0, sw, sh):
    return (x0 + (cx - bw / 2) * sw, y0 + (cy - bh / 2) * sh, bw * sw, bh * sh)


def _score_boxes(pairs: list[dict], boxes: list[list]) -> list[dict]:
    rows = []
    for pair, pred in zip(pairs, boxes, strict=True):
        for t, (iou, iobb) in zip(pair["truth"], match_truth(pred, pair["truth"]), strict=True):
            centre_in = any(t[0] <= b[0] + b[2] / 2 <= t[0] + t[2] and t[1] <= b[1] + b[3] / 2 <= t[1] + t[3] for b in pred)
            rows.append({"finding": pair["finding"], "iou": iou, "iobb": iobb, "pointing": centre_in, "n_pred": len(pred)})
    return rows


def image_free_baselines(pairs: list[dict], halves: dict[str, list[int]], lung_frames: dict[str, tuple] | None) -> dict:
    """Boxes that ignore the image (fitted on the select half, scored on the report half): the finding's median
    box; the best centred box; and, with the lung model, the finding's median box relative to the chest's
    bounding box (the lungs closed over the mediastinum), which uses the lungs but not the classifier."""
    sel = [pairs[i] for i in halves["select"]]
    rep = [pairs[i] for i in halves["report"]]
    out = {}
    med = {}
    for f in sorted({p["finding"] for p in sel}):
        med[f] = np.median([_norm(b, p["width"], p["height"]) for p in sel if p["finding"] == f for b in p["truth"]], axis=0)
    fallback = np.median([_norm(b, p["width"], p["height"]) for p in sel for b in p["truth"]], axis=0)

    def per_finding_box(p, frame=None):
        cx, cy, bw, bh = med.get(p["finding"], fallback)
        x0, y0, sw, sh = frame or (0, 0, p["width"], p["height"])
        return [_denorm(cx, cy, bw, bh, x0, y0, sw, sh)]

    rows = _score_boxes(rep, [per_finding_box(p) for p in rep])
    out["median_box_per_finding"] = {"text": "the finding's median box on the select half (same for every image)",
                                     "report": summarise(rows), "report_per_finding": per_finding(rows)}
    best, best_s = None, -1.0
    for size in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        def centred(p, s=size):
            return [(p["width"] * (1 - s) / 2, p["height"] * (1 - s) / 2, p["width"] * s, p["height"] * s)]
        score = summarise(_score_boxes(sel, [centred(p) for p in sel]))["mean_iou_over_findings"]
        if score > best_s:
            best, best_s = size, score
    rows = _score_boxes(rep, [[(p["width"] * (1 - best) / 2, p["height"] * (1 - best) / 2, p["width"] * best,
                                p["height"] * best)] for p in rep])
    out["central_box"] = {"text": f"a centred box of {best:g} x the image's sides (size chosen on select)",
                          "report": summarise(rows), "report_per_finding": per_finding(rows)}
    if lung_frames:
        med_l = {}
        for f in sorted({p["finding"] for p in sel}):
            vals = []
            for p in sel:
                frame = lung_frames.get(p["image"])
                if p["finding"] == f and frame:
                    x0, y0, sw, sh = frame
                    vals += [_norm((b[0] - x0, b[1] - y0, b[2], b[3]), sw, sh) for b in p["truth"]]
            if vals:
                med_l[f] = np.median(vals, axis=0)
        boxes = []
        for p in rep:
            frame = lung_frames.get(p["image"])
            if frame and p["finding"] in med_l:
                cx, cy, bw, bh = med_l[p["finding"]]
                boxes.append([_denorm(cx, cy, bw, bh, *frame)])
            else:
                boxes.append(per_finding_box(p))
        rows = _score_boxes(rep, boxes)
        out["lung_median_box_per_finding"] = {
            "text": "the finding's median box relative to the chest's bounding box (lung model, no classifier)",
            "report": summarise(rows), "report_per_finding": per_finding(rows)}
    return out


def lung_results(lungs, pairs: list[dict], records) -> tuple[dict, float]:
    """The lung model's result per boxed image (read as the app reads an upload), and seconds per image."""
    from cxr_demo.images import read_xray

    results = {}
    seconds = 0.0
    for p in pairs:
        if p["image"] not in results:
            pixels = read_xray(records[p["index"]].path).pixels  # decoding is paid once per request anyway
            t0 = time.perf_counter()
            results[p["image"]] = lungs.segment(pixels)
            seconds += time.perf_counter() - t0
    return results, seconds / max(len(results), 1)


def box_coverage(pairs: list[dict], lungs: dict, shapes) -> dict:
    """Per prior shape: how much of the radiologists' boxes lies inside it (a box outside the prior cannot be
    found once the heatmap is restricted to it)."""
    out = {}
    for shape in shapes:
        cover = []
        for p in pairs:
            res = lungs[p["image"]]
            if not res.found():
                continue
            region = res.region(shape, p["width"], p["height"])
            for x, y, w, h in p["truth"]:
                x0, y0 = max(int(x), 0), max(int(y), 0)
                patch = region[y0 : int(np.ceil(y + h)), x0 : int(np.ceil(x + w))]
                cover.append(float(patch.mean()) if patch.size else 0.0)
        cover = np.array(cover)
        out[shape] = {"n_boxes": int(cover.size), "mean_fraction_inside": float(cover.mean()) if cover.size else None,
                      "boxes_at_least_90pct_inside": float((cover >= 0.9).mean()) if cover.size else None}
    return out


def run_study(folder: Path, data_root: Path | None = None, perturbation_pairs: int = 8,
              max_cost: float = 1.5, seed: int = 0, limit_pairs: int | None = None,
              methods_list: tuple[str, ...] | None = None, hi_res: bool = True,
              lung_folder: Path | None = None, priors: tuple[str, ...] = PRIOR_SHAPES) -> dict:
    """Run the study for one checkpoint folder; returns the JSON-able result.

    Every (method, layer) heatmap is scored without the anatomical prior and with each shape of ``priors``
    (needs the lung model of ``lung_folder``, default the project's), under every box rule."""
    data_root = Path(data_root) if data_root is not None else paths.data_root()
    card = read_card(folder)
    model = load_checkpoint(folder)
    records = [r for r in nih_records(data_root / "nih14", card.label_names) if r.split == "test"]
    pixels = cached_pixels(records, card.input_size, card.crop)
    pairs = nih_box_pairs(records, nih_boxes(data_root / "nih14"), card.label_names)
    if limit_pairs:
        pairs = pairs[:limit_pairs]
    images = sorted({p["image"] for p in pairs})
    halves = study_halves(pairs, seed)

    lung_folder = lung_folder or default_lung_folder()
    lungs, seg_seconds, lung_card = {}, 0.0, None
    if lung_folder is not None and priors:
        segmenter = LungSegmenter(lung_folder)
        lung_card = segmenter.card
        lungs, seg_seconds = lung_results(segmenter, pairs, records)
        log.info("lung fields of %d images: %.3f s each", len(lungs), seg_seconds)
    else:
        priors = ()
    prior_keys: tuple[str | None, ...] = (None, *priors)

    x_all = normalise_batch(pixels, card.mean, card.std)
    fwd_bwd = _forward_backward_seconds(model, x_all[:1].clone())
    log.info("forward+backward of one image: %.3f s", fwd_bwd)

    variants = [(m, card.cam_target_layer) for m in (methods_list or FAST_METHODS)]
    hi_layer = higher_resolution_layer(model, card.architecture) if hi_res else None
    if hi_layer is not None:
        resolve_module(model, hi_layer)
        variants += [(m, hi_layer) for m in ("gradcam", "hirescam", "layercam")]
    if perturbation_pairs > 0:
        variants += [(m, card.cam_target_layer) for m in PERTURBATION_METHODS]
    rules = rule_grid()
    methods: dict[str, dict] = {}
    grid: list[dict] = []
    for method, layer in variants:
        vkey = method if layer == card.cam_target_layer else f"{method}@{layer}"
        subset = None
        if method in PERTURBATION_METHODS:
            rng = np.random.default_rng(seed)
            subset = {h: sorted(rng.choice(idx, min(perturbation_pairs, len(idx)), replace=False).tolist())
                      for h, idx in halves.items()}
        use = sorted(set(subset["select"] + subset["report"])) if subset else list(range(len(pairs)))
        heats: dict[int, np.ndarray] = {}
        seconds = 0.0
        for i in use:
            p = pairs[i]
            t0 = time.perf_counter()
            heat = compute_heatmap(model, card, x_all[p["index"] : p["index"] + 1], card.label_names.index(p["finding"]),
                                   method, layer=layer)
            heats[i] = resize_heatmap(heat, p["width"], p["height"], card.crop)
            seconds += time.perf_counter() - t0
        seconds /= max(len(use), 1)
        h_idx = {h: (subset[h] if subset else idx) for h, idx in halves.items()}

        def with_prior(i: int, pk: str | None, _heats=heats) -> np.ndarray:
            h = _heats[i]
            res = lungs.get(pairs[i]["image"])
            if pk is not None and res is not None and res.found():
                h = apply_prior(h, res.region(pk, pairs[i]["width"], pairs[i]["height"]))
            return h

        for pk in prior_keys:
            key = vkey if pk is None else f"{vkey} + {pk}"
            # every rule on the select half (one labelling per threshold), then only the chosen rule on the report half
            per_rule: list[list[dict]] = [[] for _ in rules]
            src: dict[str, dict[str, list[float]]] = {h: {str(t): [] for t in SOURCE_STUDY_THRESHOLDS} for h in halves}
            for i in h_idx["select"]:
                h = with_prior(i, pk)
                for r, rows in enumerate(score_rules(h, pairs[i], rules)):
                    per_rule[r] += rows
                for t in SOURCE_STUDY_THRESHOLDS:
                    src["select"][str(t)] += [mask_iou(h, b, t) for b in pairs[i]["truth"]]
            summaries = [summarise(rows) for rows in per_rule]
            for rule, sm in zip(rules, summaries, strict=True):
                grid.append({"method": key, "rule": asdict(rule), "select": sm})
            best_r = max(range(len(rules)), key=lambda r, _s=summaries: (_s[r]["mean_iou_over_findings"], -r))
            report_rows = []
            for i in h_idx["report"]:
                h = with_prior(i, pk)
                report_rows += score_rules(h, pairs[i], [rules[best_r]])[0]
                for t in SOURCE_STUDY_THRESHOLDS:
                    src["report"][str(t)] += [mask_iou(h, b, t) for b in pairs[i]["truth"]]
            cost = seconds / fwd_bwd  # the lung model's time is every explain's (select_defaults says why)
            methods[key] = {
                "method": method, "layer": layer, "prior": pk, "seconds_per_heatmap": seconds,
                "cost_vs_forward_backward": cost, "subset": subset is not None, "n_heatmaps": len(use),
                "best_rule_on_select": asdict(rules[best_r]), "best_rule_text": rules[best_r].describe(),
                "select": summaries[best_r],
                "report": summarise(report_rows),
                "report_per_finding": per_finding(report_rows),
                "source_study_mask_iou": {h: {t: float(np.mean(v)) if v else 0.0 for t, v in src[h].items()} for h in src},
            }
        del heats
        log.info("%s: %.3f s per heatmap (%.2fx forward+backward) over %d heatmaps; best on select: %s", vkey, seconds,
                 seconds / fwd_bwd, len(use), {k: round(v["select"]["mean_iou_over_findings"], 3)
                                                for k, v in methods.items() if k.split(" + ")[0] == vkey})

    lung_frames = None
    if lungs:
        lung_frames = {}
        for p in pairs:
            res = lungs[p["image"]]
            if res.found() and p["image"] not in lung_frames:
                lung_frames[p["image"]] = chest_frame(res.region("hull", p["width"], p["height"]))
    baselines = image_free_baselines(pairs, halves, lung_frames)
    result = {
        "model": card.name,
        "weights_sha256": card.sha256,
        "data": "NIH ChestX-ray14 official-test images in ../shared/data/nih14/images with official boxes",
        "n_pairs": len(pairs), "n_boxes": sum(len(p["truth"]) for p in pairs), "n_images": len(images),
        "halves": {h: {"n_images": len({pairs[i]["image"] for i in idx}), "n_boxes": sum(len(pairs[i]["truth"]) for i in idx),
                       "n_patients": len({pairs[i]["patient"] for i in idx})} for h, idx in halves.items()},
        "iou_definition": (f"per ground-truth box, IoU with the best-matching predicted box (at most {MAX_BOXES} "
                           "boxes per heatmap); IoBB = intersection / ground-truth box area; pointing = heatmap "
                           "maximum inside the box; source_study_mask_iou = IoU of the mask heatmap >= t with the box"),
        "forward_backward_seconds": fwd_bwd,
        "lung_model": ({"name": lung_card.name, "sha256": lung_card.sha256, "seconds_per_image": seg_seconds,
                        "images_without_lungs": sum(not r.found() for r in lungs.values()),
                        "box_coverage": box_coverage(pairs, lungs, priors)} if lung_card else None),
        "priors": [pk or "off" for pk in prior_keys],
        "image_free_baselines": baselines,
        "methods": methods,
        "grid_on_select": grid,
        "command": f"python -m training.localisation {folder}",
    }
    return select_defaults(result, max_cost)


def select_defaults(study: dict, max_cost: float = 1.5) -> dict:
    """Choose a study's defaults (``chosen``, ``best_without_prior``, ``margin_over_image_free``) from its
    ``methods``: the best mean IoU over findings on the select half among full-half settings whose heatmap costs at
    most ``max_cost`` x one forward+backward of the classifier. The lung model's time is not part of a setting's
    cost: ``/explain`` runs it on every film whatever the prior (to say when the heatmap's peak lies outside the
    chest), and a film that went through ``/predict`` has it already (the chest check's answer is kept). Studies
    before this rule counted it for prior rows, which ruled the prior out for small models (the lung model alone
    is ~0.4x their forward+backward); ``--reselect`` applies the rule to committed studies without new heatmaps."""
    fwd_bwd = study["forward_backward_seconds"]
    methods = study["methods"]
    for m in methods.values():
        m["cost_vs_forward_backward"] = m["seconds_per_heatmap"] / fwd_bwd

    def pick(candidates: dict) -> str:
        eligible = {k: v for k, v in candidates.items() if not v["subset"] and v["cost_vs_forward_backward"] <= max_cost}
        eligible = eligible or {k: v for k, v in candidates.items() if not v["subset"]}
        return max(eligible, key=lambda k: eligible[k]["select"]["mean_iou_over_findings"])

    def brief(key: str) -> dict:
        m = methods[key]
        return {"key": key, "method": m["method"], "layer": m["layer"], "prior": m["prior"],
                "rule": m["best_rule_on_select"], "rule_text": m["best_rule_text"],
                "cost_vs_forward_backward": m["cost_vs_forward_backward"],
                "report": m["report"], "report_per_finding": m["report_per_finding"]}

    chosen = brief(pick(methods))
    baselines = study["image_free_baselines"]
    best_free = max(("median_box_per_finding", "central_box"),
                    key=lambda k: baselines[k]["report"]["mean_iou_over_findings"])
    study.update(
        selection=(f"method, layer, anatomical prior and box rule with the best mean IoU over findings on the "
                   f"'select' half among settings whose heatmap costs <= {max_cost}x forward+backward (the lung "
                   "model's time, which every explain pays whatever the prior, not counted); numbers under 'report' "
                   "come from the other, patient-disjoint half"),
        chosen=chosen,
        best_without_prior=brief(pick({k: v for k, v in methods.items() if v["prior"] is None})),
        margin_over_image_free={"baseline": best_free, "mean_iou_over_findings": chosen["report"][
            "mean_iou_over_findings"] - baselines[best_free]["report"]["mean_iou_over_findings"]},
    )
    return study


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_table(docs: Path = DOCS) -> Path:
    """Rebuild docs/LOCALISATION.md from every docs/localisation/*.json."""
    studies = [json.loads(path.read_text()) for path in sorted((docs / "localisation").glob("*.json"))]
    out = ["# Localisation study", "",
           "Generated by `python -m training.localisation --table` from the JSON files in `docs/localisation/`;",
           "each JSON is produced by `python -m training.localisation checkpoints/<model>`.", "",
           "Heatmap boxes are compared with the radiologists' boxes on the NIH official-test images here. The",
           "boxed images are split by patient into a `select` half, on which the method, layer, anatomical prior and",
           "box rule are chosen, and a `report` half, on which **every number below** is measured. For reference, the",
           "source study (Wang et al. 2017) reported mean IoU 0.133 (Grad-CAM) and 0.137 (EigenCAM) for its best",
           "model; its own metric (IoU of the mask heatmap >= t with the box) is in the last columns of each model's",
           "method table.", "",
           "Per ground-truth box, IoU and IoBB are those of the best-matching predicted box (at most "
           f"{MAX_BOXES} boxes per heatmap: the rule \"every connected region\" keeps the {MAX_BOXES} largest).",
           "The **anatomical prior** sets the heatmap to 0 outside a region found by the lung-field model",
           "(`checkpoints/lungseg-efficientnet-lite0`): `lungs` = the lung fields, `hull` = every row filled between",
           "the outermost lung pixels (the lungs closed over the mediastinum and heart), `+d` = then dilated by d x",
           "the lungs' width. **Image-free baselines** ignore the heatmap: the finding's median box (from the select",
           "half), the best centred box, and the finding's median box placed relative to the chest's bounding box",
           "(uses the lung model, not the classifier). A heatmap counts only by its margin over them.",
           "A setting's heatmap may cost at most 1.5x one forward+backward of the classifier. The lung model's time",
           "is not counted: `/explain` runs it on every film whatever the prior (to say when the heatmap's peak lies",
           "outside the chest) and keeps the answer of `/predict`'s chest check for the same film",
           "(docs/bench/explain-prior-cpu2.md measures the default model's real cost). Studies until 2026-11-27",
           "counted it for prior rows, which ruled the prior out for small models (the lung model alone is ~0.4x",
           "their forward+backward); `python -m training.localisation --reselect checkpoints/<model>` applied the",
           "rule to their committed heatmap scores. Studies run on the shared 2-core CPU.",
           "At a layer followed by global average pooling and a linear head, Grad-CAM, HiResCAM and XGrad-CAM",
           "produce the same map up to a positive scale, so their rows agree there.", ""]
    out += ["## Summary (report half, mean IoU over the 8 findings / hit rate IoU > 0.1)", "",
            "| model | defaults (chosen on select, cost x fwd+bwd) | without prior (best on select) | best with a prior "
            "(on select; cost) | **with the chosen defaults** | median box per finding | centred box | "
            "median box in the chest frame | margin over image-free |",
            "|---|---|---|---|---|---|---|---|---|"]
    for d in studies:
        if "image_free_baselines" not in d:
            continue
        c, w, b = d["chosen"], d["best_without_prior"], d["image_free_baselines"]

        def pair(r):
            return f"{r['mean_iou_over_findings']:.3f} / {r['hit_rate_iou_0.1']:.3f}"

        lung_b = b.get("lung_median_box_per_finding")
        with_prior = {k: m for k, m in d["methods"].items() if m.get("prior") and not m["subset"]}
        wp = max(with_prior, key=lambda k: with_prior[k]["select"]["mean_iou_over_findings"]) if with_prior else None
        wp_text = (f"{pair(with_prior[wp]['report'])} ({wp}; {with_prior[wp]['cost_vs_forward_backward']:.2f}x)"
                   if wp else "-")
        out.append(f"| {d['model']} | {c['key']}, {c['rule_text']} ({c['cost_vs_forward_backward']:.2f}x) | "
                   f"{pair(w['report'])} ({w['key']}) | {wp_text} | **{pair(c['report'])}** | {pair(b['median_box_per_finding']['report'])} | "
                   f"{pair(b['central_box']['report'])} | {pair(lung_b['report']) if lung_b else '-'} | "
                   f"{d['margin_over_image_free']['mean_iou_over_findings']:+.3f} |")
    out.append("")
    out += per_finding_section(docs)
    for d in studies:
        c = d["chosen"]
        r = c["report"]
        out += [f"## {d['model']}", "",
                f"Chosen on the select half ({d['halves']['select']['n_boxes']} boxes): **{c['key']}**, {c['rule_text']}; "
                f"cost {c['cost_vs_forward_backward']:.2f}x one forward+backward ({d['forward_backward_seconds'] * 1000:.0f} ms).", "",
                f"Report half ({d['halves']['report']['n_boxes']} boxes, {d['halves']['report']['n_patients']} patients): "
                f"mean IoU over findings **{r['mean_iou_over_findings']:.3f}**, mean IoU {r['mean_iou']:.3f}, "
                f"IoBB {r['mean_iobb']:.3f}, hit rate IoU>0.1 **{r['hit_rate_iou_0.1']:.3f}**, >0.25 {r['hit_rate_iou_0.25']:.3f}, "
                f">0.5 {r['hit_rate_iou_0.5']:.3f}, pointing game {r['pointing_game']:.3f}.", ""]
        if "image_free_baselines" in d:
            w, b = d["best_without_prior"], d["image_free_baselines"]
            cols = [("without prior", w["report_per_finding"]), ("chosen", c["report_per_finding"]),
                    ("median box", b["median_box_per_finding"]["report_per_finding"])]
            if "lung_median_box_per_finding" in b:
                cols.append(("chest-frame median box", b["lung_median_box_per_finding"]["report_per_finding"]))
            out += ["Per finding, mean IoU and hit rate IoU>0.1: without the prior (" + w["key"] + "), with the chosen "
                    "defaults, and the image-free boxes:", "",
                    "| finding | boxes | " + " | ".join(f"{n} IoU | {n} hit" for n, _ in cols) + " |",
                    "|---|---|" + "---|---|" * len(cols)]
            for f, sf in c["report_per_finding"].items():
                cells = []
                for _, col in cols:
                    x = col.get(f, {})
                    cells += [_f(x.get("mean_iou")), _f(x.get("hit_rate_iou_0.1"))]
                out.append(f"| {f} | {sf['n_boxes']} | " + " | ".join(cells) + " |")
            out.append("")
            if d.get("lung_model"):
                lm = d["lung_model"]
                out += [f"Lung model {lm['name']}: {lm['seconds_per_image'] * 1000:.0f} ms per image; no lungs found on "
                        f"{lm['images_without_lungs']} of {d['n_images']} images. Share of the radiologists' boxes inside "
                        "each prior shape (all boxes): " + ", ".join(
                            f"{k} {v['mean_fraction_inside']:.2f} (>=90% inside: {v['boxes_at_least_90pct_inside']:.2f})"
                            for k, v in lm["box_coverage"].items() if v["n_boxes"]) + ".", ""]
        else:
            out += ["| finding | boxes | mean IoU | IoBB | IoU>0.1 | IoU>0.25 | IoU>0.5 | pointing |", "|---|---|---|---|---|---|---|---|"]
            for f, sf in c["report_per_finding"].items():
                out.append(f"| {f} | {sf['n_boxes']} | {sf['mean_iou']:.3f} | {sf['mean_iobb']:.3f} | {sf['hit_rate_iou_0.1']:.3f} | "
                           f"{sf['hit_rate_iou_0.25']:.3f} | {sf['hit_rate_iou_0.5']:.3f} | {sf['pointing_game']:.3f} |")
            out.append("")
        out += ["Every method (and prior) at its best box rule on the select half, measured on the report half "
                "(perturbation methods on a random subset of pairs, marked *):", "",
                "| method + prior | layer | s / heatmap | x fwd+bwd | box rule (chosen on select) | mean IoU (findings) | IoU>0.1 | pointing | "
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


def per_finding_section(docs: Path) -> list[str]:
    """The second stage's tables (``training.box_sources``: the box source chosen per finding), from
    docs/localisation/per_finding/*.json."""
    results = [json.loads(p.read_text()) for p in sorted((docs / "localisation" / "per_finding").glob("*.json"))]
    if not results:
        return []

    def pair(r):
        return f"{r['mean_iou_over_findings']:.3f} / {r['hit_rate_iou_0.1']:.3f}"

    out = ["## Box source per finding (second stage, `python -m training.box_sources checkpoints/<model>`)", "",
           "The first stage's heatmap (method, layer, prior) is kept; per finding, on the same select half, the box",
           "comes from the best of: a heatmap rule of the grid above (`heatmap`); the finding's usual box size (its",
           "median box on the select half relative to the chest's bounding box, x 0.5-1.5) centred on the heatmap's",
           "peak (`peak`); or the finding's usual box relative to the chest (`chest`: the lung model alone, not the",
           "heatmap; the app says so under the overlay), or its usual box on the image's left or right half of the",
           "chest, the half where the heatmap holds more heat (`sided`); a box rule applied to the heatmap times the",
           "finding's **usual place** to a power 0.5-2 (`weighted`); or, not looking at the heatmap, a box rule applied",
           "to the usual place alone within the lung fields (`place`: per side of the chest, a Gaussian fitted to the",
           "select half's boxes relative to the chest's bounding box). Of the sources within 0.01 mean IoU of the best",
           "on select, the simplest (the first stage's rule, another rule, chest, place, peak, sided, weighted).",
           "`chest` and `place` use the lung model, not the classifier: the last columns set the best of them per",
           "finding (chosen on select) against the best of the sources that look at the heatmap, and their difference",
           "is **what the classifier's heatmap adds over the finding's usual place**. Report half, mean IoU over the 8",
           "findings / hit rate IoU > 0.1:",
           "", "| model | first stage | **per finding** | heatmap rules only | peak only | sided only | weighted only | "
           "chest only | place only | **heatmap's sources** | **image-free sources** | heatmap adds |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in results:
        def get(key):
            return pair(d[key]) if d.get(key) else "-"

        margin = d.get("margin_of_heatmap_over_image_free")
        out.append(f"| {d['model']} | {pair(d['report_first_stage'])} | **{pair(d['report'])}** | "
                   f"{get('report_only_heatmap_rules_per_finding')} | {get('report_only_peak_boxes')} | "
                   f"{get('report_only_sided_boxes')} | {get('report_only_weighted_boxes')} | "
                   f"{get('report_only_chest_boxes')} | {get('report_only_place_boxes')} | "
                   f"**{get('report_heatmap_sources_per_finding')}** | **{get('report_image_free_per_finding')}** | "
                   f"{'-' if margin is None else f'{margin:+.3f}'} |")
    for d in results:
        out += ["", f"{d['model']}, per finding (report half): the source chosen on select, its mean IoU and hit rate "
                "beside the first stage's.", "",
                "| finding | boxes | source (chosen on select) | mean IoU | hit | first stage IoU | first stage hit | "
                "heatmap's sources IoU | image-free sources IoU |",
                "|---|---|---|---|---|---|---|---|---|"]
        for f, c in d["per_finding"].items():
            r, g = d["report_per_finding"].get(f, {}), d["report_first_stage_per_finding"].get(f, {})
            h = d.get("report_heatmap_sources_per_finding_by_finding", {}).get(f, {})
            i = d.get("report_image_free_per_finding_by_finding", {}).get(f, {})
            out.append(f"| {f} | {r.get('n_boxes', 0)} | {c['source']}: {c['text']} | {_f(r.get('mean_iou'))} | "
                       f"{_f(r.get('hit_rate_iou_0.1'))} | {_f(g.get('mean_iou'))} | {_f(g.get('hit_rate_iou_0.1'))} | "
                       f"{_f(h.get('mean_iou'))} | {_f(i.get('mean_iou'))} |")
    return out + [""]


def defaults_from_study(result: dict, previous: ExplainDefaults | None = None) -> ExplainDefaults:
    """The card's heatmap defaults from a study's result: the chosen method, layer, box rule and prior, and what
    they scored on the report half beside the best image-free box. The box sources per finding of ``previous``
    (``training.box_sources``) are kept when they were chosen for the same method, layer, prior and rule."""
    c, margin = result["chosen"], result["margin_over_image_free"]
    free = result["image_free_baselines"][margin["baseline"]]["report"]["mean_iou_over_findings"]
    d = ExplainDefaults(method=c["method"], layer=c["layer"], box_rule=BoxRule(**c["rule"]).__dict__,
                        prior=c["prior"], source_file=f"docs/localisation/{result['model']}.json",
                        report_mean_iou=round(c["report"]["mean_iou_over_findings"], 4),
                        image_free_baseline=margin["baseline"], image_free_mean_iou=round(free, 4))
    if previous is not None and previous.per_finding and (previous.method, previous.layer, previous.prior,
                                                           previous.box_rule) == (d.method, d.layer, d.prior, d.box_rule):
        d.per_finding, d.per_finding_source_file = previous.per_finding, previous.per_finding_source_file
        d.report_mean_iou = previous.report_mean_iou
    return d


def refresh_cards(folders: list[Path], docs: Path = DOCS / "localisation") -> None:
    """Re-write the cards' heatmap defaults from their committed study files (no heatmap is computed)."""
    for folder in folders:
        card = read_card(folder)
        study = json.loads((docs / f"{card.name}.json").read_text())
        if study["weights_sha256"] != card.sha256:
            raise SystemExit(f"{folder}: its study was run on other weights; run the study again")
        card.explain_defaults = defaults_from_study(study, card.explain_defaults)
        write_card(card, folder)


def reselect(folder: Path, docs: Path, max_cost: float, data_root: Path | None) -> bool:
    """Apply :func:`select_defaults` to a committed study; write the study and the card's defaults back and, when
    the choice changed, re-run ``training.evaluate`` so that eval.json's box numbers describe the new defaults.
    True when the choice changed."""
    card = read_card(folder)
    path = docs / f"{card.name}.json"
    study = json.loads(path.read_text())
    if study["weights_sha256"] != card.sha256:
        raise SystemExit(f"{folder}: its study was run on other weights; run the study again")
    before = study["chosen"]["key"], study["chosen"]["rule"]
    study = select_defaults(study, max_cost)
    changed = (study["chosen"]["key"], study["chosen"]["rule"]) != before
    path.write_text(json.dumps(study, indent=1) + "\n")
    card.explain_defaults = defaults_from_study(study, card.explain_defaults)
    write_card(card, folder)
    log.info("%s: %s -> %s (report half %.3f)", card.name, before[0], study["chosen"]["key"],
             study["chosen"]["report"]["mean_iou_over_findings"])
    if changed:
        evaluate_checkpoint(folder, data_root)
    return changed


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
    p.add_argument("--cards-only", action="store_true",
                   help="only re-write the folders' card defaults from their committed study files")
    p.add_argument("--reselect", action="store_true",
                   help="choose the folders' defaults again from their committed study files under the current rule "
                        "(select_defaults; no heatmap is computed), re-write study, card and, where the choice "
                        "changed, eval.json")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated CAM methods at the card's layer (default: {','.join(FAST_METHODS)})")
    p.add_argument("--no-hi-res", action="store_true", help="skip the higher-resolution layer variants")
    p.add_argument("--lung-model", type=Path, default=None, help="lung model folder (default: the project's)")
    p.add_argument("--priors", default=",".join(PRIOR_SHAPES),
                   help="comma-separated anatomical prior shapes to try ('' for none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cards_only:
        refresh_cards(args.folders, args.out)
        return
    if args.reselect:
        for folder in args.folders:
            reselect(folder, args.out, args.max_cost, args.data_root)
        write_table(args.out.parent)
        return
    for folder in args.folders:
        result = run_study(folder, args.data_root, args.perturbation_pairs, args.max_cost, limit_pairs=args.limit_pairs,
                           methods_list=tuple(args.methods.split(",")) if args.methods else None,
                           hi_res=not args.no_hi_res, lung_folder=args.lung_model,
                           priors=tuple(x for x in args.priors.split(",") if x))
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"{result['model']}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        if not args.no_card:
            card = read_card(folder)
            card.explain_defaults = defaults_from_study(result, card.explain_defaults)
            write_card(card, folder)
            # eval.json's box numbers describe what the app shows by default: refresh them.
            evaluate_checkpoint(folder, args.data_root, lung_folder=args.lung_model)
        log.info("wrote %s; chosen %s (%s)", out, result["chosen"]["key"], result["chosen"]["rule_text"])
    if args.table or args.folders:
        write_table(args.out.parent)


if __name__ == "__main__":
    main()
