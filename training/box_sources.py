"""Where a finding's box comes from, chosen per finding (the localisation study's second stage).

The first stage (``training.localisation``) chooses one CAM method, layer, anatomical prior and heatmap -> box
rule per model, the same for every finding. Its boxes are too large for small findings (mean IoBB 0.74 against
IoU 0.23 for the NIH ensemble) and, for Cardiomegaly, far worse than the heart's usual place relative to the
lungs (0.34 against 0.75 on the report half). This stage keeps the chosen heatmap (method, layer, prior) and
chooses, per finding, on the study's select half, one box source among:

- ``heatmap``: a heatmap -> box rule of :func:`training.localisation.rule_grid` (as the first stage, per finding);
- ``peak``: a box of the finding's usual size (the median ground-truth box on the select half, relative to the
  chest's bounding box from the lung model, times a scale) centred on the heatmap's peak;
- ``sided``: the finding's usual box on the image's left or right half of the chest (medians on the select
  half), on the side where the heatmap holds more heat;
- ``chest``: the finding's usual box relative to the chest's bounding box (the lung model alone: it does not
  look at the classifier's heatmap, and the app says so);
- ``place``: a heatmap -> box rule applied, instead of the heatmap, to the finding's usual place within the lung
  fields (per side of the chest, a Gaussian fitted to the centres and sizes of the select half's boxes relative to
  the chest's bounding box; the lung model alone, like ``chest``);
- ``weighted``: a rule applied to the heatmap times the usual place to a power (0.5, 1, 2).

``chest`` and ``place`` are image-free as far as the classifier goes: the study reports, beside the choice, the
best of them per finding and the best of the heatmap's own sources, so that what the classifier's heatmap adds over
the finding's usual place can be read off.

Numbers under ``report`` come from the other, patient-disjoint half, beside the first stage's choice and the
image-free baselines. Run::

    python -m training.box_sources checkpoints/nih14-ensemble [--no-card]

The result goes to ``docs/localisation/per_finding/<model>.json`` and, unless ``--no-card``, into the card's
``explain_defaults.per_finding`` (the app's ``/explain`` then uses it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cxr_demo import paths
from cxr_demo.boxes import (
    IMAGE_FREE_SOURCES,
    BoxRule,
    chest_frame,
    finding_boxes,
    place_map,
    predicted_boxes_for_rules,
    relative_to_frame,
)
from cxr_demo.cam import compute_heatmap, resize_heatmap
from cxr_demo.card import FindingBox, read_card, write_card
from cxr_demo.inference import normalise_batch
from cxr_demo.lungs import LungSegmenter, apply_prior, default_lung_folder
from cxr_demo.zoo import load_checkpoint
from training.data import add_data_root_argument, cached_pixels, nih_box_pairs, nih_boxes, nih_records, study_halves
from training.localisation import lung_results, rule_grid, write_table
from training.metrics import box_rows, per_finding, summarise

log = logging.getLogger(__name__)

DOCS = paths.PROJECT_ROOT / "docs" / "localisation"
PEAK_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
# A source more complex than another must beat it on the select half by more than this mean IoU to be chosen
# (select halves hold 30-70 boxes per finding: smaller differences are noise). Complexity: the first stage's rule,
# another heatmap rule, the chest box (one fitted box), the usual place (two Gaussians and a rule), the peak box (a
# box size and a scale), the sided box (two boxes), the weighted heatmap (the place, a rule and a power).
PARSIMONY = 0.01
COMPLEXITY = {"heatmap": 1, "chest": 2, "place": 3, "peak": 4, "sided": 5, "weighted": 6}
PLACE_POWERS = (0.5, 1.0, 2.0)


def typical_boxes(pairs: list[dict], idx: list[int], frames: dict) -> dict[str, list[float]]:
    """Per finding, the median ground-truth box on pairs ``idx`` relative to each image's chest frame."""
    out: dict[str, list] = {}
    for i in idx:
        p = pairs[i]
        frame = frames.get(p["image"])
        if frame is not None:
            out.setdefault(p["finding"], []).extend(relative_to_frame(b, frame) for b in p["truth"])
    return {f: [round(float(v), 4) for v in np.median(v, axis=0)] for f, v in out.items()}


