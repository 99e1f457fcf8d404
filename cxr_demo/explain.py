"""Heatmaps (class activation maps), heatmap -> box, box overlap metrics and overlay rendering."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage

from cxr_demo.card import ModelCard
from cxr_demo.models import reshape_for, resolve_module

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x, y, w, h in pixels

# pytorch-grad-cam class per method; imported on first use (it pulls in OpenCV: ~2.5 s of the app's start).
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}


def cam_class(method: str) -> type:
    """The pytorch-grad-cam class of a method name (a key of :data:`CAM_METHODS`)."""
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, CAM_METHODS[method])


CAM_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "scorecam": "Score-CAM (slow)",
    "ablationcam": "Ablation-CAM (slow)",
}
DEFAULT_CAM_METHOD = "gradcam"
DEFAULT_BOX_THRESHOLD = 0.5  # of the heatmap's maximum


def compute_heatmap(
    model: torch.nn.Module,
    card: ModelCard,
    input_tensor: torch.Tensor,
    class_index: int,
    method: str = DEFAULT_CAM_METHOD,
    layer: str | None = None,
) -> np.ndarray:
    """A class activation map for one image, at the model's input resolution, scaled to [0, 1].

    ``layer`` overrides the card's CAM target layer (a dotted path such as ``blocks.4``).
    Must not run under ``torch.inference_mode``/``no_grad`` (pytorch-grad-cam needs gradients), and a
    shared model must not run two CAMs at once (the hooks live on the module).
    """
    return heatmap_and_logits(model, card, input_tensor, class_index, method, layer)[0]


def heatmap_and_logits(
    model: torch.nn.Module,
    card: ModelCard,
    input_tensor: torch.Tensor,
    class_index: int | None,
    method: str = DEFAULT_CAM_METHOD,
    layer: str | None = None,
) -> tuple[np.ndarray, torch.Tensor, int]:
    """:func:`compute_heatmap` that also returns the logits of the CAM's own forward pass (so the
    probabilities cost no second forward) and the class explained (``None``: the top-scoring one)."""
    if method not in CAM_METHODS:
        raise KeyError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    target = resolve_module(model, layer or card.cam_target_layer)
    kwargs = {}
    reshape = reshape_for(model, card.architecture)
    if reshape is not None:
        kwargs["reshape_transform"] = reshape
    if reshape is not None and method == "ablationcam":
        # Token / channels-last activations: ablate the last dimension (pytorch-grad-cam's ViT layer
        # transposes channels to dim 1 and back, which also fits Swin's (B, H, W, C)).
        from pytorch_grad_cam.ablation_layer import AblationLayerVit

        kwargs["ablation_layer"] = AblationLayerVit()
    x = input_tensor.detach().clone()  # a tensor born under inference_mode cannot take part in autograd
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cam_class(method)(model=model, target_layers=[target], **kwargs)
    if method in {"scorecam", "ablationcam"}:
        cam.batch_size = 32
    # Not ``with cam:``: BaseCAM.__exit__ prints and swallows IndexError, hiding real failures.
    try:
        # targets=None: pytorch-grad-cam explains the arg-max logit, the top finding (sigmoid and softmax
        # are monotonic), and keeps that forward pass's output in ``cam.outputs``.
        targets = None if class_index is None else [ClassifierOutputTarget(class_index)]
        grayscale = cam(input_tensor=x, targets=targets)
        logits = cam.outputs.detach()
    finally:
        cam.activations_and_grads.release()
    index = int(logits[0].argmax()) if class_index is None else class_index
    heat = np.asarray(grayscale[0], dtype=np.float32)
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(heat.max())
    return (heat / peak if peak > 0 else heat), logits, index


def resize_heatmap(heatmap: np.ndarray, width: int, height: int,
                   crop: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Map a heatmap of the model's input back to the image's pixel frame (bilinear).

    With a ``crop`` (fractions top, bottom, left, right, as the card's preprocessing cut), the heatmap
    covers only that rectangle of the image; outside it the model saw nothing and the map is 0.
    """
    if crop is None:
        im = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))
        return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    top, bottom, left, right = crop  # the same rounding as images.resize_gray
    y0, y1 = int(round(top * height)), int(round(bottom * height))
    x0, x1 = int(round(left * width)), int(round(right * width))
    out = np.zeros((height, width), dtype=np.float32)
    out[y0:y1, x0:x1] = resize_heatmap(heatmap, x1 - x0, y1 - y0)
    return out


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
    peak = float(np.max(heatmap)) if heatmap.size else 0.0
    if peak <= 0:
        return []
    if rule.mode == "relative":
        level = rule.threshold * peak
    elif rule.mode == "adaptive":
        level = min(float(heatmap.mean() + rule.threshold * heatmap.std()), peak)
    else:
        raise ValueError(f"unknown box-rule mode {rule.mode!r}")
    mask = heatmap >= level
    labelled, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, n + 1))
    order = np.argsort(-sizes, kind="stable")
    slices = ndimage.find_objects(labelled)
    boxes: list[Box] = []
    for i in order[:1] if rule.regions == "largest" else order:
        sy, sx = slices[i]
        if rule.fit == "moments":
            boxes.append(_moment_box(heatmap, labelled == i + 1))
        else:
            boxes.append((float(sx.start), float(sy.start), float(sx.stop - sx.start), float(sy.stop - sy.start)))
    return boxes


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


