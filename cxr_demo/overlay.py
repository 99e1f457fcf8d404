"""The heatmap overlay: a heatmap blended onto the radiograph, with predicted and ground-truth boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from cxr_demo.boxes import Box

PRED_COLOUR = (255, 214, 0)  # yellow: model's box
TRUTH_COLOUR = (0, 230, 118)  # green: radiologist's box


def _jet(heat: np.ndarray) -> np.ndarray:
    """Map [0,1] to RGB with a jet-like colormap (no matplotlib at serve time)."""
    h = np.clip(heat, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * h - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
    return np.concatenate([r, g, b], axis=-1)


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