def sided_boxes(pairs: list[dict], idx: list[int], frames: dict) -> dict[str, list[list[float]]]:
    """Per finding, its median ground-truth box on the image's left and on its right half of the chest frame (pairs
    ``idx``); findings without a box on both sides are left out."""
    out: dict[str, tuple[list, list]] = {}
    for i in idx:
        p = pairs[i]
        frame = frames.get(p["image"])
        if frame is not None:
            for b in p["truth"]:
                rel = relative_to_frame(b, frame)
                out.setdefault(p["finding"], ([], []))[0 if rel[0] < 0.5 else 1].append(rel)
    return {f: [[round(float(v), 4) for v in np.median(side, axis=0)] for side in sides]
            for f, sides in out.items() if all(sides)}


def usual_places(pairs: list[dict], idx: list[int], frames: dict) -> dict[str, list[list[float]]]:
    """Per finding, its usual place on pairs ``idx``: per side of the chest frame (the image's left and right halves)
    with at least two boxes, a Gaussian ``(weight, centre x, centre y, sd x, sd y)`` in fractions of the frame, its
    weight the side's share of the boxes, its centre the mean box centre, its variance the centres' variance plus
    that of a point drawn uniformly from the mean box (w^2 / 12)."""
    rel: dict[str, list] = {}
    for i in idx:
        frame = frames.get(pairs[i]["image"])
        if frame is not None:
            rel.setdefault(pairs[i]["finding"], []).extend(relative_to_frame(b, frame) for b in pairs[i]["truth"])
    out = {}
    for f, boxes in rel.items():
        b = np.asarray(boxes, dtype=np.float64)
        comps = []
        for side in (b[b[:, 0] < 0.5], b[b[:, 0] >= 0.5]):
            if len(side) >= 2:
                sd = np.sqrt(side[:, :2].var(axis=0) + (side[:, 2:] ** 2).mean(axis=0) / 12)
                comps.append([len(side) / len(b), *side[:, :2].mean(axis=0), *np.maximum(sd, 0.005)])
        if comps:
            out[f] = [[round(float(v), 4) for v in c] for c in comps]
    return out


def candidates(typical: list[float] | None, rules: list[BoxRule], sided: list[list[float]] | None = None,
               place: list[list[float]] | None = None) -> dict[str, FindingBox]:
    """Every box source tried for one finding."""
    out = {f"heatmap:{i}": FindingBox(source="heatmap", rule=asdict(r), text=r.describe()) for i, r in enumerate(rules)}
    if place is not None:
        for i, r in enumerate(rules):
            out[f"place:{i}"] = FindingBox(
                source="place", rule=asdict(r), place=place,
                text=f"{r.describe().replace('heatmap', 'the usual place')}: the finding's usual place within the lung "
                     "fields (lung model; not the heatmap)")
            for a in PLACE_POWERS:
                out[f"weighted:{a:g}:{i}"] = FindingBox(
                    source="weighted", rule=asdict(r), place=place, power=a,
                    text=f"{r.describe()}, of the heatmap times the finding's usual place"
                         f"{f' to the power {a:g}' if a != 1 else ''}")
    if typical is not None:
        for s in PEAK_SCALES:
            out[f"peak:{s:g}"] = FindingBox(
                source="peak", scale=s, typical_box=typical,
                text=f"the finding's usual box size{f' x {s:g}' if s != 1 else ''} (relative to the chest), centred "
                     "on the heatmap's peak")
        out["chest"] = FindingBox(source="chest", typical_box=typical,
                                  text="the finding's usual box relative to the chest (lung model; not the heatmap)")
    if sided is not None:
        out["sided"] = FindingBox(source="sided", side_boxes=sided,
                                  text="the finding's usual box on the side of the chest where the heatmap holds "
                                       "more heat")
    return out