def best_match(pred: Sequence[Box], truth: Sequence[Box]) -> tuple[float | None, float | None]:
    """Best IoU and IoBB over all (predicted, ground-truth) pairs; ``None`` without both."""
    if not pred or not truth:
        return None, None
    iou = max(box_iou(p, t) for p in pred for t in truth)
    iobb = max(box_iobb(p, t) for p in pred for t in truth)
    return iou, iobb


def _jet(heat: np.ndarray) -> np.ndarray:
    """Map [0,1] to RGB with a jet-like colormap (no matplotlib at serve time)."""
    h = np.clip(heat, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * h - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1)


PRED_COLOUR = (255, 214, 0)  # yellow: model's box
TRUTH_COLOUR = (0, 230, 118)  # green: radiologist's box


def render_overlay(
    gray: np.ndarray,
    heatmap: np.ndarray | None,
    opacity: float,
    pred_boxes: Sequence[Box] = (),
    truth_boxes: Sequence[Box] = (),
) -> np.ndarray:
    """Blend a heatmap (image frame, [0,1]) onto an 8-bit grayscale image and draw boxes.

    Predicted boxes are yellow, ground-truth boxes green (dashed look via a thicker outline).
    """
    base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    if heatmap is not None and opacity > 0:
        colour = _jet(heatmap)
        # Low-activation areas stay mostly transparent so anatomy remains readable.
        alpha = opacity * np.clip(heatmap, 0, 1)[..., None] ** 0.5
        base = base * (1 - alpha) + colour * alpha
    out = Image.fromarray(np.clip(np.rint(base * 255), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(gray.shape) / 200))
    for i, (x, y, w, h) in enumerate(truth_boxes, 1):
        draw.rectangle([x, y, x + w, y + h], outline=TRUTH_COLOUR, width=width + 1)
        draw.text((x, min(y + h + width + 1, gray.shape[0] - 11)), f"T{i}", fill=TRUTH_COLOUR)  # below the box
    for i, (x, y, w, h) in enumerate(pred_boxes, 1):
        draw.rectangle([x, y, x + w, y + h], outline=PRED_COLOUR, width=width)
        draw.text((x, max(y - 11 - width, 0)), f"P{i}", fill=PRED_COLOUR)  # above the box
    if (truth_boxes or pred_boxes) and min(gray.shape) >= 128:  # legend, bottom-left
        x0, y0 = 4, gray.shape[0] - 28
        draw.rectangle([x0, y0, x0 + 150, y0 + 24], fill=(0, 0, 0))
        draw.text((x0 + 4, y0 + 1), "P = model's box", fill=PRED_COLOUR)
        draw.text((x0 + 4, y0 + 12), "T = radiologist's box", fill=TRUTH_COLOUR)
    return np.asarray(out)
