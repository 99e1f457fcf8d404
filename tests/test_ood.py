"""The out-of-distribution check: maths, safe loading, and the warning it adds to /predict."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_demo.card import OODInfo, read_card, write_card
from cxr_demo.images import read_xray
from cxr_demo.inference import features_and_logits
from cxr_demo.models import WeightsError, load_weights, sha256_file
from cxr_demo.ood import OOD_FILE, OODDetector
from cxr_demo.service import OOD_WARNING, DemoService
from cxr_demo.zoo import DEFAULT_CHECKPOINTS, Zoo, ZooSource
from tests.helpers import make_checkpoint, synthetic_xray


def test_mahalanobis_flags_far_points():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(500, 20)) * np.linspace(1, 5, 20)
    det = OODDetector.fit(train, k=8)
    det.threshold = float(np.percentile(det.score(rng.normal(size=(200, 20)) * np.linspace(1, 5, 20)), 99))
    assert det.is_outlier(np.full((1, 20), 30.0))[0]
    assert det.is_outlier(rng.normal(size=(1000, 20)) * np.linspace(1, 5, 20)).mean() < 0.05


def test_features_and_logits_match_the_forward_pass(tmp_path):
    folder = make_checkpoint(tmp_path)
    card = read_card(folder)
    model = load_weights(card, folder / "model.safetensors")
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        _, logits = features_and_logits(model, x)
        assert torch.allclose(logits, model(x), atol=1e-5)


def _with_detector(tmp_path, threshold: float):
    folder = make_checkpoint(tmp_path)
    card = read_card(folder)
    model = load_weights(card, folder / "model.safetensors")
    with torch.inference_mode():
        feats, _ = features_and_logits(model, torch.randn(16, 1, 64, 64))
    det = OODDetector.fit(feats.numpy(), k=4)
    det.threshold = threshold
    det.save(folder / OOD_FILE)
    card.ood = OODInfo(file=OOD_FILE, sha256=sha256_file(folder / OOD_FILE), threshold=threshold, source_file="x")
    write_card(card, folder)
    img = tmp_path / "x.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(img)
    return folder, img


@pytest.mark.parametrize("threshold, warned", [(-1.0, True), (1e12, False)])
def test_predict_warns_when_the_detector_fires(tmp_path, threshold, warned):
    folder, img = _with_detector(tmp_path, threshold)
    doc = DemoService(Zoo(ZooSource(folder.parent))).predict(read_xray(img), "tiny", "f1").document
    assert (OOD_WARNING in doc["warnings"]) is warned


def test_tampered_ood_file_is_refused(tmp_path):
    folder, img = _with_detector(tmp_path, 1.0)
    (folder / OOD_FILE).write_bytes((folder / OOD_FILE).read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(WeightsError, match="sha256"):
        Zoo(ZooSource(folder.parent)).ood("tiny")


def test_committed_detectors_match_their_measurements():
    for folder in sorted(p.parent for p in DEFAULT_CHECKPOINTS.glob("*/config.json")):
        card = read_card(folder)
        if card.ood is None:
            continue
        assert sha256_file(folder / card.ood.file) == card.ood.sha256
        det = OODDetector.load(folder / card.ood.file)
        measured = json.loads((DEFAULT_CHECKPOINTS.parent / card.ood.source_file).read_text())
        assert det.threshold == pytest.approx(card.ood.threshold) == pytest.approx(measured["threshold"])
        assert measured["weights_sha256"] == card.sha256


def test_a_damaged_ood_file_costs_the_check_not_the_answer(tmp_path):
    """A damaged ood.safetensors broke /predict for its model (#14): now the answer comes with a warning."""
    from cxr_demo.service import OOD_UNAVAILABLE

    folder, img = _with_detector(tmp_path, 1.0)
    (folder / OOD_FILE).write_bytes(b"damaged")
    doc = DemoService(Zoo(ZooSource(folder.parent))).predict(read_xray(img), "tiny", "f1").document
    assert OOD_UNAVAILABLE in doc["warnings"] and len(doc["findings"]) == 14


def test_population_check_learns_another_population_and_round_trips(tmp_path):
    """A second, linear check tells the training films' population from another one (here a shifted cloud that the
    distance alone misses); it is saved and loaded with the detector and reported as its own kind."""
    from training.ood import fit_population_check

    rng = np.random.default_rng(1)
    scale = np.linspace(1, 5, 20)
    own = lambda n: rng.normal(size=(n, 20)) * scale  # noqa: E731
    other = lambda n: own(n) + np.r_[3.0, np.zeros(19)]  # noqa: E731  (inside the distance's 99th percentile)
    det = OODDetector.fit(own(600), k=8)
    det.threshold = float(np.percentile(det.score(own(300)), 99))
    assert det.is_outlier(other(500)).mean() < 0.2
    info = fit_population_check(det, own(600), own(300), other(600), other(200), 99.0)
    assert info["chosen_C"] in {r["C"] for r in info["grid"]}
    far, pop = det.outlier_kinds(other(500))
    assert pop.mean() > 0.6 and det.is_outlier(own(1000)).mean() < 0.05
    det.save(tmp_path / OOD_FILE)
    back = OODDetector.load(tmp_path / OOD_FILE)
    x = other(50)
    assert np.allclose(back.population_score(x), det.population_score(x))
    assert back.population_threshold == pytest.approx(det.population_threshold)


def test_predict_names_the_population_when_the_population_check_fires(tmp_path):
    from cxr_demo.service import OTHER_POPULATION

    folder, img = _with_detector(tmp_path, 1e12)
    det = OODDetector.load(folder / OOD_FILE)
    det.population_weights = np.zeros_like(det.mean)
    det.population_scale = np.ones_like(det.mean)
    det.population_bias, det.population_threshold = 1.0, 0.0  # fires on every film
    det.save(folder / OOD_FILE)
    card = read_card(folder)
    card.ood = OODInfo(file=OOD_FILE, sha256=sha256_file(folder / OOD_FILE), threshold=1e12, source_file="x")
    write_card(card, folder)
    doc = DemoService(Zoo(ZooSource(folder.parent))).predict(read_xray(img), "tiny", "f1").document
    assert OTHER_POPULATION.split("{")[0] in " ".join(doc["warnings"]) and OOD_WARNING not in doc["warnings"]
    assert doc["out_of_distribution"] == {"checked": True, "far_from_training_films": False, "other_population": True}


@pytest.mark.parametrize("name", sorted(p.parent.name for p in DEFAULT_CHECKPOINTS.glob("*/config.json")))
def test_every_model_has_its_out_of_distribution_numbers(name):
    card = read_card(DEFAULT_CHECKPOINTS / name)
    assert card.ood is not None, f"python -m training.ood checkpoints/{name}"
    doc = json.loads((DEFAULT_CHECKPOINTS.parent / card.ood.source_file).read_text())
    assert doc["weights_sha256"] == card.sha256
    own = doc["false_alarm_on_own_films"][f"{card.task} test"]
    assert own["n"] > 0 and 0 <= own["rate"] <= 1
    assert all(v["n"] > 0 for v in doc["catch_rate_on_other_populations_test_films"].values())
    assert set(doc["catch_rate_on_non_xray"]) and set(doc["catch_rate_on_transformed_own_test_films"])


def test_whole_film_check_of_a_cropped_model_sees_crop_and_film(tmp_path, monkeypatch):
    """For a model that sees a crop, a whole-film detector gets the crop's features followed by the uncropped
    film's, from one batch of two; the findings stay those of the crop alone. The flag survives save and load."""
    from cxr_demo.inference import prepare_pixels, preprocess

    folder, img = _with_detector(tmp_path, 1e12)
    card = read_card(folder)
    card.crop = (0.15, 0.90, 0.20, 0.80)
    model = load_weights(card, folder / "model.safetensors")
    xray = read_xray(img)
    crop_x = preprocess(xray.pixels, card)
    whole_x = (torch.from_numpy(prepare_pixels(xray.pixels, card.input_size)).float()[None, None] / 255 - 0.5) / 0.25
    with torch.inference_mode():
        f_crop, logits = features_and_logits(model, crop_x)
        f_whole, _ = features_and_logits(model, whole_x)
    expected = torch.cat([f_crop, f_whole], dim=1).numpy()
    det = OODDetector.fit(np.concatenate([expected, expected * 1.1, expected * 0.9]), k=2, whole_film=True)
    det.threshold = 1e12
    det.save(folder / OOD_FILE)
    assert OODDetector.load(folder / OOD_FILE).whole_film
    card.ood = OODInfo(file=OOD_FILE, sha256=sha256_file(folder / OOD_FILE), threshold=1e12, source_file="x")
    write_card(card, folder)
    seen = []
    real = OODDetector.outlier_kinds
    monkeypatch.setattr(OODDetector, "outlier_kinds", lambda self, f: (seen.append(f), real(self, f))[1])
    doc = DemoService(Zoo(ZooSource(folder.parent))).predict(xray, "tiny", "f1").document
    assert seen[0].shape == expected.shape and np.allclose(seen[0], expected, atol=1e-4)
    probs = torch.sigmoid(logits)[0].numpy()
    assert np.allclose([f["raw_probability"] if "raw_probability" in f else f["probability"] for f in doc["findings"]],
                       probs, atol=1e-4)
    assert doc["out_of_distribution"]["checked"] is True


def test_saved_detector_scores_like_the_fitted_one(tmp_path):
    """The PCA components are a transposed (column-major) view; saved as they lay in memory they came back
    scrambled, and the served distance check scored ~20x too low while training.ood measured the one in memory.
    Now they round-trip, and a file of the old layout is read back in its column order."""
    from safetensors.numpy import load_file, save_file

    from cxr_demo.ood import FORMAT_KEY

    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 50)) * np.linspace(1, 5, 50) + 3
    det = OODDetector.fit(train, k=8)
    det.threshold = 1.0
    det.save(tmp_path / OOD_FILE)
    back = OODDetector.load(tmp_path / OOD_FILE)
    assert np.allclose(back.score(train), det.score(train), rtol=1e-4)
    old = {k: v for k, v in load_file(str(tmp_path / OOD_FILE)).items() if k != FORMAT_KEY}
    old["components"] = np.ascontiguousarray(det.components.astype(np.float32).T).reshape(det.components.shape)
    save_file(old, str(tmp_path / "old.safetensors"))
    assert np.allclose(OODDetector.load(tmp_path / "old.safetensors").score(train), det.score(train), rtol=1e-4)


