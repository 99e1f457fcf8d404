"""Lung fields: a small segmentation model, and the thorax region a heatmap is restricted to.

The lung model is a U-Net (segmentation-models-pytorch) on an EfficientNet-Lite0 encoder, trained by
``python -m training.lungseg`` on the human-drawn masks of ``../shared/data/lungseg``. Its card
(``lungseg.json`` beside ``model.safetensors``) carries the sha256 that every load checks, like the
classifiers' cards; it is kept out of the classifier list because it answers a different question.

The *anatomical prior* of ``/explain`` is a region derived from the lung mask (:func:`thorax_region`):
the lungs themselves, or the lungs closed over the mediastinum (every row filled between the outermost
lung pixels, so heart and mediastinal boxes fit), optionally dilated so pleural findings at the edge fit.
Which shape a model uses is chosen by the localisation study on its select half and stored in the
classifier's card (``explain_defaults.prior``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from scipy import ndimage

from cxr_demo import paths
from cxr_demo.card import WEIGHTS_FILE, CardError, plain_name
from cxr_demo.inference import normalise_batch, prepare_pixels

log = logging.getLogger(__name__)

LUNG_CARD_FILE = "lungseg.json"
DEFAULT_LUNG_MODEL = "lungseg-efficientnet-lite0"
# Every shape the study tries, as "<kind>" or "<kind>+<dilation as a fraction of the lungs' width>".
PRIOR_SHAPES = ("lungs", "lungs+0.05", "lungs+0.1", "hull", "hull+0.05", "hull+0.1")
# Below this fraction of the image, no lung fields were found (see docs/lungs/chest_check.json).
MIN_LUNG_FRACTION = 0.05
# The column profile of an upright film's lung mask drops to ~0 between the lungs; above this share of its
# peak, the lungs are not side by side.
MAX_COLUMN_GAP = 0.5
# How much surer (mean |p - 0.5|) the lung model must be of the film turned by 180 degrees before the film is
# called upside down.
VIEW_MARGIN = 0.01
VIEWS = {"upside_down": lambda a: a[..., ::-1, ::-1]}
# Lungs hold air: on a film of normal polarity they are darker than the rest of the chest around them (mediastinum,
# heart, ribs' soft tissue). Above this mean difference (lungs minus the rest of the closed thorax, [0, 1] pixel
# units) the film is called inverted. The physical boundary (0), not a fitted value; docs/lungs/chest_check*.json
# measure it on two samples.
MAX_LUNG_CONTRAST = 0.0
# An upright pair of lungs is at its widest through the middle third of its height: the lowest lung width per row
# there, as a share of the widest row ("row_gap" of LungResult.anatomy), is 0.85 on a median NIH film. Photographs
# on which the lung model finds two blobs side by side (a face, a cat, a cup) narrow there. Below this share the
# film is not called a chest film: the 1st percentile of chest films' train/validation data (NIH, Kermany, COVID-19
# collection; the lowest of the three), fitted by `python -m training.lungseg --fit-row-fill` into
# docs/lungs/row_fill.json (a test keeps the two equal); docs/lungs/chest_check*.json measure it on other films.
MIN_ROW_FILL = 0.45
# How many films' lung results the segmenter keeps in memory (masks and confidences, never pixels), so that a film
# sent to a second model, compared or explained is not segmented again.
CACHE_SIZE = 32


def _middle_dip(profile: np.ndarray) -> float:
    """The lowest value of a mask's profile in the middle third of its extent, as a share of its peak."""
    nz = np.flatnonzero(profile > 0)
    if nz.size < 3:
        return 1.0
    a, b = nz[0], nz[-1]
    third = (b - a) // 3
    mid = profile[a + third : b - third + 1]
    return float(mid.min() / profile.max()) if mid.size else 1.0


def _confidence(probability: np.ndarray) -> float:
    return float(np.mean(np.abs(probability - 0.5)))


