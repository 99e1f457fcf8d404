"""Building models from cards and loading their weights (sha256-checked, strict), as timm does."""

from __future__ import annotations

import copy
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


# a folded model gives the same outputs as the unfolded one up to float rounding (seen: <= 1.4e-5 on logits)
FOLD_TOLERANCE = 1e-4


def fold_batchnorm(model: torch.nn.Module, input_size: int, in_chans: int = 1) -> torch.nn.Module:
    """An inference copy of an eval-mode ``model`` with each BatchNorm folded into the convolution before it
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``; what ``torch.fx.experimental.optimization.fuse`` and
    TorchScript's freezing do): one weight and bias instead of a separate normalisation pass, 17% of the NIH
    ensemble's forward time on 2 cores. A pair is a Conv2d child followed by a ``BatchNorm2d`` or timm
    ``BatchNormAct2d`` sibling of matching width (the layout of timm's EfficientNets, MobileNets, ResNets,
    DenseNets and of the U-Net decoders); the norm's module stays, as its dropout and activation only, so every
    norm's output, which heatmaps read (``bn2``, ``features.-1``, ...), is unchanged.

    Registration order is not data flow, so the copy is checked: unless its output on a random input of the
    model's size matches the original's within :data:`FOLD_TOLERANCE`, the original is returned (logged)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        from timm.layers import BatchNormAct2d
        norms: tuple[type, ...] = (torch.nn.BatchNorm2d, BatchNormAct2d)
    except ImportError:  # pragma: no cover - timm is a core dependency
        norms = (torch.nn.BatchNorm2d,)
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (running statistics)")
    folded, pairs = copy.deepcopy(model), 0
    for parent in list(folded.modules()):
        kids = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(kids, kids[1:], strict=False):
            if not (isinstance(conv, torch.nn.Conv2d) and type(norm) in norms and norm.running_mean is not None
                    and conv.out_channels == norm.num_features):
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
            rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            setattr(parent, norm_name, torch.nn.Sequential(*rest) if rest else torch.nn.Identity())
            pairs += 1
    if not pairs:
        return model
    x = torch.rand(1, in_chans, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = model(x), folded(x)
    if not torch.allclose(got, want, rtol=FOLD_TOLERANCE, atol=FOLD_TOLERANCE):
        log.warning("folding BatchNorm changed %s's output by %.2g; serving it unfolded", type(model).__name__,
                    float((got - want).abs().max()))
        return model
    return folded.eval()


def for_inference(model: torch.nn.Module, input_size: int) -> torch.nn.Module:
    """How the app serves an eval-mode model: BatchNorm folded (:func:`fold_batchnorm`) and NHWC convolutions (as
    timm's --channels-last), which oneDNN runs much faster for the EfficientNets' depthwise convolutions (the NIH
    ensemble's forward on 2 cores 117 -> 54 ms, the lung model's 2-view batch 62 -> 29 ms)."""
    return fold_batchnorm(model, input_size).to(memory_format=torch.channels_last)