@pytest.mark.parametrize("name", sorted(p.parent.name for p in DEFAULT_CHECKPOINTS.glob("*/config.json")))
def test_committed_detectors_hold_orthonormal_components(name):
    """What the app loads is a PCA: orthonormal directions (a scrambled file is not)."""
    card = read_card(DEFAULT_CHECKPOINTS / name)
    if card.ood is None:
        pytest.skip("no detector")
    c = OODDetector.load(DEFAULT_CHECKPOINTS / name / card.ood.file).components
    assert np.allclose(c.T @ c, np.eye(c.shape[1]), atol=1e-4)


def test_check_can_read_another_models_features(tmp_path, monkeypatch):
    """ood.features_from: the check reads the named zoo model's features (its own preprocessing, whole film too),
    the findings stay this model's; a feature model whose weights changed since the check was fitted costs the
    check (a warning), not the answer; the two fields go together in a card."""
    from cxr_demo.inference import ood_features, preprocess
    from cxr_demo.service import OOD_UNAVAILABLE

    folder, img = _with_detector(tmp_path, 1e12)
    other = make_checkpoint(tmp_path, name="feature-model", seed=3, input_size=48)
    ocard = read_card(other)
    ocard.crop = (0.15, 0.90, 0.20, 0.80)
    write_card(ocard, other)
    omodel = load_weights(ocard, other / "model.safetensors")
    xray = read_xray(img)
    expected = ood_features(omodel, ocard, xray.pixels, whole_film=True).numpy()
    assert expected.shape == (1, 2 * omodel.num_features)
    det = OODDetector.fit(np.concatenate([expected, expected * 1.1, expected * 0.9]), k=2, whole_film=True)
    det.threshold = 1e12
    det.save(folder / OOD_FILE)
    card = read_card(folder)
    card.ood = OODInfo(file=OOD_FILE, sha256=sha256_file(folder / OOD_FILE), threshold=1e12, source_file="x",
                       features_from="feature-model", features_sha256=ocard.sha256)
    write_card(card, folder)
    seen = []
    real = OODDetector.outlier_kinds
    monkeypatch.setattr(OODDetector, "outlier_kinds", lambda self, f: (seen.append(f), real(self, f))[1])
    service = DemoService(Zoo(ZooSource(folder.parent)))
    doc = service.predict(xray, "tiny", "f1").document
    assert np.allclose(seen[0], expected, atol=1e-4) and doc["out_of_distribution"]["checked"] is True
    model = load_weights(card, folder / "model.safetensors")
    with torch.inference_mode():
        probs = torch.sigmoid(model(preprocess(xray.pixels, card)))[0].numpy()
    raw = [f.get("raw_probability", f["probability"]) for f in doc["findings"]]
    assert np.allclose(raw, probs, atol=1e-4)

    card.ood = OODInfo(file=OOD_FILE, sha256=sha256_file(folder / OOD_FILE), threshold=1e12, source_file="x",
                       features_from="feature-model", features_sha256="0" * 64)
    write_card(card, folder)
    doc = DemoService(Zoo(ZooSource(folder.parent))).predict(xray, "tiny", "f1").document
    assert OOD_UNAVAILABLE in doc["warnings"] and doc["out_of_distribution"]["checked"] is False
    assert len(doc["findings"]) == 14
    with pytest.raises(ValueError, match="go together"):
        OODInfo(file=OOD_FILE, sha256="0" * 64, threshold=1.0, source_file="x", features_from="feature-model")
    with pytest.raises(ValueError):
        OODInfo(file=OOD_FILE, sha256="0" * 64, threshold=1.0, source_file="x", features_from="../x",
                features_sha256="0" * 64)


