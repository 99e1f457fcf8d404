"""Out-of-distribution check: is this image like the chest X-rays the model was trained on?

A model's pooled penultimate features are whitened with a PCA fitted on its training images; the
squared Mahalanobis distance in that space is the score, and the threshold is a high percentile of
the validation images' scores (fitted by ``python -m training.ood``). One forward pass gives both
the features and the logits (``cxr_demo.inference.features_and_logits``), so the check costs
nothing extra at predict time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

OOD_FILE = "ood.safetensors"


@dataclass
class OODDetector:
    """PCA-whitened Mahalanobis distance to the training features."""

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (d, k)
    variances: np.ndarray  # (k,)
    threshold: float

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` (n, d)."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.components
        return np.sum(z * z / self.variances, axis=1)

    def is_outlier(self, features: np.ndarray) -> np.ndarray:
        return self.score(features) > self.threshold

    def save(self, path: Path) -> None:
        save_file({"mean": self.mean.astype(np.float32), "components": self.components.astype(np.float32),
                   "variances": self.variances.astype(np.float32),
                   "threshold": np.array([self.threshold], np.float64)}, str(path))

    @classmethod
    def load(cls, path: Path) -> OODDetector:
        t = load_file(str(path))
        return cls(t["mean"].astype(np.float64), t["components"].astype(np.float64), t["variances"].astype(np.float64),
                   float(t["threshold"][0]))

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 32) -> OODDetector:
        """Fit mean and the top-``k`` principal directions (threshold set later)."""
        f = np.asarray(features, np.float64)
        mean = f.mean(0)
        _, s, vt = np.linalg.svd(f - mean, full_matrices=False)
        k = min(k, len(s))
        variances = (s[:k] ** 2) / max(len(f) - 1, 1) + 1e-6
        return cls(mean, vt[:k].T, variances, float("inf"))

