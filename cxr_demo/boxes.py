"""Boxes: a heatmap becomes boxes, and boxes are scored against ground truth.

One module for the app's ``/explain`` and the localisation study alike, so both draw at most
:data:`MAX_BOXES` boxes per heatmap and score each ground-truth box the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Box = tuple[float, float, float, float]  # x, y, w, h in pixels

DEFAULT_BOX_THRESHOLD = 0.5  # of the heatmap's maximum
# "Every connected region" keeps at most this many boxes (largest first), so a rule cannot win by
# scattering boxes over the image.
MAX_BOXES = 3
# Box sources (cxr_demo.card.FindingBox.source) drawn from the lung model alone, not the classifier's heatmap.
IMAGE_FREE_SOURCES = ("chest", "place")


@dataclass(frozen=True)
class BoxRule:
    """How a heatmap becomes boxes.

    Attributes:
        threshold: for ``mode="relative"`` a fraction of the heatmap's maximum; for ``"adaptive"``
            the number k of standard deviations above the heatmap's mean (``mean + k * std``).
        mode: ``"relative"`` or ``"adaptive"``.
        regions: ``"largest"`` (one box, the largest connected region) or ``"all"`` (one box per region).
        fit: ``"rect"`` (bounding rectangle of the region) or ``"moments"`` (a box centred on the
            region's heat-weighted centroid, sized from its heat-weighted spread: tighter for diffuse maps).
    """

    threshold: float = DEFAULT_BOX_THRESHOLD
    mode: str = "relative"
    regions: str = "largest"
    fit: str = "rect"

    def describe(self) -> str:
        level = f">= {self.threshold:g} x max" if self.mode == "relative" else f">= mean + {self.threshold:g} std"
        what = "largest connected region" if self.regions == "largest" else "every connected region"
        fit = "bounding rectangle" if self.fit == "rect" else "moment-fitted box"
        return f"{what} of heatmap {level}, {fit}"


def heatmap_to_boxes(
    heatmap: np.ndarray, threshold: float = DEFAULT_BOX_THRESHOLD, largest_only: bool = True,
    rule: BoxRule | None = None,
) -> list[Box]:
    """Boxes around the connected regions where the heatmap passes a threshold.

    Args:
        heatmap: 2-D non-negative map in the image's pixel frame.
        threshold: fraction of the heatmap's maximum a pixel must reach (ignored when ``rule`` is given).
        largest_only: keep only the largest connected region (ignored when ``rule`` is given).
        rule: the full box rule; overrides ``threshold`` and ``largest_only``.

    Returns:
        Boxes as (x, y, w, h) in pixels, largest region first; empty if the heatmap is all zero.
    """
    rule = rule or BoxRule(threshold, "relative", "largest" if largest_only else "all", "rect")
    return _region_boxes(heatmap, rule, _labelling(heatmap, rule))


def _labelling(heatmap: np.ndarray, rule: BoxRule) -> tuple | None:
    """The connected regions of the heatmap above a rule's level: (labels, region order by size, slices);
    None for an all-zero heatmap."""
    peak = float(np.max(heatmap)) if heatmap.size else 0.0
    if peak <= 0:
        return None
    if rule.mode == "relative":
        level = rule.threshold * peak
    elif rule.mode == "adaptive":
        level = min(float(heatmap.mean() + rule.threshold * heatmap.std()), peak)
    else:
        raise ValueError(f"unknown box-rule mode {rule.mode!r}")
    mask = heatmap >= level
    labelled, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, n + 1))
    return labelled, np.argsort(-sizes, kind="stable"), ndimage.find_objects(labelled)


def _region_boxes(heatmap: np.ndarray, rule: BoxRule, labelling: tuple | None) -> list[Box]:
    """A rule's boxes from a labelling: the largest region, or every region (largest first)."""
    if labelling is None:
        return []
    labelled, order, slices = labelling
    boxes: list[Box] = []
    for i in order[:1] if rule.regions == "largest" else order:
        sy, sx = slices[i]
        if rule.fit == "moments":
            boxes.append(_moment_box(heatmap, labelled == i + 1))
        else:
            boxes.append((float(sx.start), float(sy.start), float(sx.stop - sx.start), float(sy.stop - sy.start)))
    return boxes


def predicted_boxes(heatmap: np.ndarray, rule: BoxRule) -> list[Box]:
    """The boxes shown and scored for a heatmap: the rule's regions, at most :data:`MAX_BOXES`."""
    return heatmap_to_boxes(heatmap, rule=rule)[:MAX_BOXES]


def predicted_boxes_for_rules(heatmap: np.ndarray, rules: Sequence[BoxRule]) -> list[list[Box]]:
    """:func:`predicted_boxes` for many rules at once (the localisation study's grid): rules that share a
    mode and threshold share one labelling of the heatmap. Gives exactly what :func:`predicted_boxes` gives."""
    cache: dict[tuple[str, float], tuple | None] = {}
    out = []
    for rule in rules:
        key = (rule.mode, rule.threshold)
        if key not in cache:
            cache[key] = _labelling(heatmap, rule)
        out.append(_region_boxes(heatmap, rule, cache[key])[:MAX_BOXES])
    return out


def chest_frame(region: np.ndarray) -> Box | None:
    """The bounding box of a chest region mask (the lungs closed over the mediastinum); None when it is empty."""
    ys, xs = np.nonzero(region)
    if not len(xs):
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)


