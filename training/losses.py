"""Training losses for multi-label (sigmoid) and multi-class (softmax) heads.

Every loss is written as a weighted sum of per-element terms whose weights depend only on the whole
(global) batch, so that under DDP each rank can take its share of the batch and the averaged gradient
equals the single-process one: ``loss(logits_part, y_part, y_global) * world_size``.
Labels that are NaN (an uncertain label under the ``ignore`` policy) are masked out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

MULTILABEL_LOSSES = ("bce", "wbce", "cabce", "focal")
MULTICLASS_LOSSES = ("ce", "wce", "focal")


def log_inverse_frequency(y: np.ndarray) -> torch.Tensor:
    """Per-label positive weights 1 + log(neg/pos) (log-scaled inverse frequency), from training labels."""
    y = np.nan_to_num(y, nan=0.0)
    pos = y.sum(0).clip(min=1)
    return torch.tensor(1 + np.log(np.maximum((len(y) - pos) / pos, 1.0)), dtype=torch.float32)


def multilabel_loss(kind: str, logits: torch.Tensor, y: torch.Tensor, y_global: torch.Tensor,
                    pos_weight: torch.Tensor | None = None, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """One of :data:`MULTILABEL_LOSSES` on a (part of a) batch.

    - ``bce``: binary cross-entropy averaged over labelled elements;
    - ``wbce``: BCE with ``pos_weight`` (log-scaled inverse frequency, see :func:`log_inverse_frequency`);
    - ``cabce``: class-averaged BCE: per finding, positives and negatives each carry half the weight
      (averaged within the global batch), then the findings are averaged;
    - ``focal``: sigmoid focal loss (Lin et al. 2017, torchvision's implementation), averaged.
    """
    mask = ~torch.isnan(y)
    y0 = torch.nan_to_num(y, nan=0.0)
    g_mask = ~torch.isnan(y_global)
    g0 = torch.nan_to_num(y_global, nan=0.0)
    if kind in ("bce", "wbce"):
        per = F.binary_cross_entropy_with_logits(logits, y0, pos_weight=pos_weight if kind == "wbce" else None,
                                                 reduction="none")
        return (per * mask).sum() / g_mask.sum().clamp(min=1)
    if kind == "cabce":
        per = F.binary_cross_entropy_with_logits(logits, y0, reduction="none")
        n_pos = ((g0 == 1) & g_mask).sum(0)
        n_neg = ((g0 == 0) & g_mask).sum(0)
        w_pos = torch.where(n_pos > 0, 0.5 / n_pos.clamp(min=1), 0.0)
        w_neg = torch.where(n_neg > 0, 0.5 / n_neg.clamp(min=1), 0.0)
        # A finding with only one class in the batch gives that class the whole weight.
        w_pos = torch.where(n_neg == 0, 2 * w_pos, w_pos)
        w_neg = torch.where(n_pos == 0, 2 * w_neg, w_neg)
        w = torch.where(y0 == 1, w_pos, w_neg) * mask
        return (per * w).sum() / y.shape[1]
    if kind == "focal":
        per = sigmoid_focal_loss(logits, y0, alpha=alpha, gamma=gamma, reduction="none")
        return (per * mask).sum() / g_mask.sum().clamp(min=1)
    raise ValueError(f"unknown multi-label loss {kind!r}; choose from {MULTILABEL_LOSSES}")


def multiclass_loss(kind: str, logits: torch.Tensor, y: torch.Tensor, y_global: torch.Tensor,
                    class_weight: torch.Tensor | None = None, gamma: float = 2.0) -> torch.Tensor:
    """One of :data:`MULTICLASS_LOSSES`; ``y`` is one-hot.

    - ``ce``: cross-entropy; ``wce``: cross-entropy with ``class_weight`` (normalised by the global
      batch's total weight, as ``F.cross_entropy`` does); ``focal``: softmax focal loss (1 - p_t)^gamma * CE.
    """
    target = y.argmax(1)
    logp = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    if kind == "ce":
        return -logp.sum() / len(y_global)
    if kind == "wce":
        if class_weight is None:
            raise ValueError("wce needs class weights")
        w = class_weight[target]
        return -(w * logp).sum() / class_weight[y_global.argmax(1)].sum()
    if kind == "focal":
        return -(((1 - logp.exp()) ** gamma) * logp).sum() / len(y_global)
    raise ValueError(f"unknown multi-class loss {kind!r}; choose from {MULTICLASS_LOSSES}")


def sample_weights(y: np.ndarray, task_kind: str) -> np.ndarray:
    """Per-image sampling weights that balance findings: multi-class, 1 / class frequency; multi-label,
    the mean of 1 / frequency over the image's positive findings (1 / frequency of "no finding" when
    it has none)."""
    y = np.nan_to_num(y, nan=0.0)
    if task_kind == "multiclass":
        freq = y.sum(0).clip(min=1)
        return (y / freq).sum(1)
    freq = y.sum(0).clip(min=1)
    none = (y.sum(1) == 0)
    w = np.where(none, 1.0 / max(int(none.sum()), 1), (y / freq).sum(1) / y.sum(1).clip(min=1))
    return w


def consistency_gap(logits: torch.Tensor, logits_jpeg: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """Mean squared difference between the logits of a batch of images and of their JPEG round trips.

    ``relative`` divides it by the batch's spread of the clean logits (per output, detached), so a model cannot
    meet it by keeping every logit small: scaling all logits by ``s`` leaves it unchanged (the plain gap scales by
    ``s**2``, and a calibration fitted afterwards stretches the logits, and the gap, back)."""
    gap = (logits - logits_jpeg).pow(2).mean()
    if not relative:
        return gap
    return gap / (logits.detach().var(0, unbiased=False).mean() + 1e-6)
