"""Preprocessing and probabilities: one implementation for the app, evaluation and training.

Every image the models see, in training, evaluation or the app, goes through :func:`prepare_pixels`
(crop, resize, round to 8 bits) and then :func:`normalise_batch`: the app serves exactly what was
evaluated. A single image takes :func:`preprocess`; training's cached uint8 arrays take
:func:`normalise_batch`, :func:`predict_array` and :func:`feature_array`.
"""

from __future__ import annotations

import numpy as np
import torch

from cxr_demo.card import ModelCard
from cxr_demo.images import Crop, resize_gray


def prepare_pixels(pixels: np.ndarray, size: int, crop: Crop | None = None) -> np.ndarray:
    """A [0,1] grayscale image -> the (size, size) uint8 array a model sees: cropped, resized, and rounded
    to 8 bits as the training cache stores it (a sub-8-bit difference moved ImageNet-stem models' outputs
    by up to 0.35, so serving must not skip the rounding)."""
    return np.clip(np.rint(resize_gray(pixels, size, crop) * 255.0), 0, 255).astype(np.uint8)


def preprocess(pixels: np.ndarray, card: ModelCard) -> torch.Tensor:
    """A [0,1] grayscale image -> normalised (1, 1, S, S) tensor as the card's model expects."""
    return normalise_batch(prepare_pixels(pixels, card.input_size, card.crop)[None], card.mean, card.std)


def unit_batch(batch_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A (B, S, S) uint8 batch -> float (B, 1, S, S) in [0, 1] (training augments at this stage)."""
    return torch.as_tensor(batch_uint8).float()[:, None] / 255.0


def normalise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Standardise a [0, 1] batch with the card's one-channel mean and std."""
    return (x - mean) / std


def normalise_batch(batch_uint8: np.ndarray | torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """A (B, S, S) uint8 batch (training's image cache) -> normalised float (B, 1, S, S) tensor."""
    return normalise(unit_batch(batch_uint8), mean, std)


def logits_to_probabilities(logits: torch.Tensor, task_kind: str) -> torch.Tensor:
    """Sigmoid per finding for multi-label heads (never softmax across findings), softmax otherwise."""
    if task_kind == "multilabel":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def features_and_logits(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled penultimate features and logits from one forward pass of a timm classifier."""
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    return feats, model.get_classifier()(feats)


def with_whole_film(x: torch.Tensor, pixels: np.ndarray, card: ModelCard) -> torch.Tensor:
    """The batch of one preprocessed film ``x`` followed by the whole film (uncropped) as ``card``'s model takes it:
    what a whole-film out-of-distribution check reads (:attr:`cxr_demo.ood.OODDetector.whole_film`)."""
    return torch.cat([x, normalise_batch(prepare_pixels(pixels, card.input_size)[None], card.mean, card.std)])


def ood_features(model: torch.nn.Module, card: ModelCard, pixels: np.ndarray, whole_film: bool = False) -> torch.Tensor:
    """The features an out-of-distribution check reads from ``model`` for one film, shape (1, D): those of the
    card's preprocessing of ``pixels``, followed, with ``whole_film`` and a cropping card, by those of the whole film
    (one batch of two)."""
    x = preprocess(pixels, card)
    if whole_film and card.crop is not None:
        x = with_whole_film(x, pixels, card)
    with torch.inference_mode():
        feats, _ = features_and_logits(model, x)
    return feats.reshape(1, -1)


def predict_probabilities(model: torch.nn.Module, card: ModelCard, x: torch.Tensor) -> np.ndarray:
    """Probabilities for a preprocessed batch, shape (B, num_classes)."""
    with torch.inference_mode():
        logits = model(x)
    return logits_to_probabilities(logits, card.task_kind).float().numpy()


def _batches(model: torch.nn.Module, pixels: np.ndarray, mean: float, std: float, batch_size: int,
             device: torch.device | None):
    """Normalised channels-last batches of a cached uint8 array on the model's device."""
    model.eval()
    device = device or next(model.parameters()).device
    for i in range(0, len(pixels), batch_size):
        x = normalise_batch(pixels[i : i + batch_size], mean, std).to(device)
        yield x.contiguous(memory_format=torch.channels_last)


def predict_array(model: torch.nn.Module, pixels: np.ndarray, mean: float, std: float, task_kind: str,
                  batch_size: int = 64, device: torch.device | None = None) -> np.ndarray:
    """Probabilities for a cached uint8 array (N, S, S), shape (N, num_classes)."""
    with torch.inference_mode():
        out = [logits_to_probabilities(model(x).float(), task_kind).cpu().numpy()
               for x in _batches(model, pixels, mean, std, batch_size, device)]
    return np.concatenate(out)


def feature_array(model: torch.nn.Module, pixels: np.ndarray, mean: float, std: float, batch_size: int = 64,
                  device: torch.device | None = None) -> np.ndarray:
    """Pooled penultimate features for a cached uint8 array (N, S, S), shape (N, num_features)."""
    with torch.inference_mode():
        out = [features_and_logits(model, x)[0].float().cpu().numpy()
               for x in _batches(model, pixels, mean, std, batch_size, device)]
    return np.concatenate(out)


def findings_table(card: ModelCard, probs: np.ndarray, operating_point: str) -> list[dict]:
    """One row per label in card order from the model's raw probabilities: name, probability, threshold and
    whether it is flagged.

    ``probability`` and ``threshold`` are calibrated by the card's calibration (``cxr_demo.calibration``; the
    raw values stay under ``raw_probability`` and ``raw_threshold``). The flag compares the raw values, which
    is the same comparison, as the calibration map is increasing. Multi-class models flag the arg-max class
    (threshold ``None``, ``threshold_note`` says why).
    """
    from cxr_demo.calibration import calibrate, calibrated_threshold

    shown = calibrate(card, probs)
    rows = []
    if card.task_kind == "multiclass":
        top = int(np.argmax(probs))
        for i, name in enumerate(card.label_names):
            rows.append({"name": name, "probability": float(shown[i]), "threshold": None, "positive": i == top,
                         "raw_probability": float(probs[i]), "raw_threshold": None,
                         "threshold_note": "one decision rule for this multi-class model: the most probable class "
                                           "is the answer (no per-class threshold)"})
        return rows
    for i, name in enumerate(card.label_names):
        thr = card.threshold(operating_point, name)
        rows.append({"name": name, "probability": float(shown[i]), "threshold": calibrated_threshold(card, name, thr),
                     "positive": bool(probs[i] >= thr), "raw_probability": float(probs[i]), "raw_threshold": float(thr)})
    return rows
