"""Out-of-distribution check: is this image like the chest X-rays the model was trained on?

A model's pooled penultimate features are whitened with a PCA fitted on its training images; the
squared Mahalanobis distance in that space is the score, and the threshold is a high percentile of
the validation images' scores (fitted by ``python -m training.ood``). One forward pass gives both
the features and the logits (``cxr_demo.inference.features_and_logits``), so the check costs
nothing extra at predict time. A model that sees only a crop of the film (the paediatric lung crop) may check
the whole film too (:attr:`OODDetector.whole_film`): its features are then those of the crop followed by those
of the uncropped film, from one batch of two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

OOD_FILE = "ood.safetensors"
# Files without this tensor were written before 2026-11-28 by a save that handed safetensors the (d, k) PCA
# components in column-major memory (a transposed view) and so stored them in column order; :meth:`OODDetector.load`
# reads those as ``(k, d)`` and transposes them back. The distance check served from them was scrambled (scores ~20x
# too small, so it almost never fired) while training.ood measured the detector in memory.
FORMAT_KEY = "format_version"
FORMAT_VERSION = 2


@dataclass
class OODDetector:
    """PCA-whitened Mahalanobis distance to the training features, and optionally a linear population check.

    The population check is a logistic regression on the same standardised features that tells the model's own
    training films from films of other populations (e.g. children's films for an adult model); it has its own
    threshold. A film is an outlier when either score exceeds its threshold.
    """

    mean: np.ndarray  # (d,)
    components: np.ndarray  # (d, k)
    variances: np.ndarray  # (k,)
    threshold: float
    population_weights: np.ndarray | None = None  # (d,) on standardised features
    population_bias: float = 0.0
    population_scale: np.ndarray | None = None  # (d,) feature std of the training films
    population_threshold: float = float("inf")
    # features = [features of the model's input (its crop), features of the whole film at the same size]
    whole_film: bool = False

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` (n, d)."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.components
        return np.sum(z * z / self.variances, axis=1)

    def population_score(self, features: np.ndarray) -> np.ndarray:
        """The population check's logit (high: like another population's films); -inf without one."""
        f = np.asarray(features, np.float64)
        if self.population_weights is None:
            return np.full(len(f), -np.inf)
        return ((f - self.mean) / self.population_scale) @ self.population_weights + self.population_bias

    def outlier_kinds(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row: (far from the training films, like another population's films)."""
        return self.score(features) > self.threshold, self.population_score(features) > self.population_threshold

    def is_outlier(self, features: np.ndarray) -> np.ndarray:
        far, other = self.outlier_kinds(features)
        return far | other

    def save(self, path: Path) -> None:
        """Write the detector (every array C-contiguous: safetensors stores the memory as it lies)."""
        tensors = {FORMAT_KEY: np.array([FORMAT_VERSION], np.int8), "mean": self.mean.astype(np.float32),
                   "components": self.components.astype(np.float32), "variances": self.variances.astype(np.float32),
                   "threshold": np.array([self.threshold], np.float64),
                   "whole_film": np.array([int(self.whole_film)], np.int8)}
        if self.population_weights is not None:
            tensors.update({"population_weights": self.population_weights.astype(np.float64),
                            "population_scale": self.population_scale.astype(np.float64),
                            "population_bias_threshold": np.array([self.population_bias, self.population_threshold])})
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: Path) -> OODDetector:
        t = load_file(str(path))
        components = t["components"].astype(np.float64)
        if FORMAT_KEY not in t:  # an older file: the components were stored in column order (see FORMAT_KEY)
            components = components.reshape(components.shape[1], components.shape[0]).T
        det = cls(t["mean"].astype(np.float64), components, t["variances"].astype(np.float64),
                  float(t["threshold"][0]), whole_film=bool(t["whole_film"][0]) if "whole_film" in t else False)
        if "population_weights" in t:
            det.population_weights = t["population_weights"].astype(np.float64)
            det.population_scale = t["population_scale"].astype(np.float64)
            det.population_bias, det.population_threshold = (float(v) for v in t["population_bias_threshold"])
        return det

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 32, whole_film: bool = False) -> OODDetector:
        """Fit mean and the top-``k`` principal directions (threshold set later)."""
        f = np.asarray(features, np.float64)
        mean = f.mean(0)
        _, s, vt = np.linalg.svd(f - mean, full_matrices=False)
        k = min(k, len(s))
        variances = (s[:k] ** 2) / max(len(f) - 1, 1) + 1e-6
        return cls(mean, vt[:k].T, variances, float("inf"), whole_film=whole_film)


def measurement(card, root: Path) -> dict | None:
    """The model's committed out-of-distribution measurement (``training.ood``'s ``docs/ood/<model>.json`` under
    ``root``), when it belongs to these weights and has the per-population rates; else None."""
    path = Path(root) / card.ood.source_file if card.ood else None
    if path is None or not path.is_file():
        return None
    d = json.loads(path.read_text())
    if d.get("weights_sha256") != card.sha256 or "catch_rate_on_other_populations_test_films" not in d:
        return None
    return d


def rate_text(r: dict, style: str = "of") -> str:
    """A measured rate for people: ``12.5% of 400`` (``style="count"``: ``12.5% (50/400)``)."""
    return f"{100 * r['rate']:.1f}% " + (f"of {r['n']}" if style == "of" else f"({r['flagged']}/{r['n']})")
