"""The localisation study on a tiny model and a fake NIH layout; the app then uses its choice."""

from __future__ import annotations

import json

import pytest

from cxr_demo.cam import explain_settings
from cxr_demo.card import read_card, write_card
from cxr_demo.images import read_xray
from cxr_demo.service import DemoService
from cxr_demo.zoo import Zoo, ZooSource
from tests.helpers import make_checkpoint, make_fake_nih, make_lung_checkpoint


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from training.localisation import main

    tmp = tmp_path_factory.mktemp("loc")
    data = make_fake_nih(tmp / "data", n_train=8, n_test=24, size=128)
    folder = make_checkpoint(tmp / "ck", name="tiny", input_size=64)
    lungs = make_lung_checkpoint(tmp / "lungs")
    out = tmp / "docs" / "localisation"
    main([str(folder), "--data-root", str(data), "--out", str(out), "--perturbation-pairs", "1", "--max-cost", "50",
          "--lung-model", str(lungs), "--priors", "lungs,hull+0.05"])
    return folder, json.loads((out / "tiny.json").read_text()), tmp / "docs"


def test_halves_are_patient_disjoint_and_cover_every_box(study):
    _, result, _ = study
    h = result["halves"]
    assert h["select"]["n_boxes"] + h["report"]["n_boxes"] == result["n_boxes"] > 0
    assert result["chosen"]["report"]["n_boxes"] == h["report"]["n_boxes"]


