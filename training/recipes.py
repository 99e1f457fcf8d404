"""The zoo's training recipes, and the whole zoo retrained with one command, one checkpoint after
another, timing each: the NIH ChestX-ray14 architectures, the paediatric pneumonia and COVID-19 models,
and the in-domain pretraining comparison (two pretraining checkpoints in ``pretrain/`` and four NIH
fine-tunes).

Example (the committed zoo; about 2.5 h on a 2-core CPU)::

    python -m training.recipes                      # every entry below
    python -m training.recipes --only nih14-resnet50 nih14-densenet121
    python -m training.recipes --skip-existing      # resume an interrupted retrain

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

from training.train import main as train_main

log = logging.getLogger(__name__)

# Random-init models train at a smaller input size on the CPU: with 1.2k training images they gain
# little from 224 px and each epoch costs half as much. EfficientNet-Lite keeps 224 (its ImageNet size).
NIH = ["--task", "nih14"]
# The in-domain pretraining comparison: one architecture, one input size, one recipe, four inits.
LITE0_160 = [*NIH, "--arch", "tf_efficientnet_lite0", "--input-size", "160", "--epochs", "8", "--patience", "3"]
PRETRAIN = ["--task", "pretrain", "--arch", "tf_efficientnet_lite0", "--input-size", "160", "--epochs", "3",
            "--loss", "bce", "--out", "pretrain", "--no-eval"]
# Paediatric and COVID-19 tasks: 224 px source images, trained at 128 px to fit a CPU session.
SMALL_TASK = ["--arch", "tf_efficientnet_lite0", "--init", "imagenet", "--input-size", "128", "--epochs", "5", "--patience", "2"]
RECIPES: dict[str, list[str]] = {
    "nih14-efficientnet-lite0": [*NIH, "--arch", "tf_efficientnet_lite0", "--init", "imagenet", "--epochs", "14"],
    "nih14-small-cnn": [*NIH, "--arch", "cxr_small_cnn", "--init", "random", "--epochs", "15"],
    "nih14-mobilenetv3-large": [*NIH, "--arch", "mobilenetv3_large_100", "--init", "random", "--epochs", "12"],
    "nih14-densenet121": [*NIH, "--arch", "densenet121", "--init", "random", "--input-size", "160", "--epochs", "8"],
    "nih14-resnet50": [*NIH, "--arch", "resnet50", "--init", "random", "--input-size", "160", "--epochs", "8"],
    "nih14-resnet34": [*NIH, "--arch", "resnet34", "--init", "random", "--input-size", "160", "--epochs", "8"],
    "nih14-vit-small": [*NIH, "--arch", "vit_small_patch16_224", "--init", "random", "--input-size", "160", "--epochs", "8",
                        "--lr", "5e-4", "--weight-decay", "0.05"],
    "pretrain-lite0-random": [*PRETRAIN, "--init", "random"],
    "pretrain-lite0-imagenet": [*PRETRAIN, "--init", "imagenet"],
    "nih14-lite0-160-random": [*LITE0_160, "--init", "random"],
    "nih14-lite0-160-imagenet": [*LITE0_160, "--init", "imagenet"],
    "nih14-lite0-160-indomain": [*LITE0_160, "--init", "checkpoint", "--init-from", "pretrain/pretrain-lite0-random"],
    "nih14-lite0-160-imagenet-indomain": [*LITE0_160, "--init", "checkpoint", "--init-from", "pretrain/pretrain-lite0-imagenet"],
    "kermany2-efficientnet-lite0": ["--task", "kermany2", *SMALL_TASK],
    "kermany2-efficientnet-lite0-lungcrop": ["--task", "kermany2", *SMALL_TASK, "--crop", "lung"],
    "kermany3-efficientnet-lite0-lungcrop": ["--task", "kermany3", *SMALL_TASK, "--crop", "lung", "--loss", "focal"],
    "kermany3-efficientnet-lite0": ["--task", "kermany3", *SMALL_TASK, "--loss", "focal"],
    "covid3-efficientnet-lite0": ["--task", "covid3", *SMALL_TASK],
    "nih14-efficientnet-lite1": [*NIH, "--arch", "tf_efficientnet_lite1", "--init", "imagenet", "--epochs", "8"],
    "nih14-efficientnet-lite2": [*NIH, "--arch", "tf_efficientnet_lite2", "--init", "imagenet", "--epochs", "8"],
    # The lite0-224 ablation's choice on validation (docs/ABLATION.md): frozen stem BatchNorm statistics.
    "nih14-efficientnet-lite0-stembn": [*NIH, "--arch", "tf_efficientnet_lite0", "--init", "imagenet", "--epochs", "14",
                                        "--freeze-stem-bn"],
}
# Built last from the checkpoints above (no training): members chosen on validation by greedy selection.
ENSEMBLES: dict[str, list[str]] = {
    "nih14-ensemble": ["nih14-efficientnet-lite0", "nih14-efficientnet-lite1", "nih14-efficientnet-lite2",
                       "nih14-efficientnet-lite0-stembn"],
}


def _done(name: str, entry: list[str], default_out: Path) -> bool:
    out = Path(entry[entry.index("--out") + 1]) if "--out" in entry else default_out
    return (out / name / "config.json").exists() and ("--no-eval" in entry or (out / name / "eval.json").exists())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="train just these entries")
    p.add_argument("--skip-existing", action="store_true", help="skip entries whose folder has an eval.json")
    p.add_argument("--out", type=Path, default=Path("checkpoints"))
    p.add_argument("--timings", type=Path, default=Path("docs/zoo-retrain.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    timings = json.loads(args.timings.read_text()) if args.timings.exists() else {"runs": {}}
    started = time.time()
    for name in args.only or list(RECIPES):
        if args.skip_existing and _done(name, RECIPES[name], args.out):
            log.info("skip %s (already trained)", name)
            continue
        cmd = ["--name", name, *RECIPES[name]]
        if "--out" not in cmd and args.out != Path("checkpoints"):
            cmd += ["--out", str(args.out)]
        log.info("python -m training.train %s", shlex.join(cmd))
        t0 = time.time()
        train_main(cmd)
        timings["runs"][name] = {"command": "python -m training.train " + shlex.join(cmd),
                                 "wall_seconds": round(time.time() - t0),
                                 "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                                 "date": time.strftime("%Y-%m-%d")}
        args.timings.parent.mkdir(parents=True, exist_ok=True)
        args.timings.write_text(json.dumps(timings, indent=2) + "\n")
    if not args.only:
        from training.ensemble import main as ensemble_main

        for name, candidates in ENSEMBLES.items():
            cmd = ["--name", name, "--candidates", *candidates, "--checkpoints", str(args.out), "--eval"]
            log.info("python -m training.ensemble %s", shlex.join(cmd))
            ensemble_main(cmd)
    log.info("zoo retrain done in %.0f s", time.time() - started)
    return timings


if __name__ == "__main__":
    main()
