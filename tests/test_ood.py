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