def test_every_method_and_metric_is_reported(study):
    _, result, _ = study
    keys = set(result["methods"])
    assert {"gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "ablationcam"} <= keys
    assert any("@" in k for k in keys)  # the higher-resolution layer variant
    m = result["methods"]["gradcam"]
    assert set(m["source_study_mask_iou"]["report"]) == {"0.1", "0.15", "0.25", "0.35", "0.45"}
    for metric in ("mean_iou", "mean_iobb", "hit_rate_iou_0.1", "hit_rate_iou_0.25", "hit_rate_iou_0.5", "pointing_game"):
        assert 0.0 <= m["report"][metric] <= 1.0
    assert m["seconds_per_heatmap"] > 0 and result["forward_backward_seconds"] > 0
    assert result["methods"]["ablationcam"]["subset"] is True
    assert not result["methods"][result["chosen"]["key"]]["subset"]  # never chosen from a subset


def test_every_method_is_scored_with_and_without_each_prior_and_beside_image_free_boxes(study):
    _, result, docs = study
    PRIOR_SHAPES = ["lungs", "hull+0.05"]  # the two the fixture asks for
    assert result["priors"] == ["off", *PRIOR_SHAPES]
    for shape in PRIOR_SHAPES:
        assert result["methods"][f"gradcam + {shape}"]["prior"] == shape
    assert result["methods"]["gradcam"]["prior"] is None
    # the lung model runs on every explain whatever the prior: a prior row costs what its heatmap costs
    assert result["methods"]["gradcam + lungs"]["cost_vs_forward_backward"] == pytest.approx(
        result["methods"]["gradcam"]["cost_vs_forward_backward"])
    base = result["image_free_baselines"]
    assert {"median_box_per_finding", "central_box"} <= set(base)
    for b in base.values():
        assert b["report"]["n_boxes"] == result["halves"]["report"]["n_boxes"]
    best_free = max(base[k]["report"]["mean_iou_over_findings"] for k in ("median_box_per_finding", "central_box"))
    assert result["margin_over_image_free"]["mean_iou_over_findings"] == pytest.approx(
        result["chosen"]["report"]["mean_iou_over_findings"] - best_free)
    assert result["best_without_prior"]["prior"] is None
    assert set(result["lung_model"]["box_coverage"]) == set(PRIOR_SHAPES)
    text = (docs / "LOCALISATION.md").read_text()
    assert "median box per finding" in text and "without prior" in text


def test_choice_is_the_best_on_the_select_half(study):
    _, result, _ = study
    best = max((k for k, v in result["methods"].items() if not v["subset"]),
               key=lambda k: result["methods"][k]["select"]["mean_iou_over_findings"])
    assert result["chosen"]["key"] == best


def _row(prior, seconds, select, subset=False):
    return {"method": "gradcam", "layer": "bn2", "prior": prior, "seconds_per_heatmap": seconds, "subset": subset,
            "cost_vs_forward_backward": 99.0, "best_rule_on_select": {"k": 1.0}, "best_rule_text": "rule",
            "select": {"mean_iou_over_findings": select}, "report": {"mean_iou_over_findings": select / 2},
            "report_per_finding": {}}


def test_defaults_are_chosen_by_heatmap_cost_on_the_select_half():
    """select_defaults: a prior row is eligible by its heatmap's cost alone (the lung model runs on every explain);
    a row over the cost bound or scored on a subset is never chosen; the margin is over the best image-free box."""
    from training.localisation import select_defaults

    study = {"forward_backward_seconds": 2.0,
             "methods": {"gradcam": _row(None, 2.0, 0.10), "gradcam + lungs": _row("lungs", 2.0, 0.20),
                         "scorecam": _row(None, 40.0, 0.50), "ablationcam": _row(None, 2.0, 0.90, subset=True)},
             "image_free_baselines": {"median_box_per_finding": {"report": {"mean_iou_over_findings": 0.04}},
                                      "central_box": {"report": {"mean_iou_over_findings": 0.06}}}}
    out = select_defaults(study, max_cost=1.5)
    assert out["chosen"]["key"] == "gradcam + lungs" and out["best_without_prior"]["key"] == "gradcam"
    assert out["methods"]["gradcam + lungs"]["cost_vs_forward_backward"] == pytest.approx(1.0)
    assert out["margin_over_image_free"] == {"baseline": "central_box", "mean_iou_over_findings": pytest.approx(0.04)}
    assert select_defaults(study, max_cost=50)["chosen"]["key"] == "scorecam"


def test_reselect_rewrites_study_card_and_table_without_heatmaps(study, tmp_path, monkeypatch):
    import shutil

    import training.localisation as loc

    folder, result, docs = study
    folder2, docs2 = tmp_path / "ck" / folder.name, tmp_path / "docs"
    shutil.copytree(folder, folder2)
    shutil.copytree(docs, docs2)
    stale = json.loads((docs2 / "localisation" / "tiny.json").read_text())
    worst = min((k for k, v in stale["methods"].items() if not v["subset"]),
                key=lambda k: stale["methods"][k]["select"]["mean_iou_over_findings"])
    stale["chosen"] = dict(stale["chosen"], key=worst)  # as if an older rule had chosen another row
    (docs2 / "localisation" / "tiny.json").write_text(json.dumps(stale))
    evaluated = []
    monkeypatch.setattr(loc, "evaluate_checkpoint", lambda f, root: evaluated.append(f))
    monkeypatch.setattr(loc, "compute_heatmap", None)  # no heatmap may be computed
    loc.main([str(folder2), "--reselect", "--max-cost", "50", "--out", str(docs2 / "localisation")])
    again = json.loads((docs2 / "localisation" / "tiny.json").read_text())
    assert again["chosen"]["key"] == result["chosen"]["key"] != worst
    assert read_card(folder2).explain_defaults.method == result["chosen"]["method"]
    assert evaluated == [folder2]  # the choice changed: eval.json's box numbers are refreshed
    assert (docs2 / "LOCALISATION.md").is_file()


def test_card_and_app_use_the_chosen_defaults(study, tmp_path):
    folder, result, docs = study
    card = read_card(folder)
    assert card.explain_defaults.method == result["chosen"]["method"]
    assert card.explain_defaults.layer == result["chosen"]["layer"]
    assert card.explain_defaults.prior == result["chosen"]["prior"]
    s = explain_settings(card, "default", 0)
    assert (s.method, s.layer, s.rule.__dict__) == (result["chosen"]["method"], result["chosen"]["layer"],
                                                    result["chosen"]["rule"])
    s = explain_settings(card, "eigencam", 0.4)
    assert (s.method, s.layer, s.rule.threshold, s.rule.regions) == ("eigencam", card.cam_target_layer, 0.4, "largest")
    assert "Localisation study" in (docs / "LOCALISATION.md").read_text()
    service = DemoService(Zoo(ZooSource(folder.parent)))
    import numpy as np
    from PIL import Image

    from tests.helpers import synthetic_xray

    img = tmp_path / "x.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(img)
    _, doc = service.explain(read_xray(img), "tiny", "Effusion", "default", "10, 10, 50, 50")
    assert doc["method"] == result["chosen"]["method"] and doc["layer"] == result["chosen"]["layer"]
    assert 1 <= len(doc["predicted_boxes"]) <= 3 and len(doc["per_box"]) == 1
    # the card keeps what the choice scored beside the best image-free box, and the app says when it adds nothing
    free = result["margin_over_image_free"]["baseline"]
    kept = card.explain_defaults
    assert kept.report_mean_iou == pytest.approx(result["chosen"]["report"]["mean_iou_over_findings"], abs=1e-4)
    assert kept.image_free_baseline == free and kept.image_free_mean_iou == pytest.approx(
        result["image_free_baselines"][free]["report"]["mean_iou_over_findings"], abs=1e-4)
    assert doc["study"]["adds_over_image_free"] == kept.adds_over_image_free()
    for report_iou, told in ((0.05, True), (0.9, False)):
        card.explain_defaults = kept.model_copy(update={"report_mean_iou": report_iou, "image_free_mean_iou": 0.15})
        write_card(card, folder)
        _, doc = DemoService(Zoo(ZooSource(folder.parent))).explain(read_xray(img), "tiny", "Effusion", "default")
        assert any("no better than a box drawn without looking at the film" in w for w in doc["warnings"]) == told
        _, doc = DemoService(Zoo(ZooSource(folder.parent))).explain(read_xray(img), "tiny", "Effusion", "gradcam")
        assert not any("no better than a box drawn" in w for w in doc["warnings"])  # not the studied settings
    card.explain_defaults = kept
    write_card(card, folder)


def test_the_studys_shared_labelling_gives_the_apps_boxes():
    """The study scores its rule grid with one labelling per threshold; the app draws each rule on its own."""
    import numpy as np
    from scipy import ndimage

    from cxr_demo.boxes import predicted_boxes, predicted_boxes_for_rules
    from training.localisation import rule_grid

    rng = np.random.default_rng(0)
    from cxr_demo.boxes import BoxRule

    rules = rule_grid() + [BoxRule(0.5, "relative", "all", "moments")]
    for sigma in (2, 6, 15):
        heat = ndimage.gaussian_filter(rng.random((96, 80)), sigma).astype(np.float32)
        heat /= heat.max()
        assert predicted_boxes_for_rules(heat, rules) == [predicted_boxes(heat, r) for r in rules]
    assert predicted_boxes_for_rules(np.zeros((8, 8), np.float32), rules) == [[] for _ in rules]


def test_per_finding_box_sources_are_chosen_on_select_and_used_by_the_app_and_evaluation(study, tmp_path):
    """The second stage (training.box_sources): per finding, the box source best on the select half; its first-stage
    row reproduces the first stage's report number; the card gets the choice, and eval.json's box numbers (the app's
    code path) equal the stage's report numbers."""
    import numpy as np

    from cxr_demo.card import FindingBox
    from cxr_demo.lungs import LungSegmenter
    from training.box_sources import main as box_main

    folder, result, docs = study
    tmp = folder.parent.parent
    kept = read_card(folder).explain_defaults
    out = docs / "localisation" / "per_finding"
    box_main([str(folder), "--data-root", str(tmp / "data"), "--studies", str(docs / "localisation"), "--out", str(out),
              "--lung-model", str(tmp / "lungs" / "lungs-tiny")])
    try:
        pf = json.loads((out / "tiny.json").read_text())
        assert pf["report_first_stage"]["mean_iou_over_findings"] == pytest.approx(
            result["chosen"]["report"]["mean_iou_over_findings"], abs=1e-9)
        for f, c in pf["per_finding"].items():
            assert c["select_mean_iou"] >= c["select_mean_iou_first_stage_rule"]  # the first-stage rule was a candidate
            assert c["source"] in ("heatmap", "peak", "chest", "sided", "place", "weighted")
        # the image-free sources and the heatmap's own, side by side
        assert {"report_image_free_per_finding", "report_heatmap_sources_per_finding",
                "margin_of_heatmap_over_image_free", "report_only_place_boxes"} <= set(pf)
        from training.localisation import refresh_cards

        refresh_cards([folder], docs / "localisation")  # re-writing the first stage's defaults keeps the second's
        card = read_card(folder)
        assert set(card.explain_defaults.per_finding) == set(pf["per_finding"])
        assert "Box source per finding" in (docs / "LOCALISATION.md").read_text()
        assert card.explain_defaults.report_mean_iou == pytest.approx(pf["report"]["mean_iou_over_findings"], abs=1e-4)
        evaluated = json.loads((folder / "eval.json").read_text())["localisation"]
        assert evaluated["overall"]["mean_iou_over_findings"] == pytest.approx(
            pf["report"]["mean_iou_over_findings"], abs=1e-9)
        assert evaluated["overall"]["n_boxes"] == pf["report"]["n_boxes"]

        # the app: a finding whose source is the chest draws the finding's usual box relative to the lungs it found
        from PIL import Image

        from tests.helpers import synthetic_xray

        img = tmp_path / "x.png"
        Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(img)
        d = card.explain_defaults
        d.per_finding = {"Effusion": FindingBox(source="chest", typical_box=[0.5, 0.5, 0.25, 0.5], text="usual box")}
        write_card(card, folder)
        service = DemoService(Zoo(ZooSource(folder.parent)), lungs=LungSegmenter(tmp / "lungs" / "lungs-tiny"))
        _, doc = service.explain(read_xray(img), "tiny", "Effusion", "default")
        if doc["lungs"].get("found"):
            assert doc["box_source"] == "chest" and len(doc["predicted_boxes"]) == 1
            assert any("usually lies relative to the lungs" in w for w in doc["warnings"])
        else:
            assert doc["box_source"] == "rule" and any("no chest was found" in w for w in doc["warnings"])
        _, doc = service.explain(read_xray(img), "tiny", "Effusion", "default", None, 0.5, 0.4)  # a typed threshold
        assert doc["box_source"] == "rule"
        # a finding whose source is its usual place: boxes from the place within the lung fields, said to be so
        place = FindingBox(source="place", rule={"threshold": 0.5, "regions": "all"}, text="usual place",
                           place=[[0.5, 0.25, 0.5, 0.1, 0.2], [0.5, 0.75, 0.5, 0.1, 0.2]])
        d.per_finding = {"Effusion": place}
        write_card(card, folder)
        service = DemoService(Zoo(ZooSource(folder.parent)), lungs=LungSegmenter(tmp / "lungs" / "lungs-tiny"))
        _, doc = service.explain(read_xray(img), "tiny", "Effusion", "default")
        if doc["lungs"].get("found"):
            assert doc["box_source"] == "place" and 1 <= len(doc["predicted_boxes"]) <= 3
            assert any("usually lies relative to the lungs" in w for w in doc["warnings"])
        else:
            assert doc["box_source"] == "rule" and any("no chest was found" in w for w in doc["warnings"])
    finally:
        card = read_card(folder)
        card.explain_defaults = kept
        write_card(card, folder)
