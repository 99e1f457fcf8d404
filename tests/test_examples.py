"""The example films shipped with the app: at most 8 NIH official-test images with attribution and boxes,
found (with their boxes) without the shared data folder, and the only files the server lets a browser read."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_demo.groundtruth import EXAMPLES_DIR, NIH_BOX_FILE, default_examples, nih_boxes_for
from cxr_demo.paths import PROJECT_ROOT
from tests.helpers import NIH


def test_at_most_eight_small_nih_films_with_attribution_and_boxes():
    films = default_examples()
    assert 1 <= len(films) <= 8 and all(Path(p).parent == EXAMPLES_DIR for p in films)
    for p in films:
        with Image.open(p) as im:
            assert max(im.size) <= 1024
    readme = (EXAMPLES_DIR / "README.md").read_text()
    assert "NIH Clinical Center" in readme and "Wang" in readme
    with open(EXAMPLES_DIR / "labels.csv", newline="") as f:
        assert {row["Image Index"] for row in csv.DictReader(f)} == {Path(p).name for p in films}


@pytest.mark.skipif(not (NIH / "test_list.txt").is_file(), reason="../shared/data/nih14 is not present")
def test_examples_are_official_test_images_never_training_ones():
    test = set((NIH / "test_list.txt").read_text().split())
    assert {Path(p).name for p in default_examples()} <= test


def test_examples_and_their_boxes_work_without_the_shared_data(monkeypatch, tmp_path):
    from cxr_demo.groundtruth import read_box_list

    monkeypatch.setenv("CXR_DEMO_DATA_ROOT", str(tmp_path / "no-data-here"))
    read_box_list.cache_clear()
    films = default_examples()
    assert films and Path(films[0]).name == "00013118_008.png"  # boxed films first
    boxes = nih_boxes_for(Path(films[0]).name, 384, 384)
    assert [f for f, _ in boxes] == ["Atelectasis"]
    with open(EXAMPLES_DIR / NIH_BOX_FILE, newline="") as f:
        official = next(r for r in csv.reader(f) if r[0] == "00013118_008.png")
    assert boxes[0][1] == pytest.approx(tuple(float(v) * 384 / 1024 for v in official[2:6]))


def test_the_server_may_read_the_example_files_only():
    from cxr_demo.ui import launch_kwargs

    allowed = launch_kwargs()["allowed_paths"]
    assert sorted(allowed) == sorted(str(Path(p).resolve()) for p in default_examples())
    assert all(Path(p).is_file() for p in allowed)


@pytest.mark.parametrize("name", ["00013118_008.png", "00013118_008.jpg", "00013118_008.dcm", "00013118_008.JPEG"])
def test_radiologist_boxes_are_found_whatever_the_extension(name):
    from cxr_demo.groundtruth import boxed_findings

    assert boxed_findings(name) == ["Atelectasis"] and len(nih_boxes_for(name, 384, 384)) == 1


@pytest.mark.parametrize("tag", ["ImageComments", "StudyDescription", "PatientID"])
def test_a_dicom_that_names_the_nih_image_in_its_tags_finds_its_boxes(tmp_path, tag):
    """#13 item 4: an exported DICOM whose file name says nothing ('scan.dcm') but whose tags carry the NIH name."""
    import pydicom

    from cxr_demo.images import read_xray
    from tests.test_images import write_dicom

    path = write_dicom(tmp_path / "scan.dcm", (np.arange(128 * 128).reshape(128, 128) % 4096).astype(np.uint16))
    ds = pydicom.dcmread(path)
    setattr(ds, tag, "exported from 00013118_008.png by a viewer")
    ds.save_as(path, enforce_file_format=True)
    xray = read_xray(path)
    assert xray.name == "scan.dcm" and xray.box_name == "00013118_008.png"
    assert any("00013118_008.png" in w for w in xray.warnings)
    assert len(nih_boxes_for(xray.box_name, xray.width, xray.height)) == 1
    plain = read_xray(write_dicom(tmp_path / "plain.dcm", (np.arange(128 * 128).reshape(128, 128) % 977).astype(np.uint16)))
    assert plain.tag_name == "" and plain.box_name == "plain.dcm"


def test_the_running_server_serves_the_example_films_and_nothing_beside_them(live_app):
    """#14 item 9 through the server: ``/gradio_api/file=`` gives an example film, but not another film of the NIH
    image folder (the folder was allowed before), nor the project's labels or weights."""
    import httpx

    examples = [Path(p).resolve() for p in default_examples()]
    assert examples
    beside = [p for p in sorted((NIH / "images").glob("*.png"))[:50] if p.resolve() not in examples][:2]
    others = [*beside, examples[0].parent / "labels.csv", PROJECT_ROOT / "app.py",
              *sorted((PROJECT_ROOT / "checkpoints").glob("*/model.safetensors"))[:1]]
    with httpx.Client(timeout=60) as http:
        assert http.get(f"{live_app}gradio_api/file={examples[0]}").status_code == 200
        for path in others:
            assert path.is_file(), path
            assert http.get(f"{live_app}gradio_api/file={path.resolve()}").status_code >= 400, path