def relative_to_frame(box: Box, frame: Box) -> tuple[float, float, float, float]:
    """A box as (centre x, centre y, width, height) in fractions of ``frame``'s sides."""
    x, y, w, h = box
    x0, y0, sw, sh = frame
    return (x + w / 2 - x0) / sw, (y + h / 2 - y0) / sh, w / sw, h / sh


def box_at(centre_x: float, centre_y: float, w: float, h: float, width: int, height: int) -> Box:
    """A w x h box centred on a point, moved (not shrunk, unless larger than the image) to lie inside it."""
    w, h = min(w, float(width)), min(h, float(height))
    return (float(min(max(centre_x - w / 2, 0.0), width - w)), float(min(max(centre_y - h / 2, 0.0), height - h)),
            float(w), float(h))


def heat_peak(heatmap: np.ndarray) -> tuple[float, float]:
    """The centre (x, y) of the heatmap's hottest pixel."""
    py, px = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return float(px) + 0.5, float(py) + 0.5


def peak_box(heatmap: np.ndarray, size: tuple[float, float], frame: Box, width: int, height: int) -> Box:
    """A box of ``size`` (fractions of the chest frame's sides) centred on the heatmap's peak."""
    px, py = heat_peak(heatmap)
    return box_at(px, py, size[0] * frame[2], size[1] * frame[3], width, height)


def frame_box(relative: Sequence[float], frame: Box, width: int, height: int) -> Box:
    """A box given as (centre x, centre y, w, h) in fractions of the chest frame, in pixels inside the image."""
    cx, cy, w, h = relative
    return box_at(frame[0] + cx * frame[2], frame[1] + cy * frame[3], w * frame[2], h * frame[3], width, height)


def hotter_box(boxes: Sequence[Box], heatmap: np.ndarray) -> Box:
    """The box holding the most heat (the first on a tie)."""
    def heat_in(b: Box) -> float:
        x0, y0 = int(b[0]), int(b[1])
        return float(heatmap[y0:int(np.ceil(b[1] + b[3])), x0:int(np.ceil(b[0] + b[2]))].sum())

    return max(boxes, key=heat_in)


def place_map(components: Sequence[Sequence[float]], frame: Box, width: int, height: int) -> np.ndarray:
    """A finding's usual place as a (height, width) map with maximum 1: a sum of axis-aligned Gaussians, each
    ``(weight, centre x, centre y, sd x, sd y)`` in fractions of the chest frame (``frame``, in pixels)."""
    x0, y0, fw, fh = frame
    xs = (np.arange(width, dtype=np.float64) + 0.5 - x0) / fw
    ys = (np.arange(height, dtype=np.float64) + 0.5 - y0) / fh
    out = np.zeros((height, width), np.float32)
    for weight, cx, cy, sx, sy in components:
        out += np.outer(weight * np.exp(-0.5 * ((ys - cy) / sy) ** 2),
                        np.exp(-0.5 * ((xs - cx) / sx) ** 2)).astype(np.float32)
    top = float(out.max())
    return out / top if top > 0 else out


