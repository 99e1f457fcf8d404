"""Model construction for training: any timm architecture with one input channel, or one of ours."""

from __future__ import annotations

import timm
import torch

from cxr_demo.small_cnn import LOCAL_ARCHITECTURES

# Families whose patch grid is fixed at construction: the input size must be passed to timm.
FIXED_SIZE_FAMILIES = ("swin", "vit", "deit", "beit", "test_vit")


def model_args_for(arch: str, input_size: int) -> dict:
    """The ``model_args`` a card needs to rebuild ``arch`` at ``input_size`` (beyond the class count)."""
    args: dict = {"in_chans": 1}
    if arch.startswith(FIXED_SIZE_FAMILIES) and input_size != 224:
        args["img_size"] = input_size
    return args


def create_training_model(arch: str, num_classes: int, drop_rate: float = 0.0, input_size: int = 224) -> torch.nn.Module:
    """An untrained model with one input channel; ``drop_rate`` is dropout before the classifier."""
    args = model_args_for(arch, input_size)
    if arch in LOCAL_ARCHITECTURES:
        return LOCAL_ARCHITECTURES[arch](num_classes=num_classes, drop_rate=drop_rate, **args)
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **args)