def run(folder: Path, data_root: Path | None = None, lung_folder: Path | None = None, studies: Path = DOCS) -> dict:
    """The per-finding study of one checkpoint folder (its first-stage study must be in ``studies``)."""
    data_root = Path(data_root) if data_root is not None else paths.data_root()
    card = read_card(folder)
    study_path = studies / f"{card.name}.json"
    study = json.loads(study_path.read_text())
    if study["weights_sha256"] != card.sha256:
        raise SystemExit(f"{folder}: its localisation study was run on other weights; run it again first")
    chosen = study["chosen"]
    method, layer, prior = chosen["method"], chosen["layer"], chosen["prior"]
    model = load_checkpoint(folder)
    records = [r for r in nih_records(data_root / "nih14", card.label_names) if r.split == "test"]
    pixels = cached_pixels(records, card.input_size, card.crop)
    pairs = nih_box_pairs(records, nih_boxes(data_root / "nih14"), card.label_names)
    halves = study_halves(pairs, 0)
    if len(pairs) != study["n_pairs"]:
        raise SystemExit(f"{len(pairs)} boxed pairs here, {study['n_pairs']} in the study")
    segmenter = LungSegmenter(lung_folder or default_lung_folder())
    lungs, _ = lung_results(segmenter, pairs, records)
    frames = {}
    for p in pairs:
        res = lungs.get(p["image"])
        if res is not None and res.found() and p["image"] not in frames:
            frames[p["image"]] = chest_frame(res.region("hull", p["width"], p["height"]))
    typical = typical_boxes(pairs, halves["select"], frames)
    rules = rule_grid()
    first_stage = rules.index(BoxRule(**chosen["rule"]))
    global_key = f"heatmap:{first_stage}"
    sides = sided_boxes(pairs, halves["select"], frames)
    places = usual_places(pairs, halves["select"], frames)
    options = {f: candidates(typical.get(f), rules, sides.get(f), places.get(f))
               for f in sorted({p["finding"] for p in pairs})}
    x_all = normalise_batch(pixels, card.mean, card.std)
    rows: list[dict[str, list[dict]]] = []  # per pair, per candidate: the box rows, as the app would draw the boxes
    t0 = time.perf_counter()
    for n, p in enumerate(pairs):
        heat = compute_heatmap(model, card, x_all[p["index"]: p["index"] + 1], card.label_names.index(p["finding"]),
                               method, layer=layer)
        heat = resize_heatmap(heat, p["width"], p["height"], card.crop)
        res = lungs.get(p["image"])
        if prior is not None and res is not None and res.found():
            heat = apply_prior(heat, res.region(prior, p["width"], p["height"]))
        frame = frames.get(p["image"])
        # what finding_boxes gives the rule-based sources, faster (one labelling per threshold)
        by_rule = {"heatmap": predicted_boxes_for_rules(heat, rules)}
        place = places.get(p["finding"])
        if frame is not None and place is not None:
            usual = place_map(place, frame, p["width"], p["height"])
            fields = res.region("lungs", p["width"], p["height"])
            by_rule["place"] = predicted_boxes_for_rules(usual * fields, rules)
            for a in PLACE_POWERS:
                by_rule[f"weighted:{a:g}"] = predicted_boxes_for_rules(heat * usual ** a, rules)
        here = {}
        for key, option in options[p["finding"]].items():
            kind, _, number = key.rpartition(":")
            boxes = (by_rule.get(kind, [None] * len(rules))[int(number)]
                     if option.source in ("heatmap", "place", "weighted")
                     else finding_boxes(heat, option, frame, p["width"], p["height"]))
            here[key] = box_rows(p, boxes if boxes is not None else by_rule["heatmap"][first_stage], heat)  # as the app
        rows.append(here)
        if n % 100 == 0:
            log.info("%d/%d heatmaps (%.1f s)", n, len(pairs), time.perf_counter() - t0)

    def rows_for(idx: list[int], key_of) -> list[dict]:
        return [r for i in idx for r in rows[i][key_of(pairs[i]["finding"])]]

    findings = sorted(options)
    scores = {f: {k: float(np.mean([r["iou"] for r in rows_for(
        [i for i in halves["select"] if pairs[i]["finding"] == f], lambda _f, _k=k: _k)])) for k in options[f]}
        for f in findings}

    def best(f: str, prefix: str | tuple[str, ...] = "") -> str:
        keys = [k for k in scores[f] if k.startswith(prefix)] or [global_key]
        top = max(scores[f][k] for k in keys)
        # parsimony: of the sources within PARSIMONY of the best, the simplest (the first stage's rule first)
        near = [k for k in keys if scores[f][k] >= top - PARSIMONY]
        return min(near, key=lambda k: (0 if k == global_key else COMPLEXITY[k.split(":")[0]], -scores[f][k]))

    choice = {f: best(f) for f in findings}
    report_rows = rows_for(halves["report"], lambda f: choice[f])
    first_rows = rows_for(halves["report"], lambda f: global_key)
    only = {src: rows_for(halves["report"], lambda f, s=src: best(f, s))
            for src in ("heatmap", "peak", "chest", "sided", "place", "weighted")}
    # per finding the best (on select) of the sources that do not look at the heatmap, and of those that do
    kinds = {"image_free": IMAGE_FREE_SOURCES,
             "heatmap": tuple(k for k in COMPLEXITY if k not in IMAGE_FREE_SOURCES)}
    split = {name: {f: best(f, ks) for f in findings} for name, ks in kinds.items()}
    image_free_rows = rows_for(halves["report"], lambda f: split["image_free"][f])
    heatmap_rows = rows_for(halves["report"], lambda f: split["heatmap"][f])
    image_free, from_heatmap = summarise(image_free_rows), summarise(heatmap_rows)
    return {
        "model": card.name, "weights_sha256": card.sha256, "study": _relative(study_path),
        "heatmap": {"method": method, "layer": layer, "prior": prior},
        "typical_boxes_on_select": typical,
        "images_without_chest_frame": len({p["image"] for p in pairs} - set(frames)),
        "per_finding": {f: options[f][choice[f]].model_dump(exclude_none=True)
                        | {"select_mean_iou": round(scores[f][choice[f]], 4),
                           "select_mean_iou_first_stage_rule": round(scores[f][global_key], 4)} for f in findings},
        "report": summarise(report_rows), "report_per_finding": per_finding(report_rows),
        "report_first_stage": summarise(first_rows), "report_first_stage_per_finding": per_finding(first_rows),
        "report_only_heatmap_rules_per_finding": summarise(only["heatmap"]),
        "report_only_peak_boxes": summarise(only["peak"]),
        "report_only_chest_boxes": summarise(only["chest"]),
        "report_only_sided_boxes": summarise(only["sided"]),
        "report_only_place_boxes": summarise(only["place"]),
        "report_only_weighted_boxes": summarise(only["weighted"]),
        "report_image_free_per_finding": image_free,
        "report_image_free_per_finding_by_finding": per_finding(image_free_rows),
        "report_heatmap_sources_per_finding": from_heatmap,
        "report_heatmap_sources_per_finding_by_finding": per_finding(heatmap_rows),
        "margin_of_heatmap_over_image_free": round(
            from_heatmap["mean_iou_over_findings"] - image_free["mean_iou_over_findings"], 4),
        "usual_places_on_select": places,
        "sided_boxes_on_select": sides,
        "image_free_baselines": {k: v["report"] for k, v in study["image_free_baselines"].items()},
        "selection": (f"per finding, the box source with the best mean IoU on the study's 'select' half, except "
                      f"that of the sources within {PARSIMONY} of the best the simplest is taken (the first stage's "
                      "rule, another heatmap rule, the chest box, the peak box, the sided box); 'report' numbers "
                      "from the other, patient-disjoint half; an image whose chest was not found gets the first "
                      "stage's rule, as in the app"),
        "command": f"python -m training.box_sources {folder}",
    }


