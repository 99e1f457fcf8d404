"""Training throughput per architecture: images/s of one optimiser step, against the chip's rate.

For each architecture: forward+backward+AdamW step on a batch of one-channel images at the given size,
channels-last (and bf16/fp16 autocast on CUDA), median over timed steps after warm-up. The model's
training FLOPs per image are 3x the forward FLOPs counted by ``torch.utils.flop_counter``; the chip's rate
is a large float32 matmul measured in the same run, so the last column says what fraction of the
chip's dense-matmul rate the training step reaches.

Example::

    python -m bench.training_step --size 224 --batch-size 16 --markdown docs/bench/training-cpu2.md
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from training.models import create_training_model

log = logging.getLogger(__name__)

# The zoo's architectures (training/recipes.py trains these on NIH).
DEFAULT_ARCHS = [
    "tf_efficientnet_lite0", "tf_efficientnet_lite1", "mobilenetv3_large_100", "resnet34", "resnet50",
    "densenet121", "swin_tiny_patch4_window7_224", "vit_small_patch16_224", "cxr_small_cnn",
]


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 matmul rate in GFLOP/s (TF32 off) — the chip's rate this benchmark compares to."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_flops_per_image(model: torch.nn.Module, size: int) -> float:
    """Training FLOPs of one image: 3x the forward FLOPs counted by torch's FlopCounterMode.

    The usual backward = 2x forward rule; counting the backward pass directly is wrong for depthwise
    convolutions on torch 2.14 (EfficientNet-Lite0 came out at 43x its forward cost).
    """
    x = torch.randn(1, 1, size, size)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return 3.0 * counter.get_total_flops()


def bench_arch(arch: str, size: int, batch_size: int, steps: int, device: torch.device) -> dict:
    """Time optimiser steps of one architecture; returns a row of the table."""
    model = create_training_model(arch, num_classes=14, drop_rate=0.0)
    params = sum(p.numel() for p in model.parameters())
    flops = train_flops_per_image(model, size)
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 1, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch_size, 14, device=device) < 0.1).float()
    amp = device.type == "cuda"
    times = []
    for i in range(steps + 2):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    ips = batch_size / step
    return {"arch": arch, "params_m": round(params / 1e6, 2), "train_gflops_per_image": round(flops / 1e9, 2),
            "images_per_s": round(ips, 1), "achieved_gflops": round(ips * flops / 1e9, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=DEFAULT_ARCHS)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--markdown", type=Path, help="also write the table (and a .json beside it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    device = torch.device(args.device)
    chip = matmul_rate(device)
    rows = []
    for arch in args.archs:
        row = bench_arch(arch, args.size, args.batch_size, args.steps, device)
        row["fraction_of_matmul_rate"] = round(row["achieved_gflops"] / chip, 3)
        log.info("%s", row)
        rows.append(row)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    lines = [
        f"Training step throughput at {args.size} px, batch {args.batch_size}, channels-last"
        f"{', bf16 autocast' if device.type == 'cuda' else ', float32'} on {where}; torch {torch.__version__}, "
        f"timm {timm.__version__}. Chip rate (float32 {2048}x{2048} matmul): {chip:.0f} GFLOP/s.",
        "",
        "| architecture | params (M) | train GFLOPs / image | images/s | achieved GFLOP/s | fraction of matmul rate |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['arch']} | {r['params_m']} | {r['train_gflops_per_image']} | {r['images_per_s']} | "
              f"{r['achieved_gflops']} | {r['fraction_of_matmul_rate']} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n\nReproduce: `python -m bench.training_step " + " ".join(argv or []) + "`\n")
        args.markdown.with_suffix(".json").write_text(json.dumps(
            {"device": where, "size": args.size, "batch_size": args.batch_size, "matmul_gflops": chip, "rows": rows},
            indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
