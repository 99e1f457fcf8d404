"""Post-hoc calibration: the metrics, the fit, the card field, what /predict shows, and the committed studies."""

import json

import numpy as np
import pytest

from cxr_demo import calibration as cal
from cxr_demo.card import Calibration, CardError, read_card, write_card
from cxr_demo.inference import findings_table
from cxr_demo.paths import PROJECT_ROOT
from cxr_demo.zoo import DEFAULT_CHECKPOINTS, Zoo, ZooSource
from training import calibration as study

CHECKPOINTS = PROJECT_ROOT / "checkpoints"
MODELS = sorted(p.parent.name for p in CHECKPOINTS.glob("*/config.json"))


def test_ece_by_hand():
    # bin [0.1, 0.2): p 0.1, 0.1 outcomes 0, 1 -> |0.5 - 0.1| = 0.4 for 2 of 4 films;
    # bin [0.9, 1.0]: p 0.9, 1.0 outcomes 1, 1 -> |1 - 0.95| = 0.05 for 2 of 4 films
    y = np.array([0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.9, 1.0])
    assert study.ece(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.05)
    assert study.ece(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0
    rows = study.reliability(y, p)
    assert [r["n"] for r in rows] == [2, 2] and rows[1]["bin"] == [0.9, 1.0]


def test_platt_fit_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.01, 0.99, 20000)
    truth = cal.platt(raw, 0.5, -1.0)  # the real chance behind each raw probability
    y = (rng.uniform(size=raw.size) < truth).astype(float)
    a, b = study._fit_binary(y, raw, offset=True)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.08)
    assert study.ece(y, cal.platt(raw, a, b)) < 0.015 < study.ece(y, raw)


def test_calibration_keeps_every_flag_and_the_ranking(tmp_path):
    card = read_card(CHECKPOINTS / "nih14-efficientnet-lite0")
    card.calibration = Calibration(method="platt", params={lab: (0.4 + 0.1 * j, -1.5 + 0.2 * j)
                                                           for j, lab in enumerate(card.label_names)},
                                   fitted_on="test", source_file="-")
    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 1, (50, card.num_classes))
    shown = cal.calibrate(card, probs)
    assert np.all(np.argsort(shown, axis=0) == np.argsort(probs, axis=0))
    for p in probs:
        rows = findings_table(card, p, "f1")
        for r, raw in zip(rows, p, strict=True):
            assert r["raw_probability"] == pytest.approx(raw)
            assert r["positive"] == (raw >= r["raw_threshold"]) == (r["probability"] >= r["threshold"] - 1e-12)
            assert r["probability"] != pytest.approx(raw)


def test_card_refuses_a_calibration_that_could_reorder_films(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    card = read_card(CHECKPOINTS / "nih14-efficientnet-lite0")
    params = {lab: (1.0, 0.0) for lab in card.label_names}
    for bad in ({**params, card.label_names[0]: (-0.5, 0.0)}, {**params, card.label_names[0]: (0.0, 0.0)},
                {k: v for k, v in list(params.items())[1:]}, {**params, card.label_names[0]: (float("nan"), 0.0)}):
        data = json.loads((CHECKPOINTS / "nih14-efficientnet-lite0" / "config.json").read_text())
        data["calibration"] = {"method": "platt", "params": bad, "fitted_on": "x", "source_file": "x"}
        (folder / "config.json").write_text(json.dumps(data))
        with pytest.raises(CardError):
            read_card(folder)
    card.calibration = Calibration(method="platt", params=params, fitted_on="x", source_file="x")
    write_card(card, folder)
    assert read_card(folder).calibration.params == card.calibration.params


def test_study_chooses_a_monotone_map_out_of_fold():
    """On validation-like data miscalibrated by a known map, the study picks Platt and its out-of-fold ECE is
    low; isotonic is measured, never chosen."""
    card = read_card(CHECKPOINTS / "nih14-efficientnet-lite0")
    rng = np.random.default_rng(2)
    n, k = 600, card.num_classes
    raw = rng.uniform(0.02, 0.98, (n, k))
    y = (rng.uniform(size=(n, k)) < cal.platt(raw, 0.6, -2.0)).astype(float)
    groups = np.repeat(np.arange(n // 2), 2)
    doc, c = study.study(card, y, raw, groups, folds=5)
    assert doc["chosen"] == "platt" and c.method == "platt" and "isotonic" in doc["candidates"]
    after, before = doc["out_of_fold"]["after"], doc["out_of_fold"]["before"]
    assert after["ece_pooled"] < 0.03 < before["ece_pooled"]


@pytest.mark.parametrize("name", [m for m in MODELS if not m.startswith("lungseg")])
def test_every_committed_model_is_calibrated_on_validation_with_its_numbers(name):
    card = read_card(CHECKPOINTS / name)
    assert card.calibration is not None, f"python -m training.calibration checkpoints/{name}"
    doc = json.loads((PROJECT_ROOT / card.calibration.source_file).read_text())
    assert doc["weights_sha256"] == card.sha256 and doc["chosen"] == card.calibration.method
    assert "validation" in card.calibration.fitted_on and "test" not in card.calibration.fitted_on.replace(
        "none from the test list", "")
    assert {k: tuple(v) for k, v in doc["parameters"].items()} == card.calibration.params
    ev = json.loads((CHECKPOINTS / name / "eval.json").read_text())
    assert ev["calibration"]["method"] == card.calibration.method
    assert {"test_before", "test_after", "validation_out_of_fold"} <= set(ev["calibration"])
    assert (CHECKPOINTS / name / "reliability.png").is_file()


def test_predict_shows_calibrated_probabilities_and_keeps_the_raw_ones():
    from cxr_demo.images import XRay
    from cxr_demo.service import DemoService

    zoo = Zoo(ZooSource(DEFAULT_CHECKPOINTS))
    service = DemoService(zoo, lungs=None)
    rng = np.random.default_rng(3)
    xray = XRay(pixels=rng.uniform(0, 1, (256, 256)).astype(np.float32), source_format="PNG", name="noise.png")
    for name in ("nih14-efficientnet-lite0", "kermany2-efficientnet-lite0"):
        doc = service.predict(xray, name).document
        card = zoo.cards[name]
        raw = np.array([r["raw_probability"] for r in doc["findings"]])
        assert np.allclose([r["probability"] for r in doc["findings"]], cal.calibrate(card, raw), atol=1e-6)
        assert doc["calibration"]["method"] == card.calibration.method and doc["calibration_text"]
        if card.task_kind == "multiclass":
            assert all(r["threshold"] is None and r["threshold_note"] for r in doc["findings"])
