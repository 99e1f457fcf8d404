"""A person in a browser: upload, predict, explain; the findings table and the overlay appear."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CHROMIUM, CHROMIUM_ARGS, NIH, synthetic_xray

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")


def test_upload_predict_explain_in_chromium(live_app, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    image = NIH / "images" / "00013118_008.png"
    if not image.is_file():
        image = tmp_path / "synthetic.png"
        Image.fromarray((synthetic_xray(256) * 255).astype(np.uint8)).save(image)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            # Not "networkidle": with a gr.State the page keeps a heartbeat stream open for the session.
            page.goto(live_app, wait_until="load")
            page.get_by_role("button", name="Predict findings").wait_for(timeout=60_000)
            page.locator("input[type=file]").first.set_input_files(str(image))
            page.get_by_text("px.", exact=False).first.wait_for(timeout=30_000)  # the "as read" note
            page.get_by_role("button", name="Predict findings").click()
            rows = page.locator(".cxr-findings tbody tr")
            rows.first.wait_for(timeout=60_000)
            assert rows.count() == 14
            assert "threshold" in page.locator(".cxr-findings thead").inner_text()
            page.screenshot(path=str(ARTIFACTS / "browser-findings.png"), full_page=True)
            open_tab(page, "Heatmap")
            page.get_by_role("button", name="Show heatmap").click()
            page.get_by_text("high attention", exact=False).first.wait_for(timeout=60_000)  # the legend
            # the yellow box is named for what it is: the model's, or the finding's usual place (lung model)
            legend = page.locator("body").inner_text()
            assert "P = model's box" in legend or "P = the finding's usual place in these lungs" in legend
            overlay = page.locator("#overlay img").first
            overlay.wait_for(timeout=30_000)
            assert overlay.evaluate("img => img.complete && img.naturalWidth") > 0
            if image.name.startswith("000"):
                page.get_by_text("IoU", exact=False).first.wait_for(timeout=30_000)  # rendered after the overlay; slow under load
            page.screenshot(path=str(ARTIFACTS / "browser-heatmap.png"), full_page=True)
            # The lung outline toggle: ticked, the overlay is redrawn with the lungs outlined and the legend says so.
            from cxr_demo.lungs import default_lung_folder

            if default_lung_folder() is not None:
                page.get_by_label("Outline the lungs").check()
                page.get_by_role("button", name="Show heatmap").click()
                page.get_by_text("lung outline", exact=False).first.wait_for(timeout=60_000)  # the legend
                assert "Anatomical prior" in page.locator("body").inner_text()
                page.screenshot(path=str(ARTIFACTS / "browser-heatmap-lungs.png"), full_page=True)
            # Predict and explain ran on the session's decoded image: the upload itself is gone from disk.
            from gradio.utils import get_upload_folder

            from cxr_demo.groundtruth import default_examples

            if image.name not in {Path(p).name for p in default_examples()}:
                assert not list(Path(get_upload_folder()).rglob(image.name))
        finally:
            browser.close()


def open_tab(page, name: str) -> None:
    """Click a tab as a visitor would: on a narrow screen Gradio moves tabs that do not fit into its '...'
    overflow menu, so open that menu first when the tab itself is hidden."""
    tab = page.get_by_role("tab", name=name)
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.locator(".overflow-menu").first.click()
    page.locator(".overflow-dropdown").get_by_text(name, exact=True).first.click()


def _synthetic(path: Path, seed: int) -> Path:
    Image.fromarray((synthetic_xray(300, seed) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.parametrize("width,height", [(1400, 1000), (420, 900)], ids=["desktop", "phone"])
def test_a_visitors_journey(live_demo, tmp_path, width, height):
    """Upload (the analysis starts by itself), findings, heatmap with and without ground truth, a second
    upload that clears the first film's results, compare and model card that fit the screen, and an example
    clicked after the cache cleaner ran. Screenshots go to artifacts/ (not committed)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from cxr_demo.groundtruth import default_examples
    from cxr_demo.ui import delete_old_files

    demo, url = live_demo
    boxed = Path(default_examples()[0])  # 00013118_008.png, official Atelectasis box
    other = _synthetic(tmp_path / "second-film.png", seed=3)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = lambda page, step: page.screenshot(path=str(ARTIFACTS / f"visitor-{width}-{step}.png"), full_page=True)  # noqa: E731
    no_page_overflow = "() => document.documentElement.scrollWidth <= window.innerWidth + 1"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, wait_until="load")
            predict = page.get_by_role("button", name="Predict findings")
            predict.wait_for(timeout=60_000)
            page.get_by_text("findings appear here", exact=False).first.wait_for(timeout=10_000)
            if width >= 1000:  # the button is in view without scrolling
                box = predict.bounding_box()
                assert box["y"] + box["height"] <= height
            assert page.locator("#examples img").count() == len(default_examples())  # thumbnails
            shot(page, "1-start")

            # Upload: findings appear without pressing Predict.
            page.locator("input[type=file]").first.set_input_files(str(boxed))
            rows = page.locator(".cxr-findings tbody tr")
            rows.first.wait_for(timeout=60_000)
            assert rows.count() == 14
            flag_header = page.locator(".cxr-findings thead th").last
            assert flag_header.inner_text().strip() == "flag" and flag_header.is_visible()
            fb = flag_header.bounding_box()
            assert fb["x"] + fb["width"] <= width, "the flag column is cut off"
            assert "Pleural_Thickening" not in page.locator(".cxr-findings").inner_text()
            assert page.evaluate(no_page_overflow)
            shot(page, "2-findings")

            # Heatmap with the radiologist's box.
            open_tab(page, "Heatmap")
            page.get_by_role("button", name="Show heatmap").click()
            page.get_by_text("IoU", exact=False).first.wait_for(timeout=60_000)
            assert page.locator(".cxr-colour-bar").count() == 1
            shot(page, "3-heatmap-truth")

            # A second film, without clearing the first: every result of the first is gone at once, then its own
            # findings arrive.
            page.get_by_role("button", name="Upload another film").wait_for(timeout=5_000)
            page.locator("input[type=file]").last.set_input_files(str(other))
            page.get_by_text("Choose a finding and press", exact=False).first.wait_for(timeout=30_000)
            assert page.locator("#overlay img").count() == 0
            page.get_by_text("300 x 300 px", exact=False).first.wait_for(timeout=30_000)
            page.get_by_role("button", name="Show heatmap").click()
            page.get_by_text("No ground-truth box", exact=False).first.wait_for(timeout=60_000)
            assert page.get_by_text("T = radiologist's box").count() == 0
            shot(page, "4-heatmap-no-truth")
            open_tab(page, "Findings")
            rows.first.wait_for(timeout=60_000)
            shot(page, "5-second-upload")
            from gradio.utils import get_upload_folder

            assert not list(Path(get_upload_folder()).rglob(other.name)), "the second film was left on disk"

            # Compare: one task's models, fitting the column (it scrolls inside, the page does not).
            open_tab(page, "Compare")
            page.get_by_role("button", name="Run every model of this task on this film").click()
            table = page.locator(".cxr-compare")
            table.wait_for(timeout=180_000)
            cb = table.bounding_box()
            assert cb["x"] >= 0 and cb["x"] + cb["width"] <= width
            assert page.evaluate(no_page_overflow)
            assert "kermany" not in table.inner_text() and "operating point" in table.inner_text()
            shot(page, "6-compare")

            open_tab(page, "Model card")
            card_text = page.get_by_text("Operating points", exact=False).first
            card_text.wait_for(timeout=10_000)
            body = page.locator("body").inner_text()
            assert "{'" not in body and "Pleural thickening" in body
            shot(page, "7-model-card")

            # The cache cleaner runs (age 0: everything is old enough), then a visitor clicks an example.
            delete_old_files(demo, 0)
            page.goto(url, wait_until="load")
            page.locator("#examples img").first.wait_for(timeout=60_000)
            page.locator("#examples img").first.click()
            page.get_by_text("Radiologist boxes available for: Atelectasis", exact=False).first.wait_for(timeout=60_000)
            rows.first.wait_for(timeout=60_000)
            assert rows.count() == 14
            assert page.get_by_text("could not be found", exact=False).count() == 0
            shot(page, "8-example-after-cleaner")
        finally:
            browser.close()
