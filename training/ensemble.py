"""Build an ensemble checkpoint (members' probabilities and heatmaps averaged), chosen on validation.

    # greedy forward selection on validation among candidates, then write the card
    python -m training.ensemble --name nih14-ensemble --candidates nih14-efficientnet-lite0 \\
        nih14-efficientnet-lite1 nih14-efficientnet-lite2
    # a fixed member list
    python -m training.ensemble --name nih14-ensemble --members nih14-efficientnet-lite0 nih14-efficientnet-lite1

Members must share the task, labels, input size, crop, normalisation and validation split (the same
``val_fraction`` and seed of one task's ``train_val``). Selection starts from the best single member by
validation macro AUROC and adds, one at a time, the candidate that raises the ensemble's validation macro
AUROC most, until none does. Thresholds are tuned on the same validation images. The card pins every
member's weights sha256; ``python -m training.evaluate checkpoints/<name>`` evaluates it on test images.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from cxr_demo import INTENDED_USE
from cxr_demo.card import ModelCard, read_card, write_card
from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE, members_digest
from training.evaluate import evaluate_checkpoint
from training.metrics import macro_auroc, macro_auroc_with_finding, threshold_record, tune_card_thresholds
from training.promote import empty_folder, next_version
from training.robustness import validation_predictions

log = logging.getLogger(__name__)

def greedy_selection(y: np.ndarray, probs: dict[str, np.ndarray]) -> tuple[list[str], list[dict]]:
    """Forward selection by validation macro AUROC of the averaged probabilities; returns the members and
    the path taken (each step's candidates and scores)."""
    scores = {n: macro_auroc(y, p) for n, p in probs.items()}
    chosen = [max(scores, key=scores.get)]
    path = [{"added": chosen[0], "val_macro_auroc": scores[chosen[0]], "single_model_scores": scores}]
    while len(chosen) < len(probs):
        trial = {n: macro_auroc(y, np.mean([probs[m] for m in [*chosen, n]], axis=0)) for n in probs if n not in chosen}
        best = max(trial, key=trial.get)
        if trial[best] <= path[-1]["val_macro_auroc"]:
            break
        chosen.append(best)
        path.append({"added": best, "val_macro_auroc": trial[best], "candidates": trial})
    return chosen, path


def build_card(name: str, folders: list[Path], y: np.ndarray, probs: dict[str, np.ndarray], command: str,
               selection: list[dict] | None = None, version: tuple[str, list[str]] | None = None) -> ModelCard:
    """The ensemble's card: members pinned by sha256, thresholds and metrics from validation."""
    cards = [read_card(f) for f in folders]
    first = cards[0]
    p = np.mean([probs[c.name] for c in cards], axis=0)
    auc = macro_auroc(y, p)
    members = [{"name": c.name, "sha256": c.sha256} for c in cards]
    names = ", ".join(c.name for c in cards)
    version = version or ("1.0.0", [f"1.0.0: ensemble of {names}, chosen on validation"])
    return ModelCard(
        name=name, version=version[0], changelog=version[1],
        description=f"Average of the probabilities (and heatmaps) of {len(cards)} {first.task} models: {names}.",
        summary=f"ensemble of {len(cards)} | {first.task}: {first.training.get('n_train')} train images | "
                f"val macro AUROC {auc:.3f}",
        task=first.task, task_kind=first.task_kind, architecture=ENSEMBLE_ARCHITECTURE,
        model_args={"members": members}, label_names=first.label_names, input_size=first.input_size,
        mean=first.mean, std=first.std, crop=first.crop,
        thresholds=tune_card_thresholds(y, p, first.label_names) if first.task_kind == "multilabel" else {},
        cam_target_layer=",".join(f"members.{i}.{c.cam_target_layer}" for i, c in enumerate(cards)),
        intended_use=INTENDED_USE,
        limitations=[f"An ensemble of models trained on the same {first.training.get('n_train')} images: it shares their "
                     "limits (see each member's card); it costs one forward pass per member.",
                     *[lim for lim in first.limitations if not lim.startswith("Thresholds were tuned")],
                     f"Thresholds were tuned on the members' shared validation split ({len(y)} images)."],
        data_source=first.data_source,
        init="members: " + "; ".join(f"{c.name} ({c.init})" for c in cards),
        training={"command": command, "members": [c.name for c in cards], "selection": selection,
                  "val_macro_auroc": auc, "val_macro_auroc_findings_only": macro_auroc_with_finding(y, p),
                  "member_val_macro_auroc": {c.name: macro_auroc(y, probs[c.name]) for c in cards},
                  "thresholds": threshold_record(len(y), command),
                  **{k: first.training[k] for k in ("n_train", "n_val", "val_fraction", "seed", "split_seed", "val_positives")
                     if k in first.training}},
        license=first.license, sha256=members_digest(members),
    )


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--members", nargs="+", help="exactly these checkpoints")
    group.add_argument("--candidates", nargs="+", help="choose among these by greedy forward selection")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="where members live and the card goes")
    p.add_argument("--why", help="when the ensemble exists: what changed, for its changelog (next major version; the "
                   "old folder's evaluation, plots and OOD detector are removed, since they describe other members)")
    p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the ensemble on its task's test images afterwards")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    names = args.members or args.candidates
    y, probs = validation_predictions([args.checkpoints / n for n in names])
    selection = None
    if args.candidates:
        names, selection = greedy_selection(y, probs)
        log.info("chosen on validation: %s", names)
    if len(names) < 2:
        raise SystemExit(f"no ensemble: on validation nothing beats {names[0]} alone")
    command = "python -m training.ensemble " + " ".join(argv if argv is not None else sys.argv[1:])
    folder = args.checkpoints / args.name
    why = f"ensemble of {', '.join(names)}, chosen on validation" + (f": {args.why}" if args.why else "")
    version = next_version(folder, why)
    card = build_card(args.name, [args.checkpoints / n for n in names], y, probs, command, selection, version)
    empty_folder(folder)
    write_card(card, folder)
    log.info("wrote %s: %s", folder, card.summary)
    if args.eval:
        evaluate_checkpoint(folder)
    return folder


if __name__ == "__main__":
    main()
