"""Make a training run (e.g. an ablation variant chosen on validation) a zoo checkpoint, or a new version of one.

    python -m training.promote runs/ablation/nih14-lite0-a11-stembn-jpeg-consistency-1 \\
        --name nih14-efficientnet-lite0-stembn --why "retrained with --consistency 1 (docs/ABLATION.md, a11)"

Copies the run's weights, card and training log into ``checkpoints/NAME`` under the zoo name. When NAME
exists, the new card is its next major version: the old changelog is kept with the reason on top, and the
old folder's derived files (evaluation, calibration, out-of-distribution detector, plots) are removed,
since they describe other weights; re-run ``training.evaluate``, ``training.calibration``,
``training.flag_rates --retune``, ``training.ood``, ``training.localisation`` and ``training.box_sources``
afterwards (the README lists them). The run's card keeps the command that trained it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from cxr_demo.card import CARD_FILE, WEIGHTS_FILE, plain_name, read_card, write_card
from cxr_demo.models import sha256_file

CARRIED = (CARD_FILE, WEIGHTS_FILE, "train_log.jsonl")  # the card too: write_card keeps its timm fields


def promote(run: Path, name: str, why: str, checkpoints: Path = Path("checkpoints"),
            description: str | None = None) -> Path:
    """Copy ``run`` to ``checkpoints/name`` as that checkpoint's next major version; returns the folder."""
    name = plain_name(name)
    card = read_card(run)
    if sha256_file(run / WEIGHTS_FILE) != card.sha256:
        raise ValueError(f"{run / WEIGHTS_FILE} is not the file its card pins (sha256 differs)")
    if card.eval_metrics is not None or card.ood is not None or card.calibration is not None:
        raise ValueError(f"{run} is already an evaluated checkpoint; promote the training run it came from")
    folder = checkpoints / name
    if folder.exists():
        old = read_card(folder)
        if old.task != card.task or old.label_names != card.label_names:
            raise ValueError(f"{name} is a {old.task} model with its own labels and this run is a {card.task} "
                             "model: choose another name")
        description = description or old.description
    version, changelog = next_version(folder, why)
    empty_folder(folder)
    for f in CARRIED:
        if (run / f).is_file():
            shutil.copy2(run / f, folder / f)
    new = card.model_copy(update={"name": name, "version": version, "changelog": changelog,
                                  "description": description or card.description})
    write_card(new, folder)
    return folder


def next_version(folder: Path, why: str) -> tuple[str, list[str]]:
    """The version and changelog of a card about to replace ``folder``'s (1.0.0 when there is none): the next
    major version, ``why`` on top of the old changelog."""
    if not (folder / CARD_FILE).is_file():
        return "1.0.0", [f"1.0.0: {why}"]
    old = read_card(folder)
    version = f"{int(old.version.split('.')[0]) + 1}.0.0"
    return version, [f"{version}: {why}", *old.changelog]


def empty_folder(folder: Path) -> None:
    """``folder`` made (again) with nothing in it: what was there described other weights."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a training run's folder (training.train --out ... --no-eval)")
    p.add_argument("--name", required=True, help="the zoo name (a new checkpoint or a new version of one)")
    p.add_argument("--why", required=True, help="the changelog line: what changed and where it was measured")
    p.add_argument("--description", help="the card's description (default: the old checkpoint's, else the run's)")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    args = p.parse_args(argv)
    folder = promote(args.run, args.name, args.why, args.checkpoints, args.description)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
