"""Reading uploaded chest X-rays (PNG 8/16-bit, JPEG, other Pillow formats, DICOM) safely.

Every failure becomes an :class:`ImageInputError` whose message is one sentence a clinician can act
on; odd-but-usable inputs decode with a warning instead.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000  # about 6300 x 6300; digital radiographs are at most ~4300 x 4300
MIN_SIDE = 32
MAX_ASPECT = 4.0
ACCEPTED = "PNG, JPEG or DICOM"
# File suffixes the app accepts (Pillow formats and DICOM); the decoder looks at the content, not the name.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ".webp", ".gif")


class ImageInputError(ValueError):
    """The upload cannot be used; the message says why in one sentence."""


@dataclass
class XRay:
    """A decoded radiograph: grayscale float32 in [0, 1], bright = dense (bone white)."""

    pixels: np.ndarray
    source_format: str
    warnings: list[str] = field(default_factory=list)
    name: str = ""  # the uploaded file's name (used to look up NIH boxes), never its server path

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def to_uint8(self) -> np.ndarray:
        """The image as 8-bit grayscale for display."""
        return np.clip(np.rint(self.pixels * 255.0), 0, 255).astype(np.uint8)


def _is_dicom(head: bytes, path: Path) -> bool:
    return head[128:132] == b"DICM" or path.suffix.lower() in {".dcm", ".dicom"}


def _rescale_to_unit(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32, copy=False)
    lo, hi = float(np.min(a)), float(np.max(a))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageInputError("The image contains invalid (non-finite) pixel values.")
    if hi <= lo:
        raise ImageInputError("The image is a single flat colour; there is no X-ray in it to analyse.")
    return (a - lo) / (hi - lo)


def _check_geometry(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageInputError(
            f"The image is too large ({width} x {height} pixels); the limit is {MAX_PIXELS // 1_000_000} "
            "megapixels. Please downsample it first."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageInputError(
            f"The image is too small ({width} x {height} pixels); a chest X-ray needs at least "
            f"{MIN_SIDE} pixels on each side."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageInputError(
            f"The image is {width} x {height} pixels, far too elongated to be a chest X-ray "
            f"(aspect ratio above {MAX_ASPECT:g})."
        )


def _read_dicom(path: Path) -> XRay:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    notes: list[str] = []
    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise ImageInputError("The file looks like DICOM but could not be read; it may be damaged.") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageInputError("The DICOM file holds no image (it has no pixel data).")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    _check_geometry(cols, rows)
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises several types for unsupported/compressed/broken data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", None) or "an unknown encoding"
        raise ImageInputError(
            f"The DICOM pixel data could not be decoded (transfer syntax: {name}); "
            "please export the image uncompressed or as PNG."
        ) from e
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 and arr.ndim >= 3:
        arr = arr[0]
        notes.append(f"The DICOM file has {n_frames} frames; only the first was analysed.")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour DICOM (RGB/YBR): use luminance
        notes.append("The DICOM image is in colour; it was converted to grayscale.")
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds, index=0)
    pixels = _rescale_to_unit(np.asarray(arr))
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1: low values are white
    return XRay(pixels=pixels, source_format="DICOM", warnings=notes)


def _colourfulness(rgb: np.ndarray) -> float:
    """Mean chroma (max - min over channels) in [0, 1]; grayscale X-rays saved as RGB give ~0."""
    rgb = rgb.astype(np.float32) / 255.0
    return float(np.mean(rgb.max(axis=2) - rgb.min(axis=2)))


def _read_pillow(path: Path) -> XRay:
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked before decoding; make Pillow's bomb warning an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            fmt = im.format or "image"
            _check_geometry(*im.size)
            if getattr(im, "n_frames", 1) > 1:
                notes.append(f"The {fmt} file has {im.n_frames} frames; only the first was analysed.")
                im.seek(0)
            im.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(
            f"The image is too large: it declares more than {MAX_PIXELS // 1_000_000} megapixels (a possible "
            "decompression bomb) and was refused."
        ) from e
    except UnidentifiedImageError as e:
        raise ImageInputError(f"The file is not an image this app can read; please upload {ACCEPTED}.") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError("The image file is damaged or incomplete (it could not be decoded).") from e

    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}:
        pixels = _rescale_to_unit(np.asarray(im, dtype=np.float32))
        if mode != "F":
            notes.append("High bit-depth image: intensities were rescaled to its own min-max range.")
    else:
        if mode in {"RGBA", "LA", "PA"} or (mode == "P" and "transparency" in im.info):
            notes.append("The image has transparency; transparent areas were shown on black.")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im.convert("RGBA"))
        rgb = np.asarray(im.convert("RGB"))
        chroma = _colourfulness(rgb)
        if chroma > 0.08:
            notes.append(
                "This looks like a colour photograph, not a chest X-ray; the findings below are "
                "probably meaningless."
            )
        gray = np.asarray(im.convert("L"), dtype=np.float32)
        if gray.max() <= gray.min():
            raise ImageInputError("The image is a single flat colour; there is no X-ray in it to analyse.")
        pixels = gray / 255.0
    return XRay(pixels=np.ascontiguousarray(pixels, dtype=np.float32), source_format=fmt, warnings=notes)


def read_xray(path: str | Path | None) -> XRay:
    """Decode an uploaded file into a grayscale radiograph.

    Raises:
        ImageInputError: nothing was uploaded, or the file is empty, too big, not an image, damaged, or
            implausible.
    """
    if path is None or not str(path).strip():
        raise ImageInputError("No image was uploaded; please choose a PNG, JPEG or DICOM chest X-ray.")
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageInputError("The uploaded file could not be found on the server; please upload it again.") from e
    if size == 0:
        raise ImageInputError("The file is empty (0 bytes).")
    if size > MAX_FILE_BYTES:
        raise ImageInputError(
            f"The file is {size / 2**20:.0f} MB; the limit is {MAX_FILE_BYTES // 2**20} MB."
        )
    with open(path, "rb") as f:
        head = f.read(132)
    xray = _read_dicom(path) if _is_dicom(head, path) else _read_pillow(path)
    xray.name = path.name
    return xray


Crop = tuple[float, float, float, float]  # top, bottom, left, right as fractions of the image


def crop_rect(width: int, height: int, crop: Crop) -> tuple[int, int, int, int]:
    """The pixel rectangle ``(x0, y0, x1, y1)`` (end exclusive) that a card's ``crop`` cuts from a
    ``width`` x ``height`` image: used to crop the input and to place a heatmap back on the image."""
    top, bottom, left, right = crop
    return int(round(left * width)), int(round(top * height)), int(round(right * width)), int(round(bottom * height))


def resize_gray(pixels: np.ndarray, size: int, crop: Crop | None = None) -> np.ndarray:
    """Crop (fractions top, bottom, left, right) then resize a float image to ``size`` x ``size``.

    The same function prepares training and inference inputs, so both see identical resampling.
    """
    if crop is not None:
        x0, y0, x1, y1 = crop_rect(pixels.shape[1], pixels.shape[0], crop)
        pixels = pixels[y0:y1, x0:x1]
    im = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32))
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
