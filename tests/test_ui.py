"""What a visitor meets, without a browser: examples that outlive the cache cleaner, no stale results next to
a new film, a compare view of one task with its operating points, readable names, a capped overlay."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from cxr_demo.groundtruth import default_examples
from cxr_demo.ui import (
    COMPARE_PLACEHOLDER,
    FINDINGS_PLACEHOLDER,
    HEATMAP_PLACEHOLDER,
    Handlers,
    ResultCleaner,
    build_demo,
    card_markdown,
    compare_html,
    delete_old_files,
    findings_html,
)
from cxr_demo.zoo import DEFAULT_CHECKPOINTS, Zoo, ZooSource
from tests.helpers import make_checkpoint, synthetic_xray, write_film


@pytest.fixture(scope="module")
def zoo():
    return Zoo(ZooSource(DEFAULT_CHECKPOINTS))


def _png(path: Path, size: int = 128, seed: int = 0) -> str:
    return str(write_film(path, size, seed))


def test_example_films_outlive_the_cache_cleaner(zoo):
    """Gradio's delete_cache removed the cached example copies ten minutes after start; drive the cleaner
    with age 0 (everything is old enough) instead of waiting."""
    demo = build_demo(zoo)
    gallery = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "examples")
    cached = [item["image"]["path"] for item in gallery.value]
    assert len(cached) == len(default_examples()) and all(Path(p).is_file() for p in cached)
    delete_old_files(demo, 0)
    assert all(Path(p).is_file() for p in cached), "the cleaner deleted the example films"


def test_a_new_or_cleared_film_clears_every_result_view(zoo, tmp_path):
    handlers = Handlers(zoo, default_examples())
    out = handlers.on_upload(_png(tmp_path / "a.png"), zoo.names[0], None)
    assert out[3] is not None
    assert out[4:] == (FINDINGS_PLACEHOLDER, None, None, None, HEATMAP_PLACEHOLDER, COMPARE_PLACEHOLDER, None, None)
    cleared = handlers.on_upload(None, zoo.names[0], out[3])
    assert cleared[0] is None and cleared[3] is None and cleared[4:] == out[4:]


def test_compare_shows_one_task_with_operating_points_and_flags(zoo, tmp_path):
    handlers = Handlers(zoo, [])
    path = _png(tmp_path / "b.png")
    kermany = next(n for n in zoo.names if zoo.cards[n].task.startswith("kermany"))
    html, doc = handlers.compare(path, "f1", zoo.names[0], None)
    assert doc["task"] == "nih14" and all(zoo.cards[n].task == "nih14" for n in doc["results"])
    assert "operating point" in html and "overflow-x:auto" in html and "Pleural thickening" in html
    assert "Pleural_Thickening" not in html
    _, doc = handlers.compare(path, "f1", kermany, None)
    assert {zoo.cards[n].task for n in doc["results"]} == {zoo.cards[kermany].task}
    assert all(d["operating_point"] == "argmax" for d in doc["results"].values())


def test_people_read_names_not_identifiers(zoo):
    name = zoo.names[0]
    text = card_markdown(zoo.cards[name], zoo.eval_file(name))
    assert "Pleural thickening" in text and "Pleural_Thickening" not in text
    assert "{'" not in text, "a raw Python dict in the model card"
    doc = {"operating_point": "f1", "warnings": [],
           "findings": [{"name": "Pleural_Thickening", "probability": 0.4, "threshold": 0.3, "positive": True}]}
    html = findings_html(doc)
    assert "Pleural thickening" in html and "<th>probability</th>" in html and "<th>p</th>" not in html
    assert "Bold" in compare_html({"m": doc}, None)


def test_overlay_is_the_films_resolution_up_to_1024(tmp_path):
    from cxr_demo.images import read_xray
    from cxr_demo.service import DemoService

    folder = make_checkpoint(tmp_path / "ck", name="tiny")
    service = DemoService(Zoo(ZooSource(folder.parent)))
    big = tmp_path / "big.png"
    Image.fromarray((np.tile(synthetic_xray(200), (8, 10)) * 255).astype(np.uint8)).save(big)  # 2000 x 1600
    overlay, _ = service.explain(read_xray(big), "tiny", None, "gradcam")
    assert overlay.shape == (819, 1024, 3)
    small, _ = service.explain(read_xray(_png(tmp_path / "s.png", 300)), "tiny", None, "gradcam")
    assert small.shape == (300, 300, 3)


def test_card_view_shows_the_calibration_and_its_plot_and_the_table_says_what_is_shown(zoo, tmp_path):
    name = zoo.names[0]
    info = Handlers(zoo, []).model_info(name)
    assert "### Calibration" in info[3] and "Platt" in info[3] and "out of fold" in info[3] and "→" in info[3]
    assert isinstance(info[4], np.ndarray) and info[4].ndim == 3  # reliability.png under the card
    handlers = Handlers(zoo, [])
    doc, html = handlers.predict(_png(tmp_path / "a.png"), name, "f1")
    import html as html_lib

    assert "calibrated probability" in html and html_lib.escape(doc["calibration_text"]) in html
    paediatric = next(n for n in zoo.names if zoo.cards[n].task_kind == "multiclass")
    doc, html = handlers.predict(_png(tmp_path / "b.png"), paediatric, "")
    assert "top class" in html and all(r["threshold_note"] for r in doc["findings"])


def test_card_view_says_what_the_out_of_distribution_check_catches(zoo):
    card = zoo.cards["covid3-efficientnet-lite0"]
    text = card_markdown(card, zoo.eval_file(card.name))
    assert "### The right model for the film" in text and "NIH ChestX-ray14 films" in text and "false alarms" in text


def test_card_view_says_whether_the_heatmap_beats_a_box_drawn_without_the_film(zoo):
    """Every NIH card has studied heatmap defaults; the card view sets their box IoU beside the image-free box's."""
    for name in [n for n in zoo.names if zoo.cards[n].task == "nih14"]:
        card = zoo.cards[name]
        text = card_markdown(card, zoo.eval_file(name))
        assert "not studied" not in text and f"mean box IoU {card.explain_defaults.report_mean_iou:.3f}" in text
        assert ("**no better than**" in text) == (not card.explain_defaults.adds_over_image_free())


