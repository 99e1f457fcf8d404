"""Fit and measure a checkpoint's out-of-distribution check.

    python -m training.ood checkpoints/nih14-efficientnet-lite0

Works for every task's models. Fits on the model's training images, sets the threshold at the 99th
percentile of its validation images (both from the same patient split as training; no test image), then
measures the false-alarm rate on the model's own test films and the catch rate on films of the other
tasks' populations (NIH adults, Kermany children, the COVID-19 collection), on non-X-ray images
(scikit-image's sample photographs and synthetic patterns) and on its own test films inverted or rotated. Writes
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
from cxr_demo.inference import feature_array, prepare_pixels
from cxr_demo.models import sha256_file
from cxr_demo.ood import OOD_FILE, OODDetector
from cxr_demo.zoo import load_checkpoint
from training.data import Record, add_data_root_argument, cached_pixels, patient_split, split_seed
from training.tasks import load_task

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


# Where a film comes from, whatever task uses it. The COVID-19 collection's 'Normal' films are mostly NIH films
# (RSNA challenge copies) and its viral pneumonias are Kermany's, so they are populations of their own here.
POPULATION_TEXT = {
    "nih": "NIH ChestX-ray14 films (adults)",
    "kermany": "Kermany paediatric films (children aged 1-5)",
    "kermany-nonviral": "Kermany paediatric films, normal and bacterial (children aged 1-5)",
    "covid": "COVID-19 collection, COVID-19 films (adults)",
    "covid-normal": "COVID-19 collection, 'Normal' films (mostly NIH copies)",
}
# The populations that a model of each task has never seen: its population check learns to tell them from its
# own training films (on their non-test films) and is measured on their test films.
OTHER_POPULATIONS = {
    "nih14": ("kermany", "covid"),
    "kermany2": ("nih", "covid", "covid-normal"),
    "kermany3": ("nih", "covid", "covid-normal"),
    "covid3": ("nih", "kermany-nonviral"),
}
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)


def population_records(name: str, data_root: Path) -> list[Record]:
    """The films of one population with their split (``train_val`` / ``test``)."""
    if name == "nih":
        return load_task("nih14", data_root).records
    if name in ("kermany", "kermany-nonviral"):
        recs = load_task("kermany3", data_root).records
        return recs if name == "kermany" else [r for r in recs if not r.labels[2]]
    recs = load_task("covid3", data_root).records
    cls = 0 if name == "covid" else 1  # COVID-19, Normal (viral pneumonias are Kermany films)
    return [r for r in recs if r.labels[cls] and r.patient.startswith("covid:")]


def transformed(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The model's own test films turned into what a careless upload looks like: inverted, rotated."""
    return {"inverted (negative) films": 255 - pixels, "rotated 90 degrees": np.rot90(pixels, 1, axes=(1, 2)).copy(),
            "rotated 180 degrees (upside down)": pixels[:, ::-1, ::-1].copy()}


def _spread_indices(length: int, n: int) -> np.ndarray:
    """At most ``n`` indices evenly spread over ``range(length)``."""
    return np.arange(length) if length <= n else np.linspace(0, length - 1, n).round().astype(int)


def _spread(items: list, n: int) -> list:
    """At most ``n`` items, evenly spread over the (sorted) list."""
    return [items[i] for i in _spread_indices(len(items), n)]


def fit_population_check(det: OODDetector, own_train: np.ndarray, own_val: np.ndarray, other_fit: np.ndarray,
                         other_select: np.ndarray, percentile: float) -> dict:
    """A logistic regression on standardised features: own training films (0) against other populations' films
    (1), classes weighted equally. Its L2 strength is chosen on held-out films (other populations' validation part
    caught at the threshold that passes ``percentile`` % of the own validation films); no test film is used."""
    from sklearn.linear_model import LogisticRegression

    scale = own_train.std(0) + 1e-6
    z = lambda f: (f - det.mean) / scale  # noqa: E731
    x = np.concatenate([z(own_train), z(other_fit)])
    y = np.r_[np.zeros(len(own_train)), np.ones(len(other_fit))]
    rows = []
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(x, y)
        thr = float(np.percentile(clf.decision_function(z(own_val)), percentile))
        rows.append({"C": c, "held_out_catch_rate": float((clf.decision_function(z(other_select)) > thr).mean()),
                     "threshold": thr, "clf": clf})
    best = max(rows, key=lambda r: (r["held_out_catch_rate"], -r["C"]))
    det.population_weights = best["clf"].coef_[0].astype(np.float64)
    det.population_bias = float(best["clf"].intercept_[0])
    det.population_scale = scale
    det.population_threshold = best["threshold"]
    return {"chosen_C": best["C"], "grid": [{k: v for k, v in r.items() if k != "clf"} for r in rows]}