class LungCard(BaseModel):
    """What is needed to use the lung-field model, stored as ``lungseg.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    description: str
    summary: str
    task: Literal["lungseg"] = "lungseg"
    task_kind: Literal["segmentation"] = "segmentation"
    encoder: str = Field(description="segmentation-models-pytorch encoder name (a timm 'tu-' encoder)")
    decoder_channels: list[int] = Field(min_length=5, max_length=5)
    input_size: int = Field(gt=15, le=1024)
    mean: float
    std: float = Field(gt=0)
    threshold: float = Field(default=0.5, gt=0, lt=1)
    data_source: str
    init: str
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    limitations: list[str] = Field(default_factory=list)
    intended_use: str
    license: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    _plain_name = field_validator("name")(classmethod(lambda cls, v: plain_name(v)))

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, v: str) -> str:
        if v not in ("tu-tf_efficientnet_lite0", "tu-test_efficientnet"):
            raise ValueError(f"encoder {v!r} is not one this project builds")
        return v


def read_lung_card(folder: Path) -> LungCard:
    """Parse ``folder/lungseg.json``.

    Raises:
        CardError: missing, not JSON, or not a valid lung-model card.
    """
    path = Path(folder) / LUNG_CARD_FILE
    try:
        return LungCard.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as e:
        raise CardError(f"{path} is missing: the lung-field model needs its card") from e
    except (json.JSONDecodeError, ValidationError) as e:
        raise CardError(f"{path} is not a valid lung-model card: {e}") from e


def write_lung_card(card: LungCard, folder: Path) -> Path:
    path = Path(folder) / LUNG_CARD_FILE
    path.write_text(json.dumps(card.model_dump(), indent=2) + "\n", encoding="utf-8")
    return path


def create_unet(encoder: str, decoder_channels: list[int] | tuple[int, ...]) -> torch.nn.Module:
    """The untrained U-Net of a card (one input channel, one output logit per pixel)."""
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder, encoder_weights=None, in_channels=1, classes=1,
                    decoder_channels=tuple(decoder_channels), encoder_depth=5)


def lung_pixels(pixels: np.ndarray, card: LungCard) -> np.ndarray:
    """A [0, 1] grayscale image -> the (S, S) uint8 array the lung model sees (training's cache goes through
    the same :func:`cxr_demo.inference.prepare_pixels`)."""
    return prepare_pixels(pixels, card.input_size)


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the two largest connected regions (the lungs) and fill their holes."""
    labelled, n = ndimage.label(mask)
    if n > 2:
        sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, n + 1))
        keep = 1 + np.argsort(-sizes)[:2]
        mask = np.isin(labelled, keep)
    return ndimage.binary_fill_holes(mask)


def parse_shape(shape: str) -> tuple[str, float]:
    """``"hull+0.05"`` -> ``("hull", 0.05)``.

    Raises:
        ValueError: not one of :data:`PRIOR_SHAPES`' forms.
    """
    kind, _, dilation = shape.partition("+")
    if kind not in ("lungs", "hull"):
        raise ValueError(f"unknown prior shape {shape!r}; expected one of {PRIOR_SHAPES}")
    return kind, float(dilation) if dilation else 0.0


def thorax_region(lungs: np.ndarray, shape: str) -> np.ndarray:
    """The region a heatmap is restricted to, from a (cleaned) lung mask, at the mask's resolution.

    ``lungs``: the lung fields. ``hull``: every row between the leftmost and rightmost lung pixel (the
    lungs closed over the mediastinum and heart). ``+d``: then dilated by ``d`` x the lungs' width.
    """
    kind, dilation = parse_shape(shape)
    region = lungs.astype(bool).copy()
    if not region.any():
        return region
    if kind == "hull":
        rows = np.flatnonzero(region.any(axis=1))
        for r in rows:
            cols = np.flatnonzero(region[r])
            region[r, cols[0] : cols[-1] + 1] = True
    if dilation > 0:
        cols = np.flatnonzero(region.any(axis=0))
        radius = max(1, round(dilation * (cols[-1] - cols[0] + 1)))
        yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
        region = ndimage.binary_dilation(region, structure=(xx * xx + yy * yy) <= radius * radius)
    return region


