"""Ensembles served as one model: the members' probabilities averaged, their heatmaps averaged.

An ensemble is a checkpoint folder with a card and no weights of its own: its ``architecture`` is
:data:`ENSEMBLE_ARCHITECTURE` and ``model_args["members"]`` pins each member checkpoint by name and
weights sha256 (the card's own ``sha256`` is the digest of that list, see :func:`members_digest`).
Members share the card's labels, input size, crop and normalisation, so one preprocessed image feeds
them all. Its CAM target layer lists every member's layer; pytorch-grad-cam normalises each layer's map
and averages them.
"""

from __future__ import annotations

import hashlib
import json

import torch

from cxr_demo.card import ENSEMBLE_ARCHITECTURE

__all__ = ["ENSEMBLE_ARCHITECTURE", "ProbabilityEnsemble", "members_digest"]
_EPS = 1e-6


# What every member of an ensemble must share with it: the task, labels and how a film is read.
MEMBER_SHARED_FIELDS = ("task", "task_kind", "label_names", "input_size", "mean", "std", "crop")


def members_digest(members: list[dict]) -> str:
    """sha256 of the member pins (name and weights sha256, in order): an ensemble card's ``sha256``."""
    pins = [{"name": m["name"], "sha256": m["sha256"]} for m in members]
    return hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()


class ProbabilityEnsemble(torch.nn.Module):
    """Averages the members' probabilities; returns the logits of the averaged probabilities, so that
    ``sigmoid`` (multi-label) or ``softmax`` (multi-class) of the output is that average.

    It also offers timm's ``forward_features`` / ``forward_head`` / ``get_classifier`` so the
    out-of-distribution check and feature maps work on it: the features are the members' pooled
    features side by side.
    """

    def __init__(self, members: list[torch.nn.Module], task_kind: str) -> None:
        super().__init__()
        if task_kind not in ("multilabel", "multiclass"):
            raise ValueError(f"unknown task kind {task_kind!r}")
        self.members = torch.nn.ModuleList(members)
        self.task_kind = task_kind
        self._widths = [m.num_features for m in members]

    def combine(self, member_logits: list[torch.Tensor]) -> torch.Tensor:
        """Logits whose sigmoid / softmax is the mean of the members' probabilities."""
        if self.task_kind == "multilabel":
            p = torch.stack([torch.sigmoid(z.float()) for z in member_logits]).mean(0).clamp(_EPS, 1 - _EPS)
            return torch.log(p) - torch.log1p(-p)
        p = torch.stack([torch.softmax(z.float(), dim=-1) for z in member_logits]).mean(0).clamp_min(_EPS)
        return torch.log(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine([m(x) for m in self.members])

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [m.forward_features(x) for m in self.members]

    def forward_head(self, features: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        pooled = torch.cat([m.forward_head(f, pre_logits=True) for m, f in zip(self.members, features, strict=True)], 1)
        return pooled if pre_logits else self.classify(pooled)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Ensemble logits from the members' pooled features side by side."""
        parts = torch.split(pooled, self._widths, dim=1)
        return self.combine([m.get_classifier()(p) for m, p in zip(self.members, parts, strict=True)])

    def get_classifier(self):
        return self.classify
