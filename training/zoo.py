"""Retrain the NIH ChestX-ray14 zoo with one command, one checkpoint after another, timing each.

Example (the committed zoo; about 1.5 h on a 2-core CPU)::

    python -m training.zoo                      # every entry below
    python -m training.zoo --only nih14-resnet50 nih14-densenet121
    python -m training.zoo --skip-existing      # resume an interrupted retrain

Each entry is an ordinary ``python -m training.train`` command (printed before it runs), so any one
checkpoint can be reproduced on its own. Wall times go to ``docs/zoo-retrain.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Random-init models train at a smaller input size on the CPU: with 1.2k training images they gain
# little from 224 px and each epoch costs half as much. EfficientNet-Lite keeps 224 (its ImageNet size).
ZOO: dict[str, list[str]] = {
    "nih14-efficientnet-lite0": ["--arch", "tf_efficientnet_lite0", "--init", "imagenet", "--epochs", "14"],
    "nih14-small-cnn": ["--arch", "cxr_small_cnn", "--init", "random", "--epochs", "15"],
    "nih14-mobilenetv3-large": ["--arch", "mobilenetv3_large_100", "--init", "random", "--epochs", "12"],
    "nih14-densenet121": ["--arch", "densenet121", "--init", "random", "--input-size", "160", "--epochs", "8"],
    "nih14-resnet50": ["--arch", "resnet50", "--init", "random", "--input-size", "160", "--epochs", "8"],
    "nih14-vit-small": ["--arch", "vit_small_patch16_224", "--init", "random", "--input-size", "160", "--epochs", "8",
                        "--lr", "5e-4", "--weight-decay", "0.05"],
    "nih14-efficientnet-lite1": ["--arch", "tf_efficientnet_lite1", "--init", "imagenet", "--epochs", "10"],
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(ZOO), help="train just these entries")
    p.add_argument("--skip-existing", action="store_true", help="skip entries whose folder has an eval.json")
    p.add_argument("--out", type=Path, default=Path("checkpoints"))
    p.add_argument("--timings", type=Path, default=Path("docs/zoo-retrain.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from training.train import main as train_main

    timings = json.loads(args.timings.read_text()) if args.timings.exists() else {"runs": {}}
    started = time.time()
    for name in args.only or list(ZOO):
        if args.skip_existing and (args.out / name / "eval.json").exists():
            log.info("skip %s (already trained)", name)
            continue
        cmd = ["--task", "nih14", "--name", name, *ZOO[name]] + (["--out", str(args.out)] if args.out != Path("checkpoints") else [])
        log.info("python -m training.train %s", shlex.join(cmd))
        t0 = time.time()
        train_main(cmd)
        timings["runs"][name] = {"command": "python -m training.train " + shlex.join(cmd),
                                 "wall_seconds": round(time.time() - t0),
                                 "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                                 "date": time.strftime("%Y-%m-%d")}
        args.timings.parent.mkdir(parents=True, exist_ok=True)
        args.timings.write_text(json.dumps(timings, indent=2) + "\n")
    log.info("zoo retrain done in %.0f s", time.time() - started)
    return timings


if __name__ == "__main__":
    main()
