"""Reading uploaded chest X-rays (PNG 8/16-bit, JPEG, other Pillow formats, DICOM) safely.

Every failure becomes an :class:`ImageInputError` whose message is one sentence a clinician can act
on; odd-but-usable inputs decode with a warning instead.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 40_000_000  # about 6300 x 6300; digital radiographs are at most ~4300 x 4300
# A radiograph compresses to roughly 1-20 pixels per byte (PNG, JPEG, DICOM); a file that declares far more
# pixels than its size allows is a decompression bomb in all but name. Checked above this many pixels only.
MAX_PIXELS_PER_BYTE = 100
BOMB_CHECK_ABOVE = 4_000_000
DEFLATED_SYNTAX = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: inflated before any check
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
    tag_name: str = ""  # an NIH image name that a DICOM carries in its text tags (looked up when ``name`` is not one)

    @property
    def box_name(self) -> str:
        """The name to look radiologist boxes up by: the file's own, or the NIH name its DICOM tags carry."""
        return self.tag_name if self.tag_name and not NIH_NAME.search(self.name) else self.name

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


def _scale_by_bit_depth(a: np.ndarray, container_bits: int) -> tuple[np.ndarray, str]:
    """Integer pixels scaled by their bit depth, not by their own min-max, so one film gives the same pixels
    whatever the container: the smallest of 8, 10, 12, 14 or 16 bits (up to ``container_bits``) that holds the
    brightest pixel (12-bit data in a 16-bit PNG is scaled by 4095, 8-bit data x 257 by 65535).

    Returns:
        The pixels in [0, 1] and a sentence saying what was done.
    """
    a = a.astype(np.float32, copy=False)
    lo, hi = float(np.min(a)), float(np.max(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or lo < 0:
        return _rescale_to_unit(a), "The image holds negative or invalid values; it was stretched to its own range."
    if hi <= lo:
        raise ImageInputError("The image is a single flat colour; there is no X-ray in it to analyse.")
    bits = next((b for b in (8, 10, 12, 14, 16, 24, 32) if hi <= 2**b - 1 and b <= container_bits), container_bits)
    return a / float(2**bits - 1), f"High bit-depth image: intensities were scaled by its {bits}-bit range (0-{2**bits - 1})."


def _check_geometry(width: int, height: int, file_bytes: int | None = None) -> None:
    if width * height > BOMB_CHECK_ABOVE and file_bytes and width * height / file_bytes > MAX_PIXELS_PER_BYTE:
        raise ImageInputError(
            f"The file declares {width} x {height} pixels in only {file_bytes // 1024} KB, far more than a "
            "radiograph compresses to (a possible decompression bomb); it was refused."
        )
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


NIH_NAME = re.compile(r"\b\d{8}_\d{3}\.(?:png|jpe?g|dcm)\b", re.IGNORECASE)
# Text tags where an exporter may keep the source image's file name.
NAME_TAGS = ("ImageComments", "DerivationDescription", "SeriesDescription", "StudyDescription", "ContentLabel",
             "ReferencedFileID", "PatientID", "AccessionNumber")


def dicom_nih_name(ds) -> str:
    """An NIH ChestX-ray14 image name (``00013118_008.png``) found in a DICOM's text tags, else ''."""
    for tag in NAME_TAGS:
        value = ds.get(tag)
        text = "\\".join(map(str, value)) if isinstance(value, list | tuple) else str(value or "")
        match = NIH_NAME.search(text[:500])
        if match:
            return match.group(0)[:12] + ".png"
    return ""


def _read_dicom(path: Path) -> XRay:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    notes: list[str] = []
    file_bytes = path.stat().st_size
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        syntax = str(meta.get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - no or broken file meta: dcmread(force=True) decides below
        syntax = ""
    if syntax == DEFLATED_SYNTAX:  # pydicom would inflate the whole data set into memory before any check
        raise ImageInputError("Deflated DICOM files are not accepted (their size cannot be checked before "
                              "inflating them); please export the image uncompressed or as PNG.")
    try:
        # Elements over 1 MB (other than the pixels, read below) stay on disk: a huge private element costs nothing.
        ds = pydicom.dcmread(path, force=True, defer_size="1 MB")
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise ImageInputError("The file looks like DICOM but could not be read; it may be damaged.") from e
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageInputError("The DICOM file holds no image (it has no pixel data).")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as e:
        raise ImageInputError("The DICOM header's image size is not readable; the file may be damaged.") from e
    _check_geometry(cols, rows, file_bytes)
    if n_frames < 1 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise ImageInputError("The DICOM header declares an image layout this app cannot read "
                              f"({n_frames} frames, {samples} samples per pixel, {bits} bits).")
    uncompressed = syntax in ("", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
    if uncompressed and "PixelData" in ds and bits >= 8:
        expected = rows * cols * n_frames * samples * bits // 8
        actual = len(ds.PixelData)
        if actual < expected:
            raise ImageInputError(f"The DICOM pixel data is shorter than its header declares ({actual} of {expected} "
                                  "bytes): the file is truncated or damaged.")
        if actual >= expected + rows * cols * samples * bits // 8:
            raise ImageInputError("The DICOM file holds more pixel data than its header declares (more frames than "
                                  "NumberOfFrames says); it cannot be read reliably.")
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises several types for unsupported/compressed/broken data
        name = getattr(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None), "name", None)
        raise ImageInputError(
            f"The DICOM pixel data could not be decoded (transfer syntax: {name or 'an unknown encoding'}); "
            "please export the image uncompressed or as PNG."
        ) from e
    if n_frames > 1 and arr.ndim >= 3 and arr.shape[0] == n_frames:
        arr = arr[0]
        notes.append(f"The DICOM file has {n_frames} frames; only the first was analysed.")
    if tuple(arr.shape[:2]) != (rows, cols):
        raise ImageInputError(f"The decoded DICOM image is {arr.shape[1] if arr.ndim > 1 else '?'} x {arr.shape[0]} "
                              f"pixels but its header says {cols} x {rows}; the file is inconsistent.")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    windowed, identity_modality = False, True
    if arr.ndim == 3:  # colour DICOM (RGB/YBR): use luminance
        notes.append("The DICOM image is in colour; it was converted to grayscale.")
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        identity_modality = float(ds.get("RescaleSlope", 1) or 1) == 1 and float(ds.get("RescaleIntercept", 0) or 0) == 0
        arr = apply_modality_lut(arr, ds)
        widths = ds.get("WindowWidth")
        widths = list(widths) if isinstance(widths, pydicom.multival.MultiValue) else [widths]
        if "VOILUTSequence" not in ds and any(w is not None and (not np.isfinite(float(w)) or float(w) <= 0)
                                                for w in widths):
            notes.append("The DICOM window width is zero or negative; the window was ignored and the full "
                         "intensity range used.")
        elif "VOILUTSequence" in ds or "WindowWidth" in ds:
            try:
                arr = apply_voi_lut(arr, ds, index=0)
                windowed = True
            except (ValueError, TypeError, IndexError, ZeroDivisionError):
                notes.append("The DICOM window (VOI LUT) could not be applied; the full intensity range was used.")
    pixels = _dicom_to_unit(np.asarray(arr), ds, windowed, identity_modality, notes)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels  # MONOCHROME1: low values are white
    tag_name = dicom_nih_name(ds)
    if tag_name:
        notes.append(f"The DICOM tags name the NIH image {tag_name}; its radiologist boxes are used when the file's "
                     "own name is not an NIH name.")
    return XRay(pixels=pixels, source_format="DICOM", warnings=notes, tag_name=tag_name)


def _dicom_to_unit(arr: np.ndarray, ds, windowed: bool, identity_modality: bool, notes: list[str]) -> np.ndarray:
    """DICOM pixels to [0, 1] by what the file declares: the window's output range (BitsStored) when a VOI
    window or LUT was applied, the stored bit depth when the values are the stored ones, and only otherwise
    (a rescale slope/intercept to physical units) the image's own min-max range."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if arr.ndim == 3 or bits < 2 or bits > 32:
        return _rescale_to_unit(arr)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if windowed:
        notes.append("The DICOM window (VOI) was applied.")
    elif not identity_modality:
        notes.append("The DICOM values are rescaled to physical units; they were stretched to the image's own range.")
        return _rescale_to_unit(arr)
    a = arr.astype(np.float32, copy=False)
    if float(np.max(a)) <= float(np.min(a)):
        raise ImageInputError("The image is a single flat colour; there is no X-ray in it to analyse.")
    return np.clip((a - lo) / float(hi - lo), 0.0, 1.0)


def _colourfulness(rgb: np.ndarray) -> float:
    """Mean chroma (max - min over channels) in [0, 1]; grayscale X-rays saved as RGB give ~0."""
    return float(np.mean(rgb.max(axis=2) - rgb.min(axis=2))) / 255.0  # uint8: max >= min, no wrap-around


def _read_pillow(path: Path) -> XRay:
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked before decoding; make Pillow's bomb warning an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            fmt = im.format or "image"
            _check_geometry(*im.size, path.stat().st_size)
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
    if mode == "F":
        pixels = _rescale_to_unit(np.asarray(im, dtype=np.float32))
        notes.append("Floating-point image: intensities were stretched to its own min-max range.")
    elif mode in {"I;16", "I;16B", "I;16L", "I;16N", "I"}:
        pixels, note = _scale_by_bit_depth(np.asarray(im, dtype=np.float32), 16 if mode.startswith("I;16") else 32)
        notes.append(note)
    else:
        if mode in {"RGBA", "LA", "PA"} or (mode == "P" and "transparency" in im.info):
            notes.append("The image has transparency; transparent areas were shown on black.")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im.convert("RGBA"))
        # a one-band image has no colour: no RGB copy to measure it (13 of the 15 ms /predict spent decoding a
        # 1024 px grayscale PNG)
        chroma = 0.0 if im.mode in {"L", "1"} else _colourfulness(np.asarray(im.convert("RGB")))
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
    if head[128:132] == b"DICM":
        xray = _read_dicom(path)
    elif _is_dicom(head, path):  # named like DICOM without the DICOM preamble: maybe another format renamed
        try:
            with Image.open(path) as probe:
                fmt = probe.format
        except Exception:  # noqa: BLE001 - not a Pillow image: read it as (preamble-less) DICOM
            fmt = None
        if fmt:
            xray = _read_pillow(path)
            xray.warnings.append(f"The file is named like DICOM but is a {fmt} image; it was read as {fmt}.")
        else:
            xray = _read_dicom(path)
    else:
        xray = _read_pillow(path)
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
