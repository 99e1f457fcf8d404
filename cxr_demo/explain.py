"""Heatmaps (class activation maps), heatmap -> box, box overlap metrics and overlay rendering."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy import ndimage

from cxr_demo.card import ModelCard
from cxr_demo.models import reshape_for, resolve_module

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x, y, w, h in pixels

CAM_METHODS: dict[str, type] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "eigencam": EigenCAM,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
}
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
) -> np.ndarray:
    """A class activation map for one image, at the model's input resolution, scaled to [0, 1].

    Must not run under ``torch.inference_mode``/``no_grad`` (pytorch-grad-cam needs gradients), and a
    shared model must not run two CAMs at once (the hooks live on the module).
    """
    if method not in CAM_METHODS:
        raise KeyError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    layer = resolve_module(model, card.cam_target_layer)
    kwargs = {}
    reshape = reshape_for(model, card.architecture)
    if reshape is not None:
        kwargs["reshape_transform"] = reshape
    x = input_tensor.detach().clone()  # a tensor born under inference_mode cannot take part in autograd
    with CAM_METHODS[method](model=model, target_layers=[layer], **kwargs) as cam:
        if method in {"scorecam", "ablationcam"}:
            cam.batch_size = 32
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(class_index)])
    heat = np.asarray(grayscale[0], dtype=np.float32)
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(heat.max())
    return heat / peak if peak > 0 else heat


def resize_heatmap(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a heatmap to an image's pixel frame (bilinear)."""
    im = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def heatmap_to_boxes(
    heatmap: np.ndarray, threshold: float = DEFAULT_BOX_THRESHOLD, largest_only: bool = True
) -> list[Box]:
    """Boxes around the regions where ``heatmap >= threshold * max``.

    Args:
        heatmap: 2-D non-negative map in the image's pixel frame.
        threshold: fraction of the heatmap's maximum that a pixel must reach.
        largest_only: keep only the largest connected region (else one box per region, largest first).

    Returns:
        Boxes as (x, y, w, h) in pixels; empty if the heatmap is all zero.
    """
    peak = float(np.max(heatmap)) if heatmap.size else 0.0
    if peak <= 0:
        return []
    mask = heatmap >= threshold * peak
    labelled, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, n + 1))
    order = np.argsort(-sizes, kind="stable")
    slices = ndimage.find_objects(labelled)
    boxes: list[Box] = []
    for i in order[:1] if largest_only else order:
        sy, sx = slices[i]
        boxes.append((float(sx.start), float(sy.start), float(sx.stop - sx.start), float(sy.stop - sy.start)))
    return boxes


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
    for x, y, w, h in truth_boxes:
        draw.rectangle([x, y, x + w, y + h], outline=TRUTH_COLOUR, width=width + 1)
    for x, y, w, h in pred_boxes:
        draw.rectangle([x, y, x + w, y + h], outline=PRED_COLOUR, width=width)
    return np.asarray(out)
