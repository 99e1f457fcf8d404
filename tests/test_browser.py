"""A person in a browser: upload, predict, explain; the findings table and the overlay appear."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import NIH, synthetic_xray

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )
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
            page.get_by_role("tab", name="Heatmap").click()
            page.get_by_role("button", name="Show heatmap").click()
            page.get_by_text("model's box", exact=False).first.wait_for(timeout=60_000)
            overlay = page.locator("#overlay img").first
            overlay.wait_for(timeout=30_000)
            assert overlay.evaluate("img => img.complete && img.naturalWidth") > 0
            if image.name.startswith("000"):
                page.get_by_text("IoU", exact=False).first.wait_for(timeout=5_000)
            page.screenshot(path=str(ARTIFACTS / "browser-heatmap.png"), full_page=True)
            # Predict and explain ran on the session's decoded image: the upload itself is gone from disk.
            from gradio.utils import get_upload_folder

            from cxr_demo.groundtruth import default_examples

            if image.name not in {Path(p).name for p in default_examples()}:
                assert not list(Path(get_upload_folder()).rglob(image.name))
        finally:
            browser.close()
