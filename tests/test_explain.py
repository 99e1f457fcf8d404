"""Box overlap maths, heatmap -> box, overlays and CAM on tiny models of several families."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_demo.boxes import BoxRule, best_match, box_iobb, box_iou, heatmap_to_boxes
from cxr_demo.cam import CAM_METHODS, compute_heatmap, resize_heatmap
from cxr_demo.card import read_card
from cxr_demo.groundtruth import BoxInputError, nih_boxes_for, parse_boxes
from cxr_demo.images import read_xray
from cxr_demo.inference import preprocess
from cxr_demo.models import load_weights
from cxr_demo.overlay import render_overlay
from tests.helpers import make_checkpoint, synthetic_xray


@pytest.mark.parametrize(
    "a, b, iou, iobb",
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0, 1.0),  # identical
        ((0, 0, 10, 10), (20, 20, 5, 5), 0.0, 0.0),  # disjoint
        ((0, 0, 10, 10), (10, 0, 10, 10), 0.0, 0.0),  # touching edges
        ((0, 0, 10, 10), (2, 2, 5, 5), 25 / 100, 1.0),  # truth nested in prediction
        ((2, 2, 5, 5), (0, 0, 10, 10), 25 / 100, 25 / 100),  # prediction nested in truth
        ((0, 0, 10, 10), (5, 0, 10, 10), 50 / 150, 0.5),  # half overlap
    ],
)
def test_iou_and_iobb_hand_computed(a, b, iou, iobb):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iobb(a, b) == pytest.approx(iobb)


def test_iou_is_invariant_to_scaling_both_boxes():
    a, b = (100, 200, 300, 150), (250, 260, 200, 200)
    s = 384 / 1024
    scaled = [tuple(v * s for v in box) for box in (a, b)]
    assert box_iou(*scaled) == pytest.approx(box_iou(a, b))


def test_best_match_without_truth_is_none():
    assert best_match([(0, 0, 1, 1)], []) == (None, None)
    assert best_match([], [(0, 0, 1, 1)]) == (None, None)


def test_heatmap_to_box_single_blob():
    heat = np.zeros((100, 120), np.float32)
    heat[20:40, 30:70] = 1.0
    assert heatmap_to_boxes(heat, 0.5) == [(30.0, 20.0, 40.0, 20.0)]


def test_heatmap_to_box_largest_region_and_all_regions():
    heat = np.zeros((100, 100), np.float32)
    heat[10:20, 10:20] = 1.0  # 100 px
    heat[50:80, 50:90] = 0.8  # 1200 px, lower peak but larger
    assert heatmap_to_boxes(heat, 0.5, largest_only=True) == [(50.0, 50.0, 40.0, 30.0)]
    assert heatmap_to_boxes(heat, 0.5, largest_only=False) == [(50.0, 50.0, 40.0, 30.0), (10.0, 10.0, 10.0, 10.0)]
    # Above 0.8 of the max only the small, brighter blob survives.
    assert heatmap_to_boxes(heat, 0.9) == [(10.0, 10.0, 10.0, 10.0)]


def test_heatmap_to_box_gaussian_threshold():
    yy, xx = np.mgrid[0:201, 0:201]
    heat = np.exp(-((xx - 100.0) ** 2 + (yy - 100.0) ** 2) / (2 * 20.0**2))
    (x, y, w, h), = heatmap_to_boxes(heat, 0.5)
    # exp(-r^2 / 2s^2) >= 0.5  <=>  r <= s * sqrt(2 ln 2) ~ 23.5 px
    assert w == pytest.approx(2 * 23.5 + 1, abs=2) and h == pytest.approx(w)
    assert x + w / 2 == pytest.approx(100.5, abs=1)


def test_empty_heatmap_gives_no_box():
    assert heatmap_to_boxes(np.zeros((10, 10)), 0.5) == []


def test_nih_boxes_scaled_from_1024_frame(tmp_path):
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\nimg.png,Infiltrate,512,256,128,64\n")
    assert nih_boxes_for("/uploads/xyz/img.png", 384, 384, csv) == [("Infiltration", (192.0, 96.0, 48.0, 24.0))]
    assert nih_boxes_for("other.png", 384, 384, csv) == []


@pytest.mark.parametrize("text, boxes", [
    ("10, 20, 30, 40", [(10, 20, 30, 40)]),
    ("10,20,30,40; 1,2,3,4", [(10, 20, 30, 40), (1, 2, 3, 4)]),
    ("[[10, 20, 30, 40]]", [(10, 20, 30, 40)]),
    ("[10, 20, 30, 40]", [(10, 20, 30, 40)]),
    ("", []),
])
def test_parse_boxes(text, boxes):
    assert parse_boxes(text, 100, 100) == boxes


@pytest.mark.parametrize("text", ["10, 20, 30", "a, b, c, d", "[[1,2,3]]", "10, 20, -5, 5", "90, 90, 50, 50", "[1,2"])
def test_parse_boxes_rejects_malformed(text):
    with pytest.raises(BoxInputError):
        parse_boxes(text, 100, 100)


def test_overlay_draws_boxes_in_their_colours():
    gray = np.full((256, 256), 100, np.uint8)
    out = render_overlay(gray, None, 0.0, pred_boxes=[(10, 30, 20, 20)], truth_boxes=[(140, 40, 30, 30)])
    assert out.shape == (256, 256, 3)
    assert tuple(out[30, 15]) == (255, 214, 0)  # top edge of the model's box
    assert tuple(out[40, 150]) == (0, 230, 118)  # top edge of the radiologist's box
    assert tuple(out[128, 128]) == (100, 100, 100)  # untouched elsewhere
    assert tuple(out[250, 100]) == (100, 100, 100)  # no legend panel over the film (the legend is outside it)


def test_colour_bar_matches_the_overlay_colours():
    from cxr_demo.overlay import colour_bar_css

    css = colour_bar_css()
    assert css.startswith("linear-gradient(to right, rgb(0, 0, 128) 0%") and css.endswith("rgb(128, 0, 0) 100%)")


FAMILIES = {
    # family: (timm architecture, input size, extra model args keeping the model tiny)
    "efficientnet": ("test_efficientnet", 64, {}),
    "resnet": ("test_resnet", 64, {}),
    "densenet": ("densenet121", 64, {"growth_rate": 8, "block_config": (1, 1, 1, 1)}),
    "vit": ("test_vit", 160, {}),
    "swin": ("swin_tiny_patch4_window7_224", 224, {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}),
    "convnext": ("test_convnext", 64, {}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_cam_method_runs_on_each_family(tmp_path, family):
    arch, size, extra = FAMILIES[family]
    folder = make_checkpoint(tmp_path, name="m", arch=arch, input_size=size, model_args=extra)
    card = read_card(folder)
    model = load_weights(card, folder / "model.safetensors")
    x = preprocess(synthetic_xray(128), card)
    with torch.inference_mode():  # tensors from inference mode must still work (they are cloned)
        x = x.clone()
    for method in CAM_METHODS:
        if method in {"scorecam", "ablationcam"} and family not in {"efficientnet", "swin", "vit"}:
            continue  # slow perturbation methods: a CNN and both transformer reshapes are enough
        heat = compute_heatmap(model, card, x, 3, method)
        assert heat.shape == (card.input_size, card.input_size), method
        assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1.0 + 1e-6, method


def test_moment_box_of_a_uniform_block_is_the_block():
    heat = np.zeros((100, 100), np.float32)
    heat[20:40, 30:70] = 1.0
    (x, y, w, h), = heatmap_to_boxes(heat, rule=BoxRule(0.5, fit="moments"))
    assert (x, y, w, h) == pytest.approx((30, 20, 40, 20), abs=0.01)


def test_moment_box_is_tighter_than_the_rectangle_for_a_peaked_blob():
    yy, xx = np.mgrid[0:200, 0:200]
    heat = np.exp(-((xx - 100.0) ** 2 + (yy - 80.0) ** 2) / (2 * 25.0**2))
    rect = heatmap_to_boxes(heat, rule=BoxRule(0.2, fit="rect"))[0]
    mom = heatmap_to_boxes(heat, rule=BoxRule(0.2, fit="moments"))[0]
    assert mom[2] < rect[2] and mom[3] < rect[3]
    assert mom[0] + mom[2] / 2 == pytest.approx(100.5, abs=0.5) and mom[1] + mom[3] / 2 == pytest.approx(80.5, abs=0.5)


def test_adaptive_threshold_uses_mean_plus_k_std():
    heat = np.zeros((100, 100), np.float32)
    heat[10:20, 10:20] = 1.0
    heat[60:90, 60:90] = 0.3
    # mean + 3 std = 0.037 + 3 x 0.129 ~ 0.43 here: only the bright square passes
    assert heatmap_to_boxes(heat, rule=BoxRule(3.0, mode="adaptive")) == [(10.0, 10.0, 10.0, 10.0)]
    # mean + 0.1 std ~ 0.05: both pass; the larger one first, and "all" keeps both
    assert heatmap_to_boxes(heat, rule=BoxRule(0.1, mode="adaptive", regions="all")) == [
        (60.0, 60.0, 30.0, 30.0), (10.0, 10.0, 10.0, 10.0)]


def test_heatmap_of_a_cropped_input_lands_on_the_crop():
    heat = np.ones((7, 7), dtype=np.float32)
    full = resize_heatmap(heat, 100, 80, crop=(0.25, 0.75, 0.5, 1.0))
    assert full.shape == (80, 100)
    rows, cols = np.nonzero(full)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 59, 50, 99)
    assert np.allclose(resize_heatmap(heat, 100, 80), 1.0)


def test_explain_reports_the_same_probability_as_predict_and_picks_the_top_finding(tmp_path):
    """/explain takes its probability from the CAM's own forward pass (no second forward): it must equal
    /predict's, and with no finding chosen it explains the most probable one."""
    from PIL import Image

    from cxr_demo.service import DemoService
    from cxr_demo.zoo import Zoo, ZooSource

    make_checkpoint(tmp_path / "ck", name="tiny")
    service = DemoService(Zoo(ZooSource(tmp_path / "ck")))
    path = tmp_path / "x.png"
    Image.fromarray((synthetic_xray(96) * 255).astype(np.uint8)).save(path)
    img = read_xray(path)
    probs = {r["name"]: r["probability"] for r in service.predict(img, "tiny").document["findings"]}
    for finding in ("Effusion", "Hernia"):
        _, doc = service.explain(img, "tiny", finding, "gradcam")
        assert doc["finding"] == finding
        assert doc["probability"] == pytest.approx(probs[finding], abs=1e-5)
    _, doc = service.explain(img, "tiny", None, "gradcam")
    assert doc["finding"] == max(probs, key=probs.get)
    assert doc["probability"] == pytest.approx(max(probs.values()), abs=1e-5)


