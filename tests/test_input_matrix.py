"""Every kind of odd or bad upload through the running server: a sentence or a result with a warning,
and the server answers the next request either way."""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from tests.helpers import png_declaring, synthetic_xray
from tests.test_images import write_dicom

XRAY = synthetic_xray(256)
GRAY = np.round(XRAY * 255).astype(np.uint8)


def _bomb_png(side: int = 12000) -> bytes:
    """A valid ~100 KB PNG of side x side black pixels: it decompresses to 144 MB (past Pillow's limit)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    return png_declaring(side, side, b"".join(comp.compress(row) for _ in range(side)) + comp.flush())


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    return buf.getvalue()


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(GRAY[:, :200]), "JPEG", exif=exif.tobytes(), quality=95)


def _gif() -> bytes:
    frames = [Image.fromarray(GRAY), Image.fromarray(255 - GRAY)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _photo() -> bytes:
    rng = np.random.default_rng(0)
    rgb = np.stack([np.full((200, 200), 210), rng.integers(0, 255, (200, 200)), np.full((200, 200), 40)], 2)
    return _save(Image.fromarray(rgb.astype(np.uint8)), "JPEG", quality=90)


def _dicom(tmp: Path, **kw) -> bytes:
    arr = kw.pop("arr", np.round(XRAY * 4095).astype(np.uint16))
    return write_dicom(tmp / "x.dcm", arr, **kw).read_bytes()


# name -> (file name, bytes builder, ("error", sentence part) or ("ok", warning part or None))
CASES = {
    "empty file": ("a.png", lambda t: b"", ("error", "empty")),
    "text renamed .png": ("a.png", lambda t: b"just some text\n", ("error", "not an image")),
    "HTML renamed .png": ("a.png", lambda t: b"<html><body>x</body></html>", ("error", "not an image")),
    "PDF renamed .png": ("a.png", lambda t: b"%PDF-1.4\n%%EOF\n", ("error", "not an image")),
    "ZIP renamed .png": ("a.png", lambda t: _zip(), ("error", "not an image")),
    "truncated PNG": ("a.png", lambda t: _save(Image.fromarray(GRAY), "PNG")[:4000], ("error", "damaged")),
    "truncated JPEG": ("a.jpg", lambda t: _save(Image.fromarray(GRAY), "JPEG")[:3000], ("error", "damaged")),
    "1x1 image": ("a.png", lambda t: _save(Image.new("L", (1, 1)), "PNG"), ("error", "too small")),
    "10x4000 image": ("a.png", lambda t: _save(Image.new("L", (10, 4000), 9), "PNG"), ("error", "too small")),
    "decompression bomb": ("a.png", lambda t: _bomb_png(), ("error", "too large")),
    "30000x30000 declared": ("a.png", lambda t: png_declaring(30000, 30000), ("error", "too large")),
    "16-bit PNG": ("a.png", lambda t: _save(Image.fromarray(np.round(XRAY * 4095).astype(np.uint16)), "PNG"), ("ok", "bit-depth")),
    "RGBA PNG": ("a.png", lambda t: _save(Image.fromarray(np.dstack([GRAY] * 3 + [np.full_like(GRAY, 255)]), "RGBA"), "PNG"), ("ok", "transparency")),
    "palette PNG": ("a.png", lambda t: _save(Image.fromarray(GRAY).convert("P"), "PNG"), ("ok", None)),
    "CMYK JPEG": ("a.jpg", lambda t: _save(Image.fromarray(GRAY).convert("CMYK"), "JPEG"), ("ok", None)),
    "EXIF-rotated JPEG": ("a.jpg", lambda t: _exif_rotated(), ("ok", None)),
    "animated GIF": ("a.gif", lambda t: _gif(), ("ok", "frames")),
    "TIFF": ("a.tif", lambda t: _save(Image.fromarray(GRAY), "TIFF"), ("ok", None)),
    "WebP": ("a.webp", lambda t: _save(Image.fromarray(GRAY), "WEBP", lossless=True), ("ok", None)),
    "colour photograph": ("a.jpg", lambda t: _photo(), ("ok", "colour photograph")),
    "DICOM MONOCHROME2": ("a.dcm", lambda t: _dicom(t, window=(2048, 4096)), ("ok", None)),
    "DICOM MONOCHROME1": ("a.dcm", lambda t: _dicom(t, photometric="MONOCHROME1"), ("ok", None)),
    "DICOM without pixel data": ("a.dcm", lambda t: _dicom(t, pixels=False), ("error", "no pixel data")),
    "DICOM, undecodable compression": ("a.dcm", lambda t: _dicom(t, compressed_garbage=True), ("error", "could not be decoded")),
    "multi-frame DICOM": ("a.dcm", lambda t: _dicom(t, arr=np.stack([np.round(XRAY * 4095)] * 2).astype(np.uint16), frames=2), ("ok", "frames")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_odd_input_through_the_server(client, model_name, tmp_path, case):
    file_name, build, (outcome, text) = CASES[case]
    path = tmp_path / file_name
    path.write_bytes(build(tmp_path))
    if outcome == "error":
        with pytest.raises(Exception) as info:
            client.predict(handle_file(str(path)), model_name, "f1", api_name="/predict")
        message = str(info.value)
        assert text in message and message.rstrip().endswith("."), message
        assert str(tmp_path) not in message and "Traceback" not in message
    else:
        doc, _ = client.predict(handle_file(str(path)), model_name, "f1", api_name="/predict")
        assert len(doc["findings"]) == 14
        if text:
            assert any(text in w for w in doc["warnings"]), doc["warnings"]
    good = tmp_path / "good.png"
    Image.fromarray(GRAY).save(good)
    doc, _ = client.predict(handle_file(str(good)), model_name, "f1", api_name="/predict")
    assert len(doc["findings"]) == 14  # still serving
