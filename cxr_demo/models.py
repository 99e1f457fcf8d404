"""Building timm models from cards, and the per-family facts CAM needs."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from cxr_demo.card import ModelCard
from cxr_demo.small_cnn import LOCAL_ARCHITECTURES

log = logging.getLogger(__name__)

# CAM target layer per timm family (checked on timm 1.0.31 with in_chans=1). The first matching
# prefix of the architecture name wins. Transformers also need a reshape, see ``reshape_for``.
CAM_TARGET_LAYERS: dict[str, str] = {
    "resnet": "layer4.-1",
    "densenet": "features.-1",
    "efficientnet": "bn2",
    "tf_efficientnet": "bn2",
    "mobilenetv3": "blocks.-1",  # conv_head runs after global pooling in MobileNetV3
    "tf_mobilenetv3": "blocks.-1",
    "convnext": "stages.-1",
    "swin": "layers.-1.blocks.-1.norm1",
    "vit": "blocks.-1.norm1",
    "deit": "blocks.-1.norm1",
    "beit": "blocks.-1.norm1",
    "test_resnet": "layer4.-1",
    "test_efficientnet": "bn2",
    "test_vit": "blocks.-1.norm1",
    "test_convnext": "stages.-1",
    "cxr_small_cnn": "features.-1",
}


def default_cam_layer(architecture: str) -> str:
    """The CAM target layer for a timm architecture name (longest matching family prefix)."""
    matches = [k for k in CAM_TARGET_LAYERS if architecture.startswith(k)]
    if not matches:
        raise KeyError(
            f"no CAM target layer known for {architecture!r}; add its family to CAM_TARGET_LAYERS "
            "or set cam_target_layer in the card"
        )
    return CAM_TARGET_LAYERS[max(matches, key=len)]


def resolve_module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    """Find a sub-module by a dotted path in which integers index sequences (``layer4.-1``)."""
    module: torch.nn.Module = model
    for part in dotted.split("."):
        if part.lstrip("-").isdigit():
            index = int(part)
            module = module[index] if hasattr(module, "__getitem__") else list(module.children())[index]
        else:
            module = getattr(module, part)
    return module


def reshape_for(model: torch.nn.Module, architecture: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A reshape_transform for pytorch-grad-cam, for families whose activations are not (B,C,H,W)."""
    if architecture.startswith("swin"):
        # Swin block outputs are (B, H, W, C).
        return lambda t: t.permute(0, 3, 1, 2)
    if any(architecture.startswith(p) for p in ("vit", "deit", "beit", "test_vit")):
        n_prefix = getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size

        def _vit(t: torch.Tensor) -> torch.Tensor:
            t = t[:, n_prefix:, :]
            return t.reshape(t.shape[0], grid[0], grid[1], t.shape[2]).permute(0, 3, 1, 2)

        return _vit
    return None


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
