"""Building models from cards and loading their weights (sha256-checked, strict), as timm does."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from cxr_demo.card import ModelCard
from cxr_demo.small_cnn import LOCAL_ARCHITECTURES

log = logging.getLogger(__name__)


def create_model(card: ModelCard) -> torch.nn.Module:
    """An untrained model (timm, or one of ours in LOCAL_ARCHITECTURES) with the card's architecture, channels and head size."""
    args = dict(card.model_args)
    args.setdefault("in_chans", 1)
    if card.architecture in LOCAL_ARCHITECTURES:
        return LOCAL_ARCHITECTURES[card.architecture](num_classes=card.num_classes, **args)
    import timm  # here, not at import: it is ~3 s of the app's cold start, and the model loads on first use

    return timm.create_model(card.architecture, pretrained=False, num_classes=card.num_classes, **args)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class WeightsError(ValueError):
    """Weights are missing, tampered with, or do not fit the card."""


def load_weights(card: ModelCard, weights_path: Path) -> torch.nn.Module:
    """Build the card's model and load ``weights_path`` after checking its sha256 against the card.

    Raises:
        WeightsError: the hash differs, or the tensors do not match the architecture strictly.
    """
    digest = sha256_file(weights_path)
    if digest != card.sha256:
        raise WeightsError(
            f"the weights of model {card.name!r} do not match the sha256 in its card "
            f"(expected {card.sha256[:12]}..., found {digest[:12]}...); refusing to load them"
        )
    model = create_model(card)
    state = load_file(str(weights_path), device="cpu")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"the weights of {card.name!r} do not fit {card.architecture}: {e}") from e
    model.eval()
    return model
