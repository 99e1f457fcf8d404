"""The seed study's small CNN baseline, trained from scratch (no timm equivalent)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Five conv-BN-ReLU blocks (stride-2 max-pool between them), global average pooling, dropout, linear.

    About 1.2M parameters at the default widths. ``features[-1]`` is the last conv block (the CAM layer).
    """

    def __init__(self, num_classes: int, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128, 192, 256),
                 drop_rate: float = 0.2) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        prev = in_chans
        for i, w in enumerate(widths):
            block = nn.Sequential(
                *([nn.MaxPool2d(2)] if i else []),
                nn.Conv2d(prev, w, 3, stride=2 if i == 0 else 1, padding=1, bias=False),
                nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            )
            blocks.append(block)
            prev = w
        self.features = nn.Sequential(*blocks)
        self.num_features = prev
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Architectures of ours, by card name; everything else is a timm model name.
LOCAL_ARCHITECTURES = {"cxr_small_cnn": SmallCNN}