def test_finding_boxes_of_each_source():
    from cxr_demo.boxes import BoxRule, finding_boxes, frame_box, heat_peak, predicted_boxes, relative_to_frame
    from cxr_demo.card import FindingBox

    heat = np.zeros((200, 100), np.float32)
    heat[40:60, 20:30] = 1.0
    heat[50, 25] = 2.0
    frame = (10.0, 20.0, 80.0, 160.0)
    rule = BoxRule(0.4, "relative", "all", "rect")
    assert finding_boxes(heat, FindingBox(source="heatmap", rule=rule.__dict__, text="r"), None, 100, 200) == \
        predicted_boxes(heat, rule)
    assert heat_peak(heat) == (25.5, 50.5)
    peak = FindingBox(source="peak", scale=2.0, typical_box=[0.5, 0.5, 0.1, 0.05], text="p")
    (x, y, w, h), = finding_boxes(heat, peak, frame, 100, 200)
    assert (w, h) == pytest.approx((16.0, 16.0)) and (x + w / 2, y + h / 2) == pytest.approx((25.5, 50.5))
    chest = FindingBox(source="chest", typical_box=[0.5, 0.75, 0.5, 0.25], text="c")
    (box,) = finding_boxes(heat, chest, frame, 100, 200)
    assert box == pytest.approx((30.0, 120.0, 40.0, 40.0))
    assert relative_to_frame(box, frame) == pytest.approx((0.5, 0.75, 0.5, 0.25))
    assert finding_boxes(heat, chest, None, 100, 200) is None and finding_boxes(heat, peak, None, 100, 200) is None
    sided = FindingBox(source="sided", side_boxes=[[0.25, 0.25, 0.25, 0.25], [0.75, 0.25, 0.25, 0.25]], text="s")
    (left,) = finding_boxes(heat, sided, frame, 100, 200)  # the heat lies at x 20-30: the image's left
    assert left == pytest.approx((20.0, 40.0, 20.0, 40.0))
    (right,) = finding_boxes(heat[:, ::-1].copy(), sided, frame, 100, 200)
    assert right == pytest.approx((60.0, 40.0, 20.0, 40.0))
    # a box near the edge is moved inside the image, not cut
    assert frame_box([0.0, 0.0, 0.5, 0.25], frame, 100, 200) == pytest.approx((0.0, 0.0, 40.0, 40.0))