def finding_boxes(heatmap: np.ndarray, choice, frame: Box | None, width: int, height: int,
                  lungs: np.ndarray | None = None) -> list[Box] | None:
    """The boxes of one finding's box source (``choice``: a :class:`cxr_demo.card.FindingBox`, chosen per finding by
    ``training.box_sources``): a heatmap rule; the finding's usual box size centred on the heatmap's peak; the
    finding's usual box on the side of the chest with more heat; a heatmap rule applied to the heatmap weighted by
    the finding's usual place (``weighted``); or, not looking at the heatmap, the finding's usual box relative to the
    chest (``chest``) or a rule applied to its usual place within the lung fields (``place``: ``lungs`` is the lung
    fields' mask). None when the source needs the chest frame (or the lung fields) and there is none (the caller
    falls back to the model's box rule)."""
    if choice.source == "heatmap":
        return predicted_boxes(heatmap, BoxRule(**choice.rule))
    if frame is None:
        return None
    if choice.source == "weighted":
        return predicted_boxes(heatmap * place_map(choice.place, frame, width, height) ** choice.power,
                               BoxRule(**choice.rule))
    if choice.source == "place":
        if lungs is None or not lungs.any():
            return None
        return predicted_boxes(place_map(choice.place, frame, width, height) * lungs, BoxRule(**choice.rule))
    if choice.source == "sided":
        return [hotter_box([frame_box(b, frame, width, height) for b in choice.side_boxes], heatmap)]
    cx, cy, w, h = choice.typical_box
    if choice.source == "peak":
        return [peak_box(heatmap, (w * choice.scale, h * choice.scale), frame, width, height)]
    return [frame_box((cx, cy, w, h), frame, width, height)]


def _moment_box(heatmap: np.ndarray, region: np.ndarray) -> Box:
    """A box with the heat-weighted centroid and spread of ``region`` (width = sqrt(12) * std, the
    width of a uniform distribution with that spread), clipped to the image."""
    ys, xs = np.nonzero(region)
    w = heatmap[ys, xs].astype(np.float64)
    w = w / w.sum()
    cx, cy = float((xs * w).sum()), float((ys * w).sum())
    sx = float(np.sqrt(((xs - cx) ** 2 * w).sum() + 1 / 12))
    sy = float(np.sqrt(((ys - cy) ** 2 * w).sum() + 1 / 12))
    half_w, half_h = np.sqrt(12) * sx / 2, np.sqrt(12) * sy / 2
    x0, y0 = max(cx + 0.5 - half_w, 0.0), max(cy + 0.5 - half_h, 0.0)
    x1 = min(cx + 0.5 + half_w, float(heatmap.shape[1]))
    y1 = min(cy + 0.5 + half_h, float(heatmap.shape[0]))
    return (x0, y0, x1 - x0, y1 - y0)


def _intersection(a: Box, b: Box) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = min(ax + aw, bx + bw) - max(ax, bx)
    ih = min(ay + ah, by + bh) - max(ay, by)
    return max(iw, 0.0) * max(ih, 0.0)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes; 0 when either is empty."""
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def box_iobb(pred: Box, truth: Box) -> float:
    """Intersection over the ground-truth box's area (IoBB, Wang et al. 2017)."""
    area = truth[2] * truth[3]
    return _intersection(pred, truth) / area if area > 0 else 0.0


def match_truth(pred: Sequence[Box], truth: Sequence[Box]) -> list[tuple[float, float]]:
    """Per ground-truth box, the best IoU and the best IoBB over the predicted boxes (0 without any)."""
    return [(max((box_iou(p, t) for p in pred), default=0.0), max((box_iobb(p, t) for p in pred), default=0.0))
            for t in truth]


def best_match(pred: Sequence[Box], truth: Sequence[Box]) -> tuple[float | None, float | None]:
    """Best IoU and IoBB over all (predicted, ground-truth) pairs; ``None`` without both."""
    if not pred or not truth:
        return None, None
    per_box = match_truth(pred, truth)
    return max(i for i, _ in per_box), max(b for _, b in per_box)
