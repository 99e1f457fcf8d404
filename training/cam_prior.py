"""A training-side anatomical prior: penalise class activation outside the thorax (#12).

``training.train --cam-prior WEIGHT`` adds ``WEIGHT x`` the share of each positive finding's class activation map
(CAM) that lies outside the film's thorax region to the loss. The region is the one ``/explain``'s prior uses: the
lung model's mask (``cxr_demo.lungs``) closed over the mediastinum and dilated (``--cam-prior-shape``, default
``hull+0.05``, so heart and pleural findings still fit). For a network that pools its last feature map globally and
ends in one linear layer (the CNNs of the zoo), a finding's logit is the mean over positions of the CAM
``W_k . f(h, w)``; the penalty reads that map, with no extra forward or backward pass.

The masks are computed once per training film at the input size (cached like the decoded films) and move with the
film through the same augmentation. A film in which the lung model finds no lungs gets no penalty.

``python -m training.cam_prior CHECKPOINT`` measures, on the checkpoint's own validation films, the share of CAM
outside the thorax for every finding a film has (the quantity the penalty trains down), so a model trained without
it can be compared with one trained with it.

Measured (ablation ``nih14-lite0-a9-stembn-camprior``, README "Training-side help"): weight 1 takes the validation
share from 0.42 to 0.01 but the localisation study's boxes get worse, not better (report half 0.209 vs 0.224 mean
IoU with the inference-time prior), so no recipe of the zoo uses it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxr_demo.card import ModelCard, read_card
from cxr_demo.images import read_xray
from cxr_demo.lungs import PRIOR_SHAPES, LungSegmenter, default_segmenter, thorax_region, to_image_frame
from training.data import Record, cached_array

log = logging.getLogger(__name__)

DEFAULT_SHAPE = "hull+0.05"
EPS = 1e-6


class FeaturesAndLogits(torch.nn.Module):
    """A timm CNN that returns ``(logits, last feature map)`` in one pass (what the penalty reads). Wrap this, not
    the model, in DistributedDataParallel, so that the features' gradients are synchronised too."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        check_cam_model(model)
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats), feats


def check_cam_model(model: torch.nn.Module) -> None:
    """Refuse a model whose logits are not a linear read-out of a globally pooled feature map.

    Raises:
        SystemExit: the model has no ``forward_features``/``forward_head`` or its classifier is not linear.
    """
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")
            and isinstance(model.get_classifier(), torch.nn.Linear)):
        raise SystemExit("--cam-prior needs a CNN whose classifier is one linear layer over globally pooled features")


def class_maps(feats: torch.Tensor, classifier: torch.nn.Linear) -> torch.Tensor:
    """The class activation maps ``W_k . f(h, w)`` (without the bias), shape (B, K, h, w).

    Raises:
        ValueError: ``feats`` is not a (B, C, h, w) feature map (e.g. a vision transformer's tokens).
    """
    if feats.ndim != 4:
        raise ValueError(f"a CAM prior needs a (B, C, h, w) feature map, not shape {tuple(feats.shape)}")
    return torch.einsum("bchw,kc->bkhw", feats.float(), classifier.weight.float())


def outside_share(cams: torch.Tensor, regions: torch.Tensor, labels: torch.Tensor,
                  reduce: bool = True) -> torch.Tensor:
    """The share of each positive finding's positive CAM mass that lies outside its film's region.

    ``cams``: (B, K, h, w); ``regions``: (B, 1, H, W) in [0, 1] (1 = inside the thorax; pooled to the CAM's grid);
    ``labels``: (B, K), a finding counts when its label is >= 0.5 (soft labels too). Films whose region is empty
    (no lungs found) count for nothing. With ``reduce``, the mean over counted (film, finding) pairs (0 when there
    are none: the penalty then adds nothing); otherwise the (B, K) shares with NaN where a pair does not count.
    """
    inside = F.adaptive_avg_pool2d(regions.float(), cams.shape[-2:])  # share of each CAM cell inside the thorax
    mass = cams.clamp(min=0)
    total = mass.sum(dim=(2, 3))
    share = (mass * (1 - inside)).sum(dim=(2, 3)) / (total + EPS)
    counted = (labels >= 0.5) & (regions.flatten(1).amax(1) > 0)[:, None] & (total > EPS)
    if not reduce:
        return torch.where(counted, share, torch.full_like(share, float("nan")))
    if not counted.any():
        return share.sum() * 0.0  # keeps the graph (DDP needs every rank to reach backward)
    return share[counted].mean()