def test_usual_place_map_and_its_sources():
    """place_map puts each Gaussian where the card says relative to the chest frame; ``place`` boxes its usual place
    within the lung fields whatever the heatmap; ``weighted`` boxes the heatmap times the place."""
    from cxr_demo.boxes import BoxRule, finding_boxes, place_map
    from cxr_demo.card import FindingBox

    frame = (10.0, 20.0, 80.0, 160.0)
    one = [[1.0, 0.25, 0.75, 0.05, 0.05]]
    m = place_map(one, frame, 100, 200)
    assert m.shape == (200, 100) and m.max() == pytest.approx(1.0)
    py, px = np.unravel_index(int(np.argmax(m)), m.shape)
    assert (px, py) in {(29, 139), (29, 140), (30, 139), (30, 140)}  # centre (10 + 0.25 * 80, 20 + 0.75 * 160)
    assert m[140, 30 + 8] == pytest.approx(np.exp(-0.5 * (8.5 / 4) ** 2), rel=0.05)  # sd 0.05 x 80 = 4 px
    two = place_map([[0.7, 0.25, 0.5, 0.05, 0.05], [0.3, 0.75, 0.5, 0.05, 0.05]], frame, 100, 200)
    assert two[100, 30] == pytest.approx(1.0, abs=0.02) and two[100, 70] == pytest.approx(0.3 / 0.7, abs=0.02)

    rule = BoxRule(0.5, "relative", "all", "rect")
    lungs = np.zeros((200, 100), bool)
    lungs[40:180, 15:45] = lungs[40:180, 55:85] = True
    heat = np.zeros((200, 100), np.float32)
    heat[30:50, 60:80] = 1.0  # the heatmap's heat lies elsewhere: a place box ignores it
    place = FindingBox(source="place", rule=rule.__dict__, place=one, text="p")
    (box,) = finding_boxes(heat, place, frame, 100, 200, lungs)
    assert box[0] < 30 < box[0] + box[2] and box[1] < 140 < box[1] + box[3] and box[2] < 20
    assert finding_boxes(heat, place, frame, 100, 200, np.zeros_like(lungs)) is None  # no lung fields: the rule
    assert finding_boxes(heat, place, None, 100, 200, lungs) is None
    # weighted: the heatmap where the usual place is; with the heat far from the place, its box goes to the place
    heat[130:150, 20:40] = 0.2
    weighted = FindingBox(source="weighted", rule=rule.__dict__, place=one, power=1.0, text="w")
    (box,) = finding_boxes(heat, weighted, frame, 100, 200)
    assert 20 <= box[0] and box[0] + box[2] <= 40 and 130 <= box[1] and box[1] + box[3] <= 150


