"""Fit and measure a checkpoint's out-of-distribution check.

    python -m training.ood checkpoints/nih14-efficientnet-lite0

Fits on the model's training images, sets the threshold at the 99th percentile of its validation
images (both from the same patient split as training; no test image), then measures the false-alarm
rate on real chest X-rays (NIH official-test images, Kermany paediatric test, COVID-19 set) and the
catch rate on non-X-ray images (scikit-image's sample photographs and synthetic patterns). Writes
``ood.safetensors`` beside the weights, its sha256 into the card, and ``docs/ood/<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from cxr_demo import paths
from cxr_demo.card import OODInfo, read_card, write_card
from cxr_demo.images import resize_gray
from cxr_demo.inference import feature_array
from cxr_demo.models import sha256_file
from cxr_demo.ood import OOD_FILE, OODDetector
from cxr_demo.zoo import load_checkpoint
from training.data import Record, add_data_root_argument, cached_pixels, nih_records, patient_split

log = logging.getLogger(__name__)


def _features(model, card, pixels_uint8: np.ndarray) -> np.ndarray:
    return feature_array(model, pixels_uint8, card.mean, card.std)


def non_xray_images(size: int) -> dict[str, np.ndarray]:
    """Grayscale non-X-ray images: scikit-image's bundled photos and deterministic synthetic patterns."""
    rng = np.random.default_rng(0)
    out: dict[str, list[np.ndarray]] = {"photos": [], "synthetic": []}
    try:
        import skimage.data as d
        from skimage.color import rgb2gray, rgba2rgb

        for name in ["astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "text", "horse", "rocket",
                     "clock", "immunohistochemistry", "hubble_deep_field", "retina", "grass", "gravel", "brick", "cell",
                     "colorwheel", "logo", "checkerboard", "shepp_logan_phantom", "cat"]:
            im = getattr(d, name)().astype(np.float64)
            if im.ndim == 3 and im.shape[2] == 4:
                im = rgba2rgb(im / 255.0) * 255.0
            if im.ndim == 3:
                im = rgb2gray(im / 255.0)
            im = (im - im.min()) / max(im.max() - im.min(), 1e-9)
            out["photos"].append(resize_gray(im.astype(np.float32), size))
    except ImportError:
        log.warning("scikit-image not installed: no photographs in the OOD measurement")
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(40):
        kind = i % 5
        if kind == 0:
            im = rng.random((size, size))
        elif kind == 1:
            im = np.clip(xx * rng.random() + yy * rng.random(), 0, None)
        elif kind == 2:
            f = 2 + i
            im = (np.sin(2 * np.pi * f * xx) * np.sin(2 * np.pi * f * yy) > 0).astype(float)
        elif kind == 3:
            im = np.full((size, size), rng.random() * 0.5)
            im[rng.integers(0, size // 2) :, rng.integers(0, size // 2) :] += 0.5
        else:
            from scipy import ndimage

            im = ndimage.gaussian_filter(rng.random((size, size)), 3 + i % 7)
        im = (im - im.min()) / max(im.max() - im.min(), 1e-9)
        out["synthetic"].append(im.astype(np.float32))
    return {k: (np.clip(np.rint(np.stack(v) * 255), 0, 255).astype(np.uint8) if v else np.zeros((0, size, size), np.uint8))
            for k, v in out.items()}


def _folder_pixels(folder: Path, size: int) -> np.ndarray:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    recs = [Record(p, np.zeros(1, np.float32), p.name, "test") for p in paths]
    return cached_pixels(recs, size) if recs else np.zeros((0, size, size), np.uint8)


def fit_and_measure(folder: Path, data_root: Path | None = None, percentile: float = 99.0,
                    val_fraction: float = 0.15, seed: int = 0, k: int = 32) -> dict:
    data_root = Path(data_root) if data_root is not None else paths.data_root()
    card = read_card(folder)
    if card.task != "nih14":
        raise ValueError("only NIH models are handled so far")
    model = load_checkpoint(folder)
    recs = nih_records(data_root / "nih14", card.label_names)
    split = card.training.get("val_fraction", val_fraction)
    train, val = patient_split([r for r in recs if r.split == "train_val"], split, card.training.get("seed", seed))
    if "n_train" in card.training and len(train) != card.training["n_train"]:
        raise ValueError("could not reproduce the model's training split; pass the --val-fraction and seed it used")
    det = OODDetector.fit(_features(model, card, cached_pixels(train, card.input_size)), k=k)
    val_scores = det.score(_features(model, card, cached_pixels(val, card.input_size)))
    det.threshold = float(np.percentile(val_scores, percentile))
    det.save(folder / OOD_FILE)

    def rate(pixels: np.ndarray) -> dict:
        if len(pixels) == 0:
            return {"n": 0}
        flagged = det.is_outlier(_features(model, card, pixels))
        return {"n": int(len(pixels)), "flagged": int(flagged.sum()), "rate": float(flagged.mean())}

    test = [r for r in recs if r.split == "test"]
    others = non_xray_images(card.input_size)
    result = {
        "model": card.name, "weights_sha256": card.sha256,
        "method": f"squared Mahalanobis distance in the top-{det.components.shape[1]} PCA space of pooled penultimate "
                  f"features; fitted on {len(train)} training images, threshold = {percentile}th percentile of "
                  f"{len(val)} validation images",
        "threshold": det.threshold,
        "false_alarm_on_real_cxr": {
            "nih14_validation (threshold source)": rate(cached_pixels(val, card.input_size)),
            "nih14_official_test": rate(cached_pixels(test, card.input_size)),
            "kermany_test (paediatric)": rate(_folder_pixels(data_root / "kermany" / "test", card.input_size)),
            "covid19 (COVID + Normal)": rate(_folder_pixels(data_root / "covid19", card.input_size)),
        },
        "catch_rate_on_non_xray": {
            "scikit-image photographs and figures": rate(others["photos"]),
            "synthetic patterns (noise, gradients, stripes, blocks, blurred noise)": rate(others["synthetic"]),
        },
        "not_measured": "lateral chest views: none are available offline",
        "command": f"python -m training.ood {folder}",
    }
    card.ood = OODInfo(file=OOD_FILE, sha256=sha256_file(folder / OOD_FILE), threshold=det.threshold,
                       source_file=f"docs/ood/{card.name}.json")
    write_card(card, folder)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    add_data_root_argument(p)
    p.add_argument("--out", type=Path, default=paths.PROJECT_ROOT / "docs" / "ood")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in args.folders:
        result = fit_and_measure(folder, args.data_root)
        (args.out / f"{result['model']}.json").write_text(json.dumps(result, indent=1) + "\n")
        log.info("%s", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