def lung_model() -> LungSegmenter:
    """The project's lung model, which draws the thorax.

    Raises:
        SystemExit: it is not there.
    """
    segmenter = default_segmenter()
    if segmenter is None:
        raise SystemExit("--cam-prior needs the lung model (checkpoints/lungseg-efficientnet-lite0)")
    return segmenter


def thorax_masks(records: list[Record], size: int, shape: str = DEFAULT_SHAPE,
                 segmenter: LungSegmenter | None = None, cache_dir: Path | None = None) -> np.ndarray:
    """The thorax region of every film at the model's input size, (N, size, size) uint8 in {0, 1}; all zero where
    the lung model found no lungs. Cached on disk by file list, size, shape and the lung model's weights.

    Raises:
        SystemExit: no lung model, or an unknown shape.
    """
    if shape not in PRIOR_SHAPES:
        raise SystemExit(f"--cam-prior-shape must be one of {PRIOR_SHAPES}")
    segmenter = segmenter or lung_model()

    def fill() -> np.ndarray:
        arr = np.zeros((len(records), size, size), dtype=np.uint8)
        missing = 0
        for i, r in enumerate(records):
            lungs = segmenter.segment(read_xray(r.path).pixels)
            if lungs.found():
                arr[i] = to_image_frame(thorax_region(lungs.mask, shape), size, size)
            else:
                missing += 1
        log.info("thorax masks (%s) for %d films; no lungs found in %d (no penalty there)", shape, len(records),
                 missing)
        return arr

    return cached_array(records, size, (size, shape, segmenter.card.sha256, "thorax"), fill, cache_dir)


def validation_outside_share(model: torch.nn.Module, x_val: np.ndarray, m_val: np.ndarray, y_val: np.ndarray,
                             mean: float, std: float, label_names: list[str],
                             batch_size: int = 32) -> dict[str, float | int | dict]:
    """The share of CAM outside the thorax on validation films, for each finding a film has: mean over all
    (film, finding) pairs and per finding, with the counts."""
    from cxr_demo.inference import normalise, unit_batch

    check_cam_model(model)
    was_training = model.training
    model.eval()
    shares = []
    with torch.inference_mode():
        for i in range(0, len(x_val), batch_size):
            x = normalise(unit_batch(x_val[i : i + batch_size]), mean, std)
            feats = model.forward_features(x)
            cams = class_maps(feats, model.get_classifier())
            regions = torch.from_numpy(m_val[i : i + batch_size, None].astype(np.float32))
            labels = torch.from_numpy(np.nan_to_num(y_val[i : i + batch_size], nan=0.0))
            shares.append(outside_share(cams, regions, labels, reduce=False).numpy())
    model.train(was_training)
    s = np.concatenate(shares)
    per = {name: (round(float(np.nanmean(s[:, j])), 4) if np.isfinite(s[:, j]).any() else None)
           for j, name in enumerate(label_names)}
    return {"mean": round(float(np.nanmean(s)), 4) if np.isfinite(s).any() else None,
            "pairs": int(np.isfinite(s).sum()), "per_finding": per}


def measure(folder: Path, shape: str = DEFAULT_SHAPE, data_root: Path | None = None) -> dict:
    """:func:`measure_loaded` of a checkpoint folder on its own validation films (re-made from its card)."""
    from cxr_demo.zoo import load_checkpoint
    from training.data import cached_pixels
    from training.robustness import validation_records

    card = read_card(folder)
    val = validation_records(card, data_root)
    return measure_loaded(card, load_checkpoint(folder), val, cached_pixels(val, card.input_size, card.crop), shape)


def measure_loaded(card: ModelCard, model: torch.nn.Module, val: list[Record], x_val: np.ndarray,
                   shape: str = DEFAULT_SHAPE) -> dict:
    """:func:`validation_outside_share` of a loaded model on its validation films ``val`` (decoded: ``x_val``).

    Raises:
        SystemExit: the model crops its input (its CAM is not in the film's frame) or is not a pooled CNN.
    """
    if card.crop is not None:
        raise SystemExit("a cropping model's CAM is not in the film's frame; not measured")
    m_val = thorax_masks(val, card.input_size, shape)
    y_val = np.stack([r.labels for r in val])
    return {"model": card.name, "sha256": card.sha256, "shape": shape, "split": "validation", "n_films": len(val),
            **validation_outside_share(model, x_val, m_val, y_val, card.mean, card.std, card.label_names)}


def main(argv: list[str] | None = None) -> dict:
    from training.data import add_data_root_argument

    p = argparse.ArgumentParser(description="Share of class activation outside the thorax on a checkpoint's "
                                            "validation films")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--shape", default=DEFAULT_SHAPE, choices=PRIOR_SHAPES)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    add_data_root_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = measure(args.checkpoint, args.shape, args.data_root)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
