"""Same film, same answer (#13): one NIH film as 8-bit PNG, 16-bit PNG, DICOM (MONOCHROME1 and 2, 12 and
16 bits, with and without a window) and JPEG gives the default model's probabilities within 0.02."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_demo.images import read_xray
from cxr_demo.service import DemoService
from cxr_demo.zoo import DEFAULT_CHECKPOINTS, Zoo, ZooSource
from tests.helpers import NIH
from tests.test_images import write_dicom

FILMS = ["00013118_008.png", "00000211_019.png", "00001558_016.png", "00000902_001.png"]
pytestmark = pytest.mark.skipif(not (NIH / "images" / FILMS[0]).is_file(), reason="../shared/data/nih14 is not present")


def variants(src: Path, out: Path) -> dict[str, Path]:
    v8 = np.asarray(Image.open(src).convert("L"))
    v16 = v8.astype(np.uint16) * 257
    v12 = np.round(v8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    paths = {"png8": src}
    Image.fromarray(v16).save(out / "a16.png")
    paths["png16"] = out / "a16.png"
    paths["dicom16-mono2"] = write_dicom(out / "a16.dcm", v16)
    paths["dicom16-mono1"] = write_dicom(out / "a16m1.dcm", 65535 - v16, photometric="MONOCHROME1")
    paths["dicom12-mono2"] = write_dicom(out / "a12.dcm", v12)
    paths["dicom12-window-full"] = write_dicom(out / "a12w.dcm", v12, window=(2048, 4096))
    Image.fromarray(v8).save(out / "a.jpg", quality=95)
    paths["jpeg95"] = out / "a.jpg"
    return paths


def _bits(path: Path, bits: int) -> None:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def service():
    return DemoService(Zoo(ZooSource(DEFAULT_CHECKPOINTS)))


_WORST: dict[str, dict[str, float]] = {}


def _worst_changes(service, tmp_path, film) -> dict[str, float]:
    """Per variant, the largest change of any shown probability against the 8-bit PNG (computed once per film)."""
    if film not in _WORST:
        tmp_path.mkdir(parents=True, exist_ok=True)
        _WORST[film] = _measure(service, tmp_path, film)
    return _WORST[film]


def _measure(service, tmp_path, film) -> dict[str, float]:
    paths = variants(NIH / "images" / film, tmp_path)
    for key in ("dicom16-mono2", "dicom16-mono1"):
        _bits(paths[key], 16)
    model = service.zoo.names[0]
    probs = {k: np.array([r["probability"] for r in service.predict(read_xray(p), model, "f1").document["findings"]])
             for k, p in paths.items()}
    ref = probs.pop("png8")
    return {k: float(np.abs(v - ref).max()) for k, v in probs.items()}


LOSSLESS = ("png16", "dicom16-mono2", "dicom16-mono1")


@pytest.mark.parametrize("film", FILMS)
def test_the_same_pixels_in_any_container_give_the_same_probabilities(service, tmp_path, film):
    """8-bit PNG, the same values x 257 in a 16-bit PNG or DICOM (MONOCHROME2, and MONOCHROME1 inverted):
    scaled by declared bit depth, not min-max, they agree (min-max stretching moved 2 of 14 flags before)."""
    worst = _worst_changes(service, tmp_path, film)
    assert max(worst[k] for k in LOSSLESS) <= 0.01, worst


TWELVE_BIT = ("dicom12-mono2", "dicom12-window-full")


@pytest.mark.parametrize("film", FILMS)
def test_12_bit_copies_stay_within_0_02(service, tmp_path, film):
    """12 bits requantise the 8-bit values (up to half a 12-bit step off): the shown, calibrated probabilities
    stay within 0.02 (measured 0.004-0.016 over these films; the raw ones moved by up to 0.021)."""
    worst = _worst_changes(service, tmp_path, film)
    assert max(worst[k] for k in TWELVE_BIT) <= 0.02, worst


@pytest.mark.xfail(strict=True, reason="measured with nih14-ensemble's calibrated probabilities: JPEG q95 moves them by "
                   "0.014-0.038 over these films and by more than 0.02 on 59% of validation films (docs/robustness/); "
                   "the input handling is the same, the models' sensitivity to small pixel changes (#11 item 0) fails "
                   "the bound; members retrained with --consistency 1 still moved by more than 0.02 on 38% of "
                   "validation films once calibrated (docs/robustness/candidate-ensemble-2026-11-29/)")
def test_jpeg_copies_stay_within_0_02(service, tmp_path):
    worst = {film: _worst_changes(service, tmp_path / film, film)["jpeg95"] for film in FILMS}
    assert max(worst.values()) <= 0.02, worst
