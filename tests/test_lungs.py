"""The lung-field model and the anatomical prior: shapes on known masks, safe loading, /explain with the prior,
the lung outline, and the lung model's training on a fake lungseg layout."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cxr_demo.card import CardError, ChoiceError
from cxr_demo.images import XRay
from cxr_demo.lungs import (
    LUNG_CARD_FILE,
    LungResult,
    LungSegmenter,
    apply_prior,
    clean_mask,
    lung_contrast,
    read_lung_card,
    thorax_region,
)
from cxr_demo.models import WeightsError
from cxr_demo.overlay import OUTLINE_COLOUR
from cxr_demo.service import NO_LUNGS, DemoService
from cxr_demo.zoo import Zoo, ZooSource
from tests.helpers import FixedLungs, make_checkpoint, make_lung_checkpoint, synthetic_xray, two_lungs


def test_hull_closes_the_mediastinum_and_dilation_widens():
    lungs = two_lungs(64)
    assert not lungs[30, 32]  # the gap between the lungs
    hull = thorax_region(lungs, "hull")
    assert hull[30, 32] and hull.sum() > lungs.sum() and not hull[2, 32] and not hull[60, 32]
    assert (thorax_region(lungs, "lungs") == lungs).all()
    wide = thorax_region(lungs, "lungs+0.1")
    assert wide.sum() > lungs.sum() and (wide | lungs).sum() == wide.sum()  # contains the lungs
    assert thorax_region(lungs, "hull+0.05").sum() > hull.sum()
    assert not thorax_region(np.zeros((8, 8), bool), "hull+0.1").any()
    with pytest.raises(ValueError):
        thorax_region(lungs, "../etc")


def test_clean_mask_keeps_two_largest_regions_and_fills_holes():
    m = two_lungs(64)
    m[40, 30] = False  # not a hole: at the edge? make a real hole inside a lung
    m[30, 14] = False
    m[1, 1] = True  # a speck
    out = clean_mask(m)
    assert not out[1, 1] and out[30, 14]


def test_apply_prior_zeroes_outside_and_rescales():
    heat = np.zeros((10, 10), np.float32)
    heat[0, 0], heat[5, 5] = 1.0, 0.4
    region = np.zeros((10, 10), bool)
    region[3:8, 3:8] = True
    out = apply_prior(heat, region)
    assert out[0, 0] == 0 and out[5, 5] == pytest.approx(1.0) and out.max() == pytest.approx(1.0)
    assert not apply_prior(heat, np.zeros_like(region)).any()


def test_lung_model_loads_and_refuses_a_wrong_hash(tmp_path):
    folder = make_lung_checkpoint(tmp_path)
    seg = LungSegmenter(folder)
    res = seg.segment(synthetic_xray(96))
    assert res.mask.shape == (64, 64) and res.probability.dtype == np.float32
    card = json.loads((folder / LUNG_CARD_FILE).read_text())
    card["sha256"] = "0" * 64
    (folder / LUNG_CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="sha256"):
        _ = LungSegmenter(folder).model
    card["name"] = "../x"
    (folder / LUNG_CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CardError):
        read_lung_card(folder)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    make_checkpoint(root, name="tiny", input_size=64)
    return DemoService(Zoo(ZooSource(root)), lungs=FixedLungs(two_lungs(64)))


def _xray(size=128):
    return XRay(synthetic_xray(size), "PNG")


def test_explain_with_the_prior_keeps_boxes_in_the_chest(service):
    _, doc = service.explain(_xray(), "tiny", "Effusion", "gradcam", prior="lungs")
    hull = thorax_region(two_lungs(64), "lungs")
    full = np.asarray(Image.fromarray(hull.astype(np.uint8) * 255).resize((128, 128), Image.Resampling.NEAREST)) > 127
    ys, xs = np.nonzero(full)
    assert doc["prior"] == "lungs" and doc["lungs"]["found"] is True
    for x, y, w, h in doc["predicted_boxes"]:
        assert x >= xs.min() - 1 and x + w <= xs.max() + 2 and y >= ys.min() - 1 and y + h <= ys.max() + 2
    _, off = service.explain(_xray(), "tiny", "Effusion", "gradcam", prior="off")
    assert off["prior"] is None and off["lungs"]["checked"] is True  # looked for anyway: the peak note needs them


def test_unknown_prior_and_bad_outline_are_refused(service):
    with pytest.raises(ChoiceError, match="anatomical prior"):
        service.explain(_xray(), "tiny", "Effusion", "gradcam", prior="../../etc/passwd")
    with pytest.raises(ChoiceError, match="true or false"):
        service.explain(_xray(), "tiny", "Effusion", "gradcam", lung_outline="yes")


def test_outline_is_drawn_and_unstudied_defaults_are_said(service):
    overlay, doc = service.explain(_xray(), "tiny", "Effusion", "default", opacity=0.0, lung_outline=True)
    assert doc["lung_outline"] is True
    assert (overlay.reshape(-1, 3) == np.array(OUTLINE_COLOUR)).all(axis=1).sum() > 50
    assert any("No localisation study" in w for w in doc["warnings"])
    overlay, _ = service.explain(_xray(), "tiny", "Effusion", "default", opacity=0.0)
    assert not (overlay.reshape(-1, 3) == np.array(OUTLINE_COLOUR)).all(axis=1).any()


def test_no_lungs_found_is_a_warning_not_a_failure(tmp_path):
    make_checkpoint(tmp_path, name="tiny", input_size=64)
    svc = DemoService(Zoo(ZooSource(tmp_path)), lungs=FixedLungs(np.zeros((64, 64), bool)))
    _, doc = svc.explain(_xray(), "tiny", "Effusion", "gradcam", prior="hull")
    assert NO_LUNGS in doc["warnings"] and doc["prior"] is None and doc["predicted_boxes"]
    svc = DemoService(Zoo(ZooSource(tmp_path)), lungs=None)
    _, doc = svc.explain(_xray(), "tiny", "Effusion", "gradcam", prior="hull")
    assert any("lung-field model is not installed" in w for w in doc["warnings"])


def test_peak_outside_the_chest_is_said(tmp_path):
    make_checkpoint(tmp_path, name="tiny", input_size=64)
    left, right = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    left[:, :32], right[:, 32:] = True, True  # the heatmap's peak lies in exactly one of them
    said = []
    for chest in (left, right):
        svc = DemoService(Zoo(ZooSource(tmp_path)), lungs=FixedLungs(chest))
        _, doc = svc.explain(_xray(), "tiny", "Effusion", "gradcam", prior="off", lung_outline=True)
        outside = any("outside the chest" in w for w in doc["warnings"])
        assert doc["lungs"]["peak_in_chest"] is not outside
        said.append(outside)
    assert sorted(said) == [False, True]


def _fake_lungseg(root, n=12, size=64):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        source = ("montgomery", "shenzhen", "covidseg")[i % 3]
        name = f"{source}_{i}"
        img = (synthetic_xray(size, seed=i) * 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(two_lungs(size).astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
        rows.append({"name": name, "source": source, "original_id": name, "patient_id": str(i // 2) if source == "covidseg" else "",
                     "width": size, "height": size, "has_heart_mask": 0, "source_repo": "x", "source_path": "x"})
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_training_writes_a_checked_card_and_a_patient_split_evaluation(tmp_path):
    from training.lungseg import main, read_manifest, split_by_patient

    _fake_lungseg(tmp_path / "data" / "lungseg")
    parts = split_by_patient(read_manifest(tmp_path / "data" / "lungseg"))
    pats = {k: {r["patient"] for r in v} for k, v in parts.items()}
    assert not pats["train"] & pats["test"] and all(parts.values())
    out = tmp_path / "lungs"
    main(["--data-root", str(tmp_path / "data"), "--out", str(out), "--epochs", "1", "--size", "32",
          "--encoder", "tu-test_efficientnet", "--decoder-channels", "16", "8", "8", "8", "8", "--init", "random"])
    card = read_lung_card(out)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["weights_sha256"] == card.sha256 and card.metrics["test_dice"] == ev["test_dice"]
    assert set(ev["per_source"]) == {"montgomery", "shenzhen", "covidseg"} and ev["latency_ms_median"] > 0
    assert isinstance(LungSegmenter(out).segment(synthetic_xray(64)), LungResult)


def test_a_lung_card_changed_with_its_weights_is_refused_by_the_pin(tmp_path):
    folder = make_lung_checkpoint(tmp_path / "lungs")
    assert LungSegmenter(folder, pinned_sha256=read_lung_card(folder).sha256).segment(synthetic_xray(64)) is not None
    seg = LungSegmenter(folder, pinned_sha256="f" * 64)
    with pytest.raises(WeightsError, match="pinned"):
        _ = seg.model
    make_checkpoint(tmp_path / "ck", name="tiny", input_size=64)
    svc = DemoService(Zoo(ZooSource(tmp_path / "ck")), lungs=seg)
    _, doc = svc.explain(_xray(), "tiny", "Effusion", "gradcam", prior="hull")
    assert any("lung-field model is not installed" in w for w in doc["warnings"]) and svc.lungs is None


def test_the_shipped_lung_model_is_pinned_and_loads():
    from cxr_demo.lungs import default_lung_folder, default_segmenter

    if default_lung_folder() is None:
        pytest.skip("no lung model in checkpoints/")
    seg = default_segmenter()
    assert seg.pinned_sha256 == seg.card.sha256
    assert seg.segment(synthetic_xray(256)).mask.shape == (seg.card.input_size,) * 2


def test_anatomy_check_on_known_masks():
    upright = np.zeros((64, 64), bool)
    for r in range(8, 56):  # lungs widen from the apex (top), then keep their width down to the base
        w = min(19, 4 + (r - 8))
        upright[r, 28 - w : 28] = True
        upright[r, 36 : 36 + w] = True
    prob = upright.astype(np.float32)
    assert LungResult(prob, upright).chest_problem() is None
    assert LungResult(prob, upright, {"upside_down": 0.45}, contrast=-0.2).chest_problem() is None
    assert "upside down" in LungResult(prob * 0.8 + 0.1, upright, {"upside_down": 0.45}).chest_problem()
    assert "inverted" in LungResult(prob, upright, {"upside_down": 0.3}, contrast=0.05).chest_problem()
    # the contrast itself: dark lungs in a brighter thorax are negative; the same pixels inverted, positive
    film = np.where(upright, 60, 200).astype(np.uint8)
    assert lung_contrast(film, upright) < -0.5 < 0.5 < lung_contrast(255 - film, upright)
    assert lung_contrast(film, np.zeros_like(upright)) is None
    rotated = np.rot90(upright).copy()
    assert "side by side" in LungResult(rotated.astype(np.float32), rotated).chest_problem()
    empty = np.zeros((64, 64), bool)
    assert "no lung fields" in LungResult(empty.astype(np.float32), empty).chest_problem()
    # two blobs side by side that narrow through the middle of their height (what the lung model finds on some
    # photographs): not a pair of lungs
    waisted = upright.copy()
    waisted[26:38] = False
    waisted[26:38, 26:28] = waisted[26:38, 36:38] = True
    assert "narrows through the middle" in LungResult(waisted.astype(np.float32), waisted).chest_problem()


def test_the_lung_shape_threshold_is_the_one_fitted_on_chest_films():
    """MIN_ROW_FILL is the value `python -m training.lungseg --fit-row-fill` wrote from train/validation chest films
    of the shipped lung model, and the committed chest check measured the rule with it, on held-out photographs too."""
    import json

    from cxr_demo.lungs import MIN_ROW_FILL, default_lung_folder, read_lung_card
    from cxr_demo.paths import PROJECT_ROOT

    fit = json.loads((PROJECT_ROOT / "docs" / "lungs" / "row_fill.json").read_text())
    assert MIN_ROW_FILL == fit["min_row_fill"] > 0
    assert set(fit["sets"]) >= {"NIH train/val"} and all(v["n"] >= 100 for v in fit["sets"].values())
    folder = default_lung_folder()
    if folder is not None:
        assert fit["weights_sha256"] == read_lung_card(folder).sha256
    for name in ("chest_check.json", "chest_check-seed1.json"):
        check = json.loads((PROJECT_ROOT / "docs" / "lungs" / name).read_text())
        assert f"under {MIN_ROW_FILL} of the widest row" in check["rule"], name
        assert check["groups"]["held-out photographs (never seen while making the rules)"]["n"] >= 5, name


def test_predict_flags_nothing_on_an_image_without_lungs(tmp_path):
    from cxr_demo.service import NOT_FLAGGED_NOT_A_CHEST

    make_checkpoint(tmp_path, name="tiny", input_size=64)
    zoo = Zoo(ZooSource(tmp_path))
    card = zoo.card("tiny")
    for op in card.thresholds:  # every finding passes its threshold
        card.thresholds[op] = {k: 0.0 for k in card.thresholds[op]}
    svc = DemoService(zoo, lungs=FixedLungs(np.zeros((64, 64), bool)))
    doc = svc.predict(_xray(), "tiny", "f1").document
    assert doc["chest_check"] == {"checked": True, "problem": "no lung fields were found in it"}
    assert not any(f["positive"] for f in doc["findings"])
    assert all(f["note"] == NOT_FLAGGED_NOT_A_CHEST for f in doc["findings"] if f["passes_threshold"])
    assert any("does not look like an upright frontal chest X-ray" in w for w in doc["warnings"])
    doc = DemoService(zoo, lungs=None).predict(_xray(), "tiny", "f1").document
    assert doc["chest_check"] == {"checked": False, "problem": None}


def test_the_segmenter_reuses_its_answer_for_the_same_film_only(tmp_path, monkeypatch):
    """A film sent again (another model, an explain after a predict) is not segmented again; the check's answer
    (two views) also answers a plain request; another film, or the cache full, runs the model."""
    import cxr_demo.lungs as lungs_module

    seg = LungSegmenter(make_lung_checkpoint(tmp_path / "lungs"))
    batches: list[int] = []
    model = seg.model
    seg._model = lambda x: (batches.append(x.shape[0]), model(x))[1]
    film, other = synthetic_xray(64, seed=1), synthetic_xray(64, seed=2)
    first = seg.segment(film, views=True)
    assert batches == [2] and first.contrast is not None and set(first.alternates) == {"upside_down"}
    assert seg.segment(film.copy(), views=True) is first and seg.segment(film) is first and batches == [2]
    plain = seg.segment(other)
    assert batches == [2, 1] and plain.contrast is None and not plain.alternates
    assert seg.segment(other, views=True).contrast is not None and batches == [2, 1, 2]
    monkeypatch.setattr(lungs_module, "CACHE_SIZE", 1)
    seg.segment(synthetic_xray(64, seed=3))
    seg.segment(film)
    assert batches == [2, 1, 2, 1, 1]