@pytest.mark.parametrize("fields", [
    {"source": "place", "place": [[1.0, 0.5, 0.5, 0.1, 0.1]]},  # no rule
    {"source": "place", "rule": {}},  # no place
    {"source": "place", "rule": {}, "place": [[1.0, 0.5, 0.5, 0.0, 0.1]]},
    {"source": "place", "rule": {}, "place": [[1.0, 0.5, float("inf"), 0.1, 0.1]]},
    {"source": "place", "rule": {}, "place": [[0.0, 0.5, 0.5, 0.1, 0.1]]},
    {"source": "place", "rule": {}, "place": [[1.0, 0.5, 0.5, 0.1]]},
    {"source": "weighted", "rule": {}, "place": [[1.0, 0.5, 0.5, 0.1, 0.1]]},  # no power
    {"source": "heatmap"},
    {"source": "peak", "typical_box": [0.5, 0.5, 0.1, 0.1]},
    {"source": "chest", "typical_box": [0.5, 0.5, 0.0, 0.1]},
    {"source": "chest", "typical_box": [0.5, float("nan"), 0.1, 0.1]},
    {"source": "chest", "typical_box": [0.5, 0.5, 0.1]},
    {"source": "elsewhere", "typical_box": [0.5, 0.5, 0.1, 0.1]},
    {"source": "sided", "side_boxes": [[0.2, 0.5, 0.1, 0.1]]},
    {"source": "sided", "side_boxes": [[0.2, 0.5, 0.1, 0.1], [0.7, 0.5, -0.1, 0.1]]},
])
def test_a_finding_box_source_must_be_complete(fields):
    from pydantic import ValidationError

    from cxr_demo.card import FindingBox

    with pytest.raises(ValidationError):
        FindingBox(text="x", **fields)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_slow_methods_draw_no_progress_bar_on_the_servers_stderr(tmp_path, capfd, method):
    """pytorch-grad-cam's Score-CAM and Ablation-CAM print a tqdm bar per call; a server whose stderr was a pipe
    nobody read hung inside the heatmap once the pipe was full (bench.load, after ~20 minutes). Now silent, and
    the heatmap is the same."""
    folder = make_checkpoint(tmp_path, name="m", arch="test_efficientnet", input_size=64)
    card = read_card(folder)
    model = load_weights(card, folder / "model.safetensors")
    x = preprocess(synthetic_xray(128), card)
    capfd.readouterr()
    heat = compute_heatmap(model, card, x, 3, method)
    err = capfd.readouterr().err
    assert "it/s" not in err and "|" not in err, err[:200]
    assert heat.shape == (64, 64) and np.isfinite(heat).all()
