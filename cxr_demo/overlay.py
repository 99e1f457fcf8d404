"""The heatmap overlay: a heatmap blended onto the radiograph, with predicted and ground-truth boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from cxr_demo.boxes import Box

PRED_COLOUR = (255, 214, 0)  # yellow: model's box
TRUTH_COLOUR = (0, 230, 118)  # green: radiologist's box
OUTLINE_COLOUR = (255, 64, 255)  # magenta: lung fields (not a colour of the heatmap scale)
MAX_OVERLAY_SIDE = 1024  # the overlay is shown at the film's own resolution, up to this many pixels a side


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
    outline: np.ndarray | None = None,
) -> np.ndarray:
    """Blend a heatmap (image frame, [0,1]) onto an 8-bit grayscale image and draw boxes.

    Predicted boxes are yellow and labelled P1.., ground-truth boxes green and labelled T1.. (thicker
    outline). The legend and the colour scale are drawn outside the image by the caller
    (:func:`colour_bar_css`), so nothing covers the film. ``outline`` (boolean, image frame) is drawn in
    :data:`OUTLINE_COLOUR` (the lung fields).
    """
    base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    if heatmap is not None and opacity > 0:
        colour = _jet(heatmap)
        # Low-activation areas stay mostly transparent so anatomy remains readable.
        alpha = opacity * np.clip(heatmap, 0, 1)[..., None] ** 0.5
        base = base * (1 - alpha) + colour * alpha
    if outline is not None:
        base[outline] = np.asarray(OUTLINE_COLOUR, dtype=np.float32) / 255.0
    out = Image.fromarray(np.clip(np.rint(base * 255), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(gray.shape) / 200))
    for i, (x, y, w, h) in enumerate(truth_boxes, 1):
        draw.rectangle([x, y, x + w, y + h], outline=TRUTH_COLOUR, width=width + 1)
        draw.text((x, min(y + h + width + 1, gray.shape[0] - 11)), f"T{i}", fill=TRUTH_COLOUR)  # below the box
    for i, (x, y, w, h) in enumerate(pred_boxes, 1):
        draw.rectangle([x, y, x + w, y + h], outline=PRED_COLOUR, width=width)
        draw.text((x, max(y - 11 - width, 0)), f"P{i}", fill=PRED_COLOUR)  # above the box
    return np.asarray(out)


def colour_bar_css() -> str:
    """The overlay's colour scale as a CSS gradient (the same jet-like map), for a colour bar drawn outside
    the image."""
    stops = [f"rgb{tuple(int(round(255 * c)) for c in _jet(np.array([v]))[0])} {100 * v:.0f}%"
             for v in np.linspace(0, 1, 9)]
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


def fit_overlay(overlay: np.ndarray, max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """The overlay at the film's own resolution, or shrunk (aspect kept) so its longer side is ``max_side``."""
    h, w = overlay.shape[:2]
    if max(h, w) <= max_side:
        return overlay
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(overlay).resize(size, Image.Resampling.LANCZOS))