def test_old_results_are_deleted_even_while_requests_add_files(tmp_path, monkeypatch):
    """The app's cleaner deletes files older than its age (never the examples' kept copies, never young files) and
    keeps going when a request adds a file while it runs (Gradio's iterated the live set, and stopped for good)."""
    import os as os_module
    import time as time_module

    import cxr_demo.ui as ui_module

    demo = gr.Blocks()
    old, young, kept = (tmp_path / n for n in ("old.png", "young.png", "example.png"))
    for f in (old, young, kept):
        f.write_bytes(b"x")
    live = {str(old), str(young), str(kept)}
    demo.temp_file_sets = [live]
    with demo:
        shown = gr.Image()
    shown.keep_in_cache = {str(kept)}
    real_remove = os_module.remove

    def remove_while_a_request_adds(name):  # a request thread adds its overlay at this moment
        live.add(str(tmp_path / "new.png"))
        real_remove(name)

    monkeypatch.setattr(ui_module.os, "remove", remove_while_a_request_adds)
    real_lstat = Path.lstat
    monkeypatch.setattr(Path, "lstat", lambda self: os_module.stat_result(
        (*real_lstat(self)[:9], time_module.time() - (300 if self.name == "old.png" else 10))))
    assert delete_old_files(demo, 120) == 1
    assert not old.exists() and young.exists() and kept.exists()
    assert live == {str(young), str(kept), str(tmp_path / "new.png")}
    monkeypatch.undo()
    cleaner = ResultCleaner(demo, every_s=0.05, age_s=0).start()
    try:
        deadline = time_module.time() + 10
        while young.exists() and time_module.time() < deadline:
            time_module.sleep(0.05)
    finally:
        cleaner.stop()
    assert not young.exists() and kept.exists()


def test_explain_text_says_when_the_box_is_the_usual_place():
    """Under the overlay, the legend calls a box from the lung model (chest, place) what it is, not the model's box."""
    from cxr_demo.ui import explain_markdown

    doc = {"finding": "Effusion", "probability": 0.4, "method": "gradcam", "layer": "x", "box_rule": "r",
           "prior_text": "lung fields", "ground_truth_boxes": [], "iou": None, "warnings": [], "box_source": "place"}
    assert "usual place in these lungs (not the heatmap)" in explain_markdown(doc)
    assert "P = model's box" in explain_markdown(doc | {"box_source": "heatmap"})
    assert "P = model's box" in explain_markdown(doc | {"box_source": "rule"})