def test_training_ood_fits_on_another_models_features(tmp_path, monkeypatch):
    """python -m training.ood FOLDER --features-from OTHER on a fake layout: the check is fitted on FOLDER's own
    training films through OTHER's network, the card pins OTHER's name and sha256, and a feature model of other
    training films is refused."""
    from tests.helpers import make_fake_kermany_covid, make_fake_nih
    from training.ood import fit_and_measure
    from training.train import main as train_main

    monkeypatch.setenv("CXR_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = make_fake_kermany_covid(make_fake_nih(tmp_path / "data"))
    common = ["--threads", "1", "--batch-size", "8", "--input-size", "48", "--data-root", str(data), "--arch",
              "test_efficientnet", "--init", "random", "--out", str(tmp_path / "ck"), "--no-eval", "--epochs", "1"]
    k3 = train_main([*common, "--task", "kermany3", "--name", "k3"])
    k2 = train_main([*common, "--task", "kermany2", "--name", "k2", "--crop", "lung"])
    nih = train_main([*common, "--task", "nih14", "--name", "n"])
    result = fit_and_measure(k3, data, limit=8, fit_per_population=12, k=4, whole_film=True, features_from=k2)
    card, k2card = read_card(k3), read_card(k2)
    assert card.ood.features_from == "k2" and card.ood.features_sha256 == k2card.sha256
    assert result["features_from"] == {"model": "k2", "weights_sha256": k2card.sha256} and result["whole_film"]
    assert "--features-from" in result["command"] and "of k2 (another model of the same training films)" in result["method"]
    det = OODDetector.load(k3 / OOD_FILE)
    assert det.whole_film and det.mean.shape[0] == 2 * load_weights(k2card, k2 / "model.safetensors").num_features
    doc = DemoService(Zoo(ZooSource(k3.parent))).predict(read_xray(next((data / "kermany" / "test").rglob("*.jpeg"))),
                                                       "k3", None).document
    assert doc["out_of_distribution"]["checked"] is True
    with pytest.raises(SystemExit, match="not this model's training films"):
        fit_and_measure(k3, data, limit=8, fit_per_population=12, k=4, features_from=nih)
