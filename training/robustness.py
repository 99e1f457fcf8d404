"""How much a checkpoint's probabilities move under changes of the pixels that a reader cannot see.

    python -m training.robustness checkpoints/nih14-efficientnet-lite0

Uses the model's own validation images (the patient split it was trained with; no test image):

- half-step noise: each image as the model sees it (8-bit) and again with uniform noise of +-0.5 of an 8-bit
  step added before normalisation, the size of the rounding the app once skipped;
- JPEG: each film as its 8-bit PNG and as a JPEG (quality 95) of the same pixels at the film's own size, both
  through the app's preprocessing (#13: the same film should get the same answer in either format).

Prints and returns the mean and maximum absolute change of any probability, and the share of operating-point
flags that change (noise), or per film the largest change of any probability (JPEG).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr_demo.calibration import calibrate
from cxr_demo.card import ModelCard, read_card
from cxr_demo.ensemble import MEMBER_SHARED_FIELDS
from cxr_demo.images import read_xray
from cxr_demo.inference import logits_to_probabilities, normalise, predict_array, prepare_pixels, unit_batch
from cxr_demo.zoo import load_checkpoint
from training.data import Record, add_data_root_argument, cached_pixels, patient_split, split_seed
from training.tasks import load_task

log = logging.getLogger(__name__)


def half_step_noise_change(model: torch.nn.Module, card: ModelCard, pixels: np.ndarray, seed: int = 0,
                           batch_size: int = 64) -> dict:
    """Probability change under uniform noise of +-0.5/255 on (N, S, S) uint8 images as the model sees them."""
    clean = predict_array(model, pixels, card.mean, card.std, card.task_kind, batch_size=batch_size)
    gen = torch.Generator().manual_seed(seed)
    noisy = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = unit_batch(pixels[i : i + batch_size])
            x = x + (torch.rand(x.shape, generator=gen) - 0.5) / 255.0
            noisy.append(logits_to_probabilities(model(normalise(x, card.mean, card.std)).float(), card.task_kind).numpy())
    delta = np.abs(np.concatenate(noisy) - clean)
    out = {"n_images": int(len(pixels)), "mean_abs_change": float(delta.mean()), "max_abs_change": float(delta.max()),
           "p99_abs_change": float(np.percentile(delta, 99))}
    if card.task_kind == "multilabel" and "f1" in card.thresholds:
        thr = np.array([card.threshold("f1", n) for n in card.label_names])
        out["f1_flags_changed"] = float(((clean >= thr) != (np.concatenate(noisy) >= thr)).mean())
    return out


def jpeg_round_trip(images: np.ndarray, quality: int | list[int] = 95) -> np.ndarray:
    """(N, H, W) or (H, W) uint8 images -> the same images encoded as baseline JPEG (Pillow, 4:2:0 is moot for
    one channel) at ``quality`` (one for all, or one per image) and decoded again."""
    batch = images[None] if images.ndim == 2 else images
    qualities = [quality] * len(batch) if isinstance(quality, int) else list(quality)
    out = np.empty_like(batch)
    for i, (im, q) in enumerate(zip(batch, qualities)):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=int(q))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("L"))
    return out[0] if images.ndim == 2 else out


def jpeg_change(model: torch.nn.Module, card: ModelCard, records: list[Record], quality: int = 95,
                batch_size: int = 32) -> dict:
    """Per film, the largest change of any probability between its 8-bit PNG pixels and a JPEG of them at the
    film's own size (as a user would save it), both prepared as the app prepares an upload: of the raw
    probabilities, and under ``calibrated`` of the ones the app shows when the card has a calibration."""
    png, jpg = [], []
    for r in records:
        film = read_xray(r.path).to_uint8()
        png.append(prepare_pixels(film / 255.0, card.input_size, card.crop))
        jpg.append(prepare_pixels(jpeg_round_trip(film, quality) / 255.0, card.input_size, card.crop))
    a = predict_array(model, np.stack(png), card.mean, card.std, card.task_kind, batch_size=batch_size)
    b = predict_array(model, np.stack(jpg), card.mean, card.std, card.task_kind, batch_size=batch_size)
    out = {"n_images": int(len(records)), "quality": quality, **_worst_per_film(a, b)}
    if card.calibration is not None:  # what the app shows: a steep calibration map enlarges the change again
        out["calibrated"] = _worst_per_film(calibrate(card, a), calibrate(card, b))
    return out


def _worst_per_film(a: np.ndarray, b: np.ndarray) -> dict:
    worst = np.abs(a - b).max(1)
    return {"mean_max_change": float(worst.mean()), "p95_max_change": float(np.percentile(worst, 95)),
            "max_change": float(worst.max()), "share_over_0_02": float((worst > 0.02).mean())}


def validation_records(card: ModelCard, data_root: Path | None = None) -> list[Record]:
    """The model's own validation images: its patient split of ``train_val``, re-made from the card.

    Raises:
        ValueError: the split does not come out at the size the card records (e.g. a ``--max-images`` run).
    """
    task = load_task(card.task, data_root)
    _, val = patient_split(task.train_val, card.training.get("val_fraction", 0.15), split_seed(card.training))
    if "n_val" in card.training and len(val) != card.training["n_val"]:
        raise ValueError(f"{card.name}: could not re-make its validation split ({len(val)} images, card says "
                         f"{card.training['n_val']})")
    return val


# The validation split's parameters and their training.train defaults (older cards omit val_fraction); the split's
# seed is compared through training.data.split_seed.
SPLIT = {"val_fraction": 0.15, "n_val": None}


def validation_predictions(folders: list[Path]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Validation labels and each member's validation probabilities (one shared patient split).

    Raises:
        ValueError: the members do not share preprocessing, labels or validation split.
    """
    cards = [read_card(f) for f in folders]
    for c in cards[1:]:
        diff = [k for k in MEMBER_SHARED_FIELDS if getattr(c, k) != getattr(cards[0], k)]
        diff += [k for k, d in SPLIT.items() if c.training.get(k, d) != cards[0].training.get(k, d)]
        diff += ["split seed"] if split_seed(c.training) != split_seed(cards[0].training) else []
        if diff:
            raise ValueError(f"{c.name} differs from {cards[0].name} in {', '.join(diff)}")
    val = validation_records(cards[0])
    pixels = cached_pixels(val, cards[0].input_size, cards[0].crop)
    y = np.stack([r.labels for r in val])
    probs = {c.name: predict_array(load_checkpoint(f), pixels, c.mean, c.std, c.task_kind) for c, f in zip(cards, folders)}
    return y, probs


def measure(folder: Path, data_root: Path | None = None) -> dict:
    card = read_card(folder)
    model = load_checkpoint(folder)
    val = validation_records(card, data_root)
    result = {"model": card.name, "weights_sha256": card.sha256,
              **half_step_noise_change(model, card, cached_pixels(val, card.input_size, card.crop)),
              "jpeg95": jpeg_change(model, card, val),
              "command": f"python -m training.robustness {folder}"}
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    add_data_root_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    results = [measure(folder, args.data_root) for folder in args.folders]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