def _relative(path: Path) -> str:
    """A path relative to the project root when it lies inside it."""
    try:
        return str(path.resolve().relative_to(paths.PROJECT_ROOT))
    except ValueError:
        return str(path)


def write_defaults(folder: Path, result: dict, source_file: str) -> None:
    """The per-finding choice into the card's ``explain_defaults`` (whose method, layer and prior it was made for)."""
    card = read_card(folder)
    d = card.explain_defaults
    if d is None or (d.method, d.layer, d.prior) != tuple(result["heatmap"].values()):
        raise SystemExit(f"{folder}: the card's heatmap defaults are not the ones this study ran on")
    fields = set(FindingBox.model_fields)
    d.per_finding = {f: FindingBox(**{k: v for k, v in c.items() if k in fields}) for f, c in result["per_finding"].items()}
    d.per_finding_source_file = source_file
    d.report_mean_iou = round(result["report"]["mean_iou_over_findings"], 4)
    write_card(card, folder)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    add_data_root_argument(p)
    p.add_argument("--studies", type=Path, default=DOCS, help="folder of the first-stage studies")
    p.add_argument("--out", type=Path, default=DOCS / "per_finding")
    p.add_argument("--lung-model", type=Path, default=None)
    p.add_argument("--no-card", action="store_true", help="do not write the choice into the card")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from training.evaluate import evaluate_checkpoint

    for folder in args.folders:
        result = run(folder, args.data_root, args.lung_model, args.studies)
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"{result['model']}.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        log.info("wrote %s: report mean IoU over findings %.3f (first stage %.3f), hit rate %.3f (%.3f)", out,
                 result["report"]["mean_iou_over_findings"], result["report_first_stage"]["mean_iou_over_findings"],
                 result["report"]["hit_rate_iou_0.1"], result["report_first_stage"]["hit_rate_iou_0.1"])
        if not args.no_card:
            write_defaults(folder, result, _relative(out))
            # eval.json's box numbers describe what the app shows by default: refresh them.
            evaluate_checkpoint(folder, args.data_root, lung_folder=args.lung_model)
    write_table(args.studies.parent)


if __name__ == "__main__":
    main()