def lung_contrast(inputs: np.ndarray, lungs: np.ndarray) -> float | None:
    """Mean pixel value ([0, 1]) in the lungs minus in the rest of the closed thorax (the lungs' ``hull``: the
    mediastinum and heart between them), or outside the lungs when the hull adds nothing; None without lungs.
    Negative on a film of normal polarity (air is dark)."""
    if not lungs.any():
        return None
    a = inputs.astype(np.float32) / 255.0
    rest = thorax_region(lungs, "hull") & ~lungs
    if not rest.any():
        rest = ~lungs
    return float(a[lungs].mean() - a[rest].mean()) if rest.any() else None


def to_image_frame(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask at the model's resolution -> the image's pixel frame (nearest neighbour)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((width, height), Image.Resampling.NEAREST)) > 127


def apply_prior(heatmap: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The heatmap with everything outside ``region`` (same shape, boolean) set to 0, rescaled to peak 1."""
    out = np.where(region, heatmap, 0.0).astype(np.float32)
    peak = float(out.max())
    return out / peak if peak > 0 else out


@dataclass
class LungResult:
    """The lung model's answer for one image, at the model's input resolution."""

    probability: np.ndarray  # (S, S) float in [0, 1]
    mask: np.ndarray  # (S, S) bool, cleaned
    # the lung model's confidence on other views of the same film ("upside_down"), when asked
    alternates: dict[str, float] = field(default_factory=dict)
    # mean pixel value in the lungs minus in the rest of the closed thorax (:func:`lung_contrast`), when asked
    contrast: float | None = None

    @property
    def fraction(self) -> float:
        """Share of the image covered by lung fields."""
        return float(self.mask.mean())

    def found(self) -> bool:
        """Whether lung fields were found (enough lung to restrict a heatmap to)."""
        return self.fraction >= MIN_LUNG_FRACTION

    def anatomy(self) -> dict[str, Any]:
        """What the mask says about the film: lung share; the gap between the lungs (the mediastinum) across the
        columns against any gap across the rows (a rotated film has its gap across the rows); how much surer
        the lung model is on the film turned upside down, and how much brighter the lungs are than the thorax
        around them (when :meth:`LungSegmenter.segment` was asked for the check)."""
        cols, rows = _middle_dip(self.mask.sum(axis=0)), _middle_dip(self.mask.sum(axis=1))
        out: dict[str, Any] = {"lung_fraction": round(self.fraction, 4), "column_gap": round(cols, 3),
                               "row_gap": round(rows, 3), "confidence": round(_confidence(self.probability), 4)}
        out.update({f"confidence_{k}": round(v, 4) for k, v in self.alternates.items()})
        if self.contrast is not None:
            out["lung_contrast"] = round(self.contrast, 4)
        return out

    def chest_problem(self) -> str | None:
        """Why this does not look like an upright frontal chest film (None: it does), from the lungs alone.
        The rules and their margins are fixed, except the lung-shape threshold (:data:`MIN_ROW_FILL`), fitted on
        train/validation chest films only; docs/lungs/chest_check*.json measure them."""
        if not self.found():
            return "no lung fields were found in it"
        a = self.anatomy()
        if a["column_gap"] > a["row_gap"] or a["column_gap"] > MAX_COLUMN_GAP:
            return "the lung model did not find two lungs side by side (is the film rotated?)"
        if a["row_gap"] < MIN_ROW_FILL:
            return ("what the lung model found narrows through the middle of its height, unlike a pair of lungs "
                    "(a photograph or a drawing?)")
        if a.get("confidence_upside_down", 0.0) > a["confidence"] + VIEW_MARGIN:
            return "it looks upside down (the lung model is surer of the film turned by 180 degrees)"
        if a.get("lung_contrast", -1.0) > MAX_LUNG_CONTRAST:
            return "it looks inverted (the lung fields are brighter than the chest around them, not darker)"
        return None

    def region(self, shape: str, width: int, height: int) -> np.ndarray:
        """The prior's region of ``shape`` in the image's pixel frame."""
        return to_image_frame(thorax_region(self.mask, shape), width, height)

    def outline(self, width: int, height: int) -> np.ndarray:
        """The lungs' boundary pixels in the image's pixel frame (for the overlay)."""
        full = to_image_frame(self.mask, width, height)
        thickness = max(1, round(max(width, height) / 300))
        return full & ~ndimage.binary_erosion(full, iterations=thickness)


class LungSegmenter:
    """The lung-field model of a checkpoint folder, loaded once (sha256-checked, strict) and thread-safe."""

    def __init__(self, folder: Path, pinned_sha256: str | None = None) -> None:
        """``pinned_sha256``: the sha256 the app pins for these weights (cxr_demo/pinned_weights.json), checked
        besides the card's own, so a card and weights changed together do not load."""
        self.folder = Path(folder)
        self.card = read_lung_card(self.folder)
        self.pinned_sha256 = pinned_sha256
        self._model: torch.nn.Module | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[bytes, bool], LungResult] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def model(self) -> torch.nn.Module:
        with self._lock:
            if self._model is None:
                from safetensors.torch import load_file

                from cxr_demo.models import WeightsError, for_inference, sha256_file

                path = self.folder / WEIGHTS_FILE
                if self.pinned_sha256 is not None and self.pinned_sha256 != self.card.sha256:
                    raise WeightsError("the lung model's card gives a sha256 other than the one pinned in "
                                       "cxr_demo/pinned_weights.json; refusing a card and weights changed together")
                digest = sha256_file(path)
                if digest != self.card.sha256:
                    raise WeightsError(f"the weights of the lung model {self.card.name!r} do not match the sha256 in "
                                       f"its card (expected {self.card.sha256[:12]}..., found {digest[:12]}...); "
                                       "refusing to load them")
                model = create_unet(self.card.encoder, self.card.decoder_channels)
                try:
                    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
                except RuntimeError as e:
                    raise WeightsError(f"the weights of {self.card.name!r} do not fit its U-Net: {e}") from e
                self._model = for_inference(model.eval(), self.card.input_size)  # as the classifiers are served
            return self._model

    def segment(self, pixels: np.ndarray, views: bool = False) -> LungResult:
        """Lung fields of a [0, 1] grayscale image; with ``views``, also what the is-this-a-chest-X-ray check
        needs: the model's confidence on the film turned upside down (one batch of two) and the lungs' contrast.

        The answers for the last :data:`CACHE_SIZE` model inputs are kept (keyed by a hash of the (S, S) input, so
        exactly what the model would see again): a film sent to another model or explained is not segmented
        again. A result with ``views`` also answers a request without."""
        inputs = lung_pixels(pixels, self.card)
        key = hashlib.blake2b(inputs.tobytes(), digest_size=16).digest()
        with self._cache_lock:
            for k in ((key, True), (key, False))[: 1 if views else 2]:
                if k in self._cache:
                    self._cache.move_to_end(k)
                    return self._cache[k]
        batch = inputs[None]
        if views:
            batch = np.concatenate([batch] + [np.ascontiguousarray(f(batch)) for f in VIEWS.values()])
        with torch.inference_mode():
            prob = torch.sigmoid(self.model(normalise_batch(batch, self.card.mean, self.card.std)))[:, 0].numpy()
        mask = clean_mask(prob[0] >= self.card.threshold)
        result = LungResult(prob[0], mask)
        if views:
            result.alternates = {k: _confidence(p) for k, p in zip(VIEWS, prob[1:], strict=True)}
            result.contrast = lung_contrast(inputs, mask)
        with self._cache_lock:
            self._cache[(key, views)] = result
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return result


def default_lung_folder() -> Path | None:
    """The project's lung model folder, if it is there."""
    folder = paths.DEFAULT_CHECKPOINTS / DEFAULT_LUNG_MODEL
    return folder if (folder / LUNG_CARD_FILE).is_file() else None


def default_segmenter() -> LungSegmenter | None:
    """The project's lung model with its pinned sha256 (None, logged, when it is missing or its card is bad)."""
    from cxr_demo.zoo import PINS_FILE

    folder = default_lung_folder()
    if folder is None:
        log.warning("no lung-field model in %s: the anatomical prior is off", paths.DEFAULT_CHECKPOINTS)
        return None
    pin = None
    if PINS_FILE.is_file():  # as for the classifiers: with a pins file, an unpinned lung model is refused
        pin = json.loads(PINS_FILE.read_text()).get("lung_model", {}).get("sha256") or "not pinned"
    try:
        return LungSegmenter(folder, pinned_sha256=pin)
    except CardError as e:
        log.error("lung-field model unusable: %s", e)
        return None