def check_same_films(fcard, train: list[Record], val: list[Record], data_root: Path) -> None:
    """Refuse a feature model whose training films are not this model's training films (by file), or that
    trained on any of this model's validation films."""
    ftask = load_task(fcard.task, data_root)
    ftrain, fval = patient_split(ftask.train_val, fcard.training.get("val_fraction", 0.15), split_seed(fcard.training))
    seen = {r.path for r in ftrain}
    if seen != {r.path for r in train} or seen & {r.path for r in val}:
        raise SystemExit(f"--features-from {fcard.name}: its training films are not this model's training films")


def fit_and_measure(folder: Path, data_root: Path | None = None, percentile: float = 99.0,
                    val_fraction: float = 0.15, seed: int = 0, k: int = 32, limit: int = 400,
                    fit_per_population: int = 600, whole_film: bool = False, features_from: Path | None = None) -> dict:
    """Fit the check on the model's training films, set its thresholds on its validation films, measure it.

    Two parts on the model's pooled penultimate features: a Mahalanobis distance (far from the training films)
    and a population check (like another population's films), each with a threshold that passes ``percentile`` %
    of the model's own validation films. False alarms: the model's own test films. Catches: other populations'
    test films (``limit`` at most per population, the NIH test list whole), photographs and synthetic patterns,
    and the model's own test films inverted or rotated (``limit`` of them).

    ``whole_film`` (a model that sees a crop only): the features are those of the crop followed by those of the
    uncropped film (:attr:`OODDetector.whole_film`), so the check sees what the crop leaves out (a child's whole
    chest, an adult's shoulders). Whether it helps is model by model: compare the population check's held-out
    catch rate (non-test films) of both runs and keep the better.

    ``features_from`` (a checkpoint folder of the same zoo): the check reads that model's features instead of this
    model's own, fitted and thresholded on *this* model's training and validation films as always. For a model
    whose own features tell its population from others poorly, when another model of the same training films
    tells them better; it must have been trained on the same train/validation split (so that this model's
    validation films, which set the thresholds, are unseen by it too)."""
    data_root = Path(data_root) if data_root is not None else paths.data_root()
    card = read_card(folder)
    task = load_task(card.task, data_root)
    split = card.training.get("val_fraction", val_fraction)
    train, val = patient_split(task.train_val, split, split_seed({"seed": seed, **card.training}))
    if "n_train" in card.training and len(train) != card.training["n_train"] - card.training.get("n_train_64px", 0) - card.training.get("n_train_pseudo", 0):
        raise ValueError("could not reproduce the model's training split; pass the --val-fraction and seed it used")
    fcard = read_card(features_from) if features_from is not None else card
    if features_from is not None:
        check_same_films(fcard, train, val, data_root)
    model = load_checkpoint(features_from if features_from is not None else folder)
    size, crop = fcard.input_size, fcard.crop
    whole_film = whole_film and crop is not None

    def f(px: np.ndarray, films: np.ndarray | None = None) -> np.ndarray:
        """Features of model inputs ``px``; with the whole-film check, followed by those of ``films`` (the
        same films uncropped; ``px`` itself when they are not films, e.g. photographs)."""
        out = _features(model, fcard, px)
        if whole_film:
            out = np.concatenate([out, _features(model, fcard, px if films is None else films)], axis=1)
        return out

    feats = lambda recs: f(cached_pixels(recs, size, crop), cached_pixels(recs, size) if whole_film else None)  # noqa: E731
    own_train, own_val = feats(train), feats(val)
    det = OODDetector.fit(own_train, k=k, whole_film=whole_film)
    det.threshold = float(np.percentile(det.score(own_val), percentile))

    others = OTHER_POPULATIONS[card.task]
    fit_parts, select_parts, test_recs = [], [], {}
    for name in others:
        recs = population_records(name, data_root)
        fit_recs, select_recs = patient_split([r for r in recs if r.split == "train_val"], 0.25, seed)
        fit_parts.append(feats(_spread(fit_recs, fit_per_population)))
        select_parts.append(feats(_spread(select_recs, fit_per_population // 3)))
        test_recs[name] = [r for r in recs if r.split == "test"]
    population = fit_population_check(det, own_train, own_val, np.concatenate(fit_parts), np.concatenate(select_parts),
                                      percentile)
    det.save(folder / OOD_FILE)
    det = OODDetector.load(folder / OOD_FILE)  # measure exactly what the app will load

    def rate(features: np.ndarray) -> dict:
        if len(features) == 0:
            return {"n": 0}
        far, other = det.outlier_kinds(features)
        return {"n": int(len(features)), "flagged": int((far | other).sum()), "rate": float((far | other).mean()),
                "by_distance": int(far.sum()), "by_population_check": int(other.sum())}

    test_pixels = cached_pixels(task.test, size, crop)
    test_films = cached_pixels(task.test, size) if whole_film else test_pixels
    sample = _spread_indices(len(test_pixels), limit)
    non_xray = non_xray_images(size)
    # a careless upload, then what this model sees of it (its crop; without one, the film as it is)
    seen = lambda films: films if crop is None else np.stack([prepare_pixels(im / 255.0, size, crop) for im in films])  # noqa: E731
    careless = {name: (seen(films), films) for name, films in transformed(test_films[sample]).items()}
    result = {
        "model": card.name, "weights_sha256": card.sha256, "task": card.task,
        "whole_film": whole_film,
        "features_from": None if features_from is None else {"model": fcard.name, "weights_sha256": fcard.sha256},
        "method": ("two checks on pooled penultimate features" + (
            f" of {fcard.name} (another model of the same training films)" if features_from is not None else "") + (
            " of the model's lung crop and of the whole film (one batch of two)" if whole_film else "")
            + f", each passing {percentile}% of the {len(val)} validation "
            f"films: squared Mahalanobis distance in the top-{det.components.shape[1]} PCA space of the {len(train)} "
            "training films, and a logistic regression telling the training films from other populations' "
            f"non-test films ({', '.join(POPULATION_TEXT[n] for n in others)}; L2 strength chosen on held-out "
            "non-test films of those populations)"),
        "threshold": det.threshold,
        "population_threshold": det.population_threshold,
        "population_check": population,
        "false_alarm_on_own_films": {
            f"{card.task} validation (threshold source)": rate(own_val),
            f"{card.task} test": rate(f(test_pixels, test_films)),
        },
        "catch_rate_on_other_populations_test_films": {
            POPULATION_TEXT[name]: rate(feats(recs if name == "nih" else _spread(recs, limit)))
            for name, recs in test_recs.items()
        },
        "catch_rate_on_non_xray": {
            "scikit-image photographs and figures": rate(f(non_xray["photos"])),
            "synthetic patterns (noise, gradients, stripes, blocks, blurred noise)": rate(f(non_xray["synthetic"])),
        },
        "catch_rate_on_transformed_own_test_films": {name: rate(f(px, films)) for name, (px, films) in careless.items()},
        "not_measured": "lateral chest views: none are available offline",
        "command": f"python -m training.ood {folder}" + (" --whole-film" if whole_film else "")
                   + (f" --features-from {features_from}" if features_from is not None else ""),
    }
    if card.task == "covid3":
        result["note"] = (f"{card.name}'s 'Normal' class is mostly NIH films (RSNA challenge copies, "
                          "resized to 224 px JPEG), so NIH films are its own training population: neither check can "
                          "tell them apart, and an adult NIH film reaches this model without a warning.")
    card.ood = OODInfo(file=OOD_FILE, sha256=sha256_file(folder / OOD_FILE), threshold=det.threshold,
                       source_file=f"docs/ood/{card.name}.json",
                       features_from=None if features_from is None else fcard.name,
                       features_sha256=None if features_from is None else fcard.sha256)
    write_card(card, folder)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+")
    add_data_root_argument(p)
    p.add_argument("--out", type=Path, default=paths.PROJECT_ROOT / "docs" / "ood")
    p.add_argument("--whole-film", action="store_true",
                   help="for a model that sees a crop: also check the whole film's features (keep it where the "
                        "population check's held-out catch rate says it helps)")
    p.add_argument("--features-from", type=Path, default=None,
                   help="a checkpoint folder of a model trained on the same films whose features the check reads "
                        "(one more forward pass per request; keep it where it catches more)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in args.folders:
        result = fit_and_measure(folder, args.data_root, whole_film=args.whole_film, features_from=args.features_from)
        (args.out / f"{result['model']}.json").write_text(json.dumps(result, indent=1) + "\n")
        log.info("%s", json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
