"""Preprocessing and probabilities, shared by the app and the training package."""

from __future__ import annotations

import numpy as np
import torch

from cxr_demo.card import ModelCard
from cxr_demo.images import resize_gray


def preprocess(pixels: np.ndarray, card: ModelCard) -> torch.Tensor:
    """A [0,1] grayscale image -> normalised (1, 1, S, S) tensor as the card's model expects."""
    arr = resize_gray(pixels, card.input_size, card.crop)
    x = torch.from_numpy((arr - card.mean) / card.std).float()
    return x[None, None]


def normalise_batch(batch_uint8: torch.Tensor, card: ModelCard) -> torch.Tensor:
    """A (B, 1, S, S) uint8 batch (training cache) -> normalised float tensor."""
    return (batch_uint8.float() / 255.0 - card.mean) / card.std


def logits_to_probabilities(logits: torch.Tensor, task_kind: str) -> torch.Tensor:
    """Sigmoid per finding for multi-label heads (never softmax across findings), softmax otherwise."""
    if task_kind == "multilabel":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def predict_probabilities(model: torch.nn.Module, card: ModelCard, x: torch.Tensor) -> np.ndarray:
    """Probabilities for a preprocessed batch, shape (B, num_classes)."""
    with torch.inference_mode():
        logits = model(x)
    return logits_to_probabilities(logits, card.task_kind).float().numpy()


def findings_table(card: ModelCard, probs: np.ndarray, operating_point: str) -> list[dict]:
    """One row per label in card order: name, probability, threshold and whether it is flagged.

    Multi-class models flag the arg-max class (threshold reported as ``None``).
    """
    rows = []
    if card.task_kind == "multiclass":
        top = int(np.argmax(probs))
        for i, name in enumerate(card.label_names):
            rows.append({"name": name, "probability": float(probs[i]), "threshold": None, "positive": i == top})
        return rows
    for i, name in enumerate(card.label_names):
        thr = card.threshold(operating_point, name)
        rows.append(
            {"name": name, "probability": float(probs[i]), "threshold": float(thr), "positive": bool(probs[i] >= thr)}
        )
    return rows
