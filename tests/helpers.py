"""Builders for offline test fixtures (tiny checkpoints, synthetic radiograph-like images, fake data
layouts) and the plain-HTTP client the README documents."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from cxr_demo.cam import default_cam_layer
from cxr_demo.card import OPERATING_POINTS, WEIGHTS_FILE, ModelCard, write_card
from cxr_demo.groundtruth import nih_folder
from cxr_demo.labels import NIH14_LABELS
from cxr_demo.models import sha256_file

NIH = nih_folder()

def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for servers the tests and benchmarks start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Debian's Chromium, driven by Playwright (no browser download), with the flags this closed network needs.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def make_checkpoint(root: Path, name: str = "tiny", arch: str = "test_efficientnet",
                    labels: list[str] | None = None, seed: int = 0, input_size: int = 64,
                    model_args: dict | None = None) -> Path:
    """Write a random-weight checkpoint folder with a valid card; returns the folder."""
    labels = list(labels or NIH14_LABELS)
    torch.manual_seed(seed)
    model_args = {"in_chans": 1, **(model_args or {})}
    model = timm.create_model(arch, pretrained=False, num_classes=len(labels), **model_args)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    card = ModelCard(
        name=name, version="0.0.1", changelog=["test"], description="test model", summary=f"{arch} test",
        task="nih14", task_kind="multilabel", architecture=arch, model_args=model_args, label_names=labels,
        input_size=input_size, mean=0.5, std=0.25,
        thresholds={op: {lab: 0.5 for lab in labels} for op in OPERATING_POINTS},
        cam_target_layer=default_cam_layer(arch), data_source="none", init="random", license="CC0-1.0",
        sha256=sha256_file(folder / WEIGHTS_FILE),
    )
    write_card(card, folder)
    return folder


def make_lung_checkpoint(root: Path, name: str = "lungs-tiny", seed: int = 0, input_size: int = 64) -> Path:
    """Write a random-weight lung-field model (U-Net on timm's test_efficientnet) with a valid card."""
    from cxr_demo.lungs import LungCard, create_unet, write_lung_card

    torch.manual_seed(seed)
    decoder = [16, 8, 8, 8, 8]
    model = create_unet("tu-test_efficientnet", decoder)
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    card = LungCard(name=name, version="0.0.1", description="test", summary="test", encoder="tu-test_efficientnet",
                    decoder_channels=decoder, input_size=input_size, mean=0.5, std=0.25, data_source="none",
                    init="random", intended_use="tests", license="CC0-1.0", sha256=sha256_file(folder / WEIGHTS_FILE))
    write_lung_card(card, folder)
    return folder


class FixedLungs:
    """A stand-in lung model whose mask is given (a (S, S) boolean array): the prior on known masks."""

    def __init__(self, mask: np.ndarray) -> None:
        from cxr_demo.lungs import LungCard

        self.mask = mask
        self.card = LungCard(name="fixed", version="0", description="t", summary="t", encoder="tu-test_efficientnet",
                             decoder_channels=[16, 8, 8, 8, 8], input_size=mask.shape[0], mean=0.5, std=0.25,
                             data_source="none", init="none", intended_use="tests", license="CC0-1.0", sha256="0" * 64)

    def segment(self, pixels, views: bool = False):
        from cxr_demo.lungs import LungResult

        return LungResult(self.mask.astype(np.float32), self.mask.copy())


def two_lungs(size: int = 64) -> np.ndarray:
    """A mask with two lung-like rectangles, a gap (the mediastinum) between them."""
    m = np.zeros((size, size), dtype=bool)
    m[size // 8 : size * 3 // 4, size // 8 : size * 3 // 8] = True
    m[size // 8 : size * 3 // 4, size * 5 // 8 : size * 7 // 8] = True
    return m


def write_film(path: Path, size: int = 256, seed: int = 0) -> Path:
    """:func:`synthetic_xray` saved as an 8-bit PNG at ``path``."""
    Image.fromarray((synthetic_xray(size, seed) * 255).astype(np.uint8)).save(path)
    return path


def synthetic_xray(size: int = 256, seed: int = 0) -> np.ndarray:
    """A grayscale chest-like image in [0, 1]: dark lungs in a bright body, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((xx - 0.5) / 0.45) ** 2 + ((yy - 0.55) / 0.55) ** 2) * 2)
    lungs = sum(np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.45) / 0.25) ** 2) * 2) for cx in (0.32, 0.68))
    img = 0.2 + 0.6 * body - 0.4 * lungs + 0.03 * rng.standard_normal((size, size))
    return np.clip(img, 0, 1).astype(np.float32)


def make_fake_nih(root, n_train=48, n_test=16, size=96):
    """An NIH-layout folder: labels table, official split lists, box list and PNG images."""
    nih = root / "nih14"
    (nih / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, train, test, boxes = [], [], [], []
    for i in range(n_train + n_test):
        patient = i // 2 + 1
        name = f"{patient:08d}_{i % 2:03d}.png"
        findings = [lab for lab in NIH14_LABELS if rng.random() < 0.3] or ["No Finding"]
        img = synthetic_xray(size, seed=i)
        if "Effusion" in findings:  # something learnable: a bright lower-left blob
            img[size // 2 :, : size // 3] += 0.3
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(nih / "images" / name)
        rows.append([name, "|".join(findings), 0, patient, 50, "M", "PA", 1024, 1024, 0.14, 0.14])
        (test if i >= n_train else train).append(name)
        if i >= n_train and findings != ["No Finding"]:
            f = findings[0] if findings[0] != "Infiltration" else "Infiltrate"
            boxes.append([name, f, 100, 200, 300, 250, "", "", ""])
    with open(nih / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(rows)
    with open(nih / "BBox_List_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""])
        w.writerows(boxes)
    (nih / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (nih / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def train_tiny(*argv):
    """``training.train`` on one thread at 48 px in batches of 8 (arguments may be paths or numbers)."""
    from training.train import main as train_main

    return train_main(["--threads", "1", "--batch-size", "8", "--input-size", "48", *map(str, argv)])


def tiny_nih_training(tmp_path: Path, monkeypatch) -> list:
    """A fake NIH layout under ``tmp_path`` with the image cache and working folder there too; returns the
    :func:`train_tiny` arguments of a 2-epoch random-init run on it into ``tmp_path / "ck"`` (add ``--name``)."""
    monkeypatch.setenv("CXR_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    data = make_fake_nih(tmp_path / "data")
    return ["--data-root", data, "--arch", "test_efficientnet", "--init", "random", "--out", tmp_path / "ck",
            "--no-eval", "--epochs", "2", "--val-fraction", "0.25"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 8-bit gray pixels, with ``idat`` as its data
    (a decompression-bomb shape when the size is huge and the data tiny)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = png_chunk(b"IDAT", idat) if idat else b""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + data + png_chunk(b"IEND", b"")


def make_fake_kermany_covid(root, per_class=8, size=64):
    """Kermany (``train``/``test`` x ``NORMAL``/``PNEUMONIA``, bacterial and viral by file name) and
    COVID-19 (``COVID``/``Normal``) folders of synthetic JPEGs with a learnable difference per class."""
    rng = np.random.default_rng(1)

    def save(path, brighten):
        img = synthetic_xray(size, seed=int(rng.integers(1 << 30))) + brighten
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8)).save(path)

    for split in ("train", "test"):
        n = per_class if split == "train" else per_class // 2
        offset = 0 if split == "train" else 500
        for i in range(n):
            save(root / "kermany" / split / "NORMAL" / f"IM-{offset + i:04d}-0001.jpeg", 0.0)
            save(root / "kermany" / split / "PNEUMONIA" / f"person{offset + i}_bacteria_{i}.jpeg", 0.25)
            save(root / "kermany" / split / "PNEUMONIA" / f"person{offset + 100 + i}_virus_{i}.jpeg", -0.2)
    for i in range(per_class):
        save(root / "covid19" / "COVID" / f"COVID-{i}.jpg", 0.3)
        save(root / "covid19" / "Normal" / f"Normal-{i}.jpg", 0.0)
    return root


def call_event(http, url: str, api_name: str, data: list, headers: dict | None = None) -> tuple[str | None, object]:
    """POST one call of a named endpoint and read its server-sent events: ``("complete", the decoded outputs)``
    or ``("error", the raw error text)``."""
    r = http.post(f"{url}gradio_api/call/{api_name}", json={"data": data}, headers=headers or {})
    r.raise_for_status()
    kind = None
    with http.stream("GET", f"{url}gradio_api/call/{api_name}/{r.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                return kind, json.loads(line[5:]) if kind == "complete" else line[5:]
    return kind, None


def http_call(http, url: str, api_name: str, image: Path, *args) -> list:
    """One request over Gradio's plain HTTP API, as ``curl`` would make it: upload the file, POST the call,
    read the server-sent events until ``complete`` (and fetch a returned image, as gradio_client does).
    No client library: this separates what gradio_client adds from what the server takes."""
    with open(image, "rb") as f:
        r = http.post(url + "gradio_api/upload", files={"files": (image.name, f)})
    r.raise_for_status()
    file = {"path": r.json()[0], "meta": {"_type": "gradio.FileData"}}
    kind, data = call_event(http, url, api_name, [file, *args])
    if kind != "complete":
        raise RuntimeError(f"{api_name}: {data}")
    for out in data:
        if isinstance(out, dict) and out.get("url"):
            http.get(out["url"]).raise_for_status()
    return data
