"""Publish checkpoints to the Hugging Face Hub, one model repo per checkpoint, and point the Space at them.

    # push a checkpoint folder to its own repo (named like the model), record the commit in a collection file
    python -m training.hub push checkpoints/nih14-efficientnet-lite1 --org my-org --collection hub_models.json
    # to a branch (created when missing), or as a pull request instead of a commit on main
    python -m training.hub push checkpoints/nih14-efficientnet-lite1 --org my-org --revision v2
    python -m training.hub push checkpoints/nih14-efficientnet-lite1 --org my-org --create-pr
    # write the Space's front matter (models: and preload_from_hub: at the pinned commits) into README.md
    python -m training.hub space --collection hub_models.json

The app then serves those repos with ``CXR_DEMO_HUB_MODELS=hub_models.json``: it resolves each repo's
revision once at start and reads every file of a model at that commit. A repo's ``config.json`` is timm's
config and this project's card at once, so ``timm.create_model("hf-hub:my-org/<name>", pretrained=True)``
loads it too. An ensemble's repo holds only its card (members are listed by name and sha256): push its
members and list them in the collection as well.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from huggingface_hub import HfApi

from cxr_demo.card import CARD_FILE, EVAL_FILE, WEIGHTS_FILE, read_card
from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE, members_digest
from cxr_demo.models import WeightsError, sha256_file
from cxr_demo.paths import PROJECT_ROOT
from cxr_demo.zoo import HubModel, read_hub_models
from training.model_card import MODEL_CARD_FILE

log = logging.getLogger(__name__)

PUBLISHED_FILES = [CARD_FILE, WEIGHTS_FILE, EVAL_FILE, "roc.png", "train_log.jsonl", "ood.safetensors",
                   "test_predictions.npz", MODEL_CARD_FILE]
# The Hub refuses a Space whose front matter preloads more repos than this.
MAX_PRELOAD = 10
PRELOAD_FILES = [CARD_FILE, WEIGHTS_FILE, EVAL_FILE, "roc.png", "ood.safetensors"]


def check_publishable(folder: Path) -> None:
    """The folder's weights (or an ensemble's member list) match its card, and it has been evaluated.

    Raises:
        WeightsError: the sha256 in the card does not match.
        FileNotFoundError: no ``eval.json`` or model card yet.
    """
    card = read_card(folder)
    if card.architecture == ENSEMBLE_ARCHITECTURE:
        if card.sha256 != members_digest(card.model_args["members"]):
            raise WeightsError(f"{folder}: the member list does not match the card's sha256; rebuild the ensemble")
    elif sha256_file(folder / WEIGHTS_FILE) != card.sha256:
        raise WeightsError(f"{folder}: the weights' sha256 differs from the card; re-export first")
    for needed, how in ((EVAL_FILE, "python -m training.evaluate"), (MODEL_CARD_FILE, "python -m training.report")):
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"{folder} has no {needed}; run {how} before publishing")


def push_to_hub(folder: Path, repo_id: str, revision: str | None = None, create_pr: bool = False,
                private: bool = False, token: str | None = None, api: HfApi | None = None) -> dict:
    """Upload a checkpoint folder as the whole of model repo ``repo_id`` (whose name must be the model's).

    Args:
        revision: the branch to commit to; created from ``main`` when it does not exist yet.
        create_pr: open a pull request with the files instead of committing to the branch.

    Returns:
        ``{"repo", "revision", "commit", "pr_url"}``: pin ``commit`` (a pull request's commit lives on its
        ``refs/pr/N`` until merged).
    """
    folder = Path(folder)
    card = read_card(folder)
    hub_model = HubModel(repo_id, revision)
    if hub_model.name != card.name:
        raise ValueError(f"the repo must be named like the model: {repo_id!r} holds {card.name!r}")
    check_publishable(folder)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
        allow_patterns=PUBLISHED_FILES, commit_message=f"{card.name} v{card.version}", create_pr=create_pr,
    )
    result = {"repo": repo_id, "revision": revision or "main", "commit": getattr(info, "oid", None),
              "pr_url": getattr(info, "pr_url", None)}
    log.info("pushed %s to %s: %s", card.name, repo_id, result)
    return result


def update_collection(path: Path, repo_id: str, commit: str) -> None:
    """Pin ``repo_id`` at ``commit`` in a collection file (created when missing; order kept)."""
    models = list(read_hub_models(str(path))) if path.is_file() else []
    pinned = HubModel(repo_id, commit)
    models = [pinned if m.repo == repo_id else m for m in models]
    if pinned not in models:
        models.append(pinned)
    path.write_text(json.dumps({"models": [{"repo": m.repo, "revision": m.revision} for m in models]}, indent=2) + "\n")


def space_metadata(models: tuple[HubModel, ...]) -> dict:
    """The Space front matter keys for these repos: ``models`` (all) and ``preload_from_hub`` (the first
    :data:`MAX_PRELOAD`, at their pinned commits, so the Space starts with the weights already on disk)."""
    preload = []
    for m in models[:MAX_PRELOAD]:
        preload.append(" ".join([m.repo, ",".join(PRELOAD_FILES)] + ([m.revision] if m.revision else [])))
    return {"models": [m.repo for m in models], "preload_from_hub": preload}


def write_space_metadata(readme: Path, models: tuple[HubModel, ...]) -> None:
    """Set ``models`` and ``preload_from_hub`` in the YAML front matter of the Space's README."""
    from huggingface_hub import metadata_load, metadata_save

    meta = metadata_load(readme) or {}
    meta.update(space_metadata(models))
    metadata_save(readme, meta)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="push one checkpoint folder to its own model repo")
    push.add_argument("folder", type=Path)
    where = push.add_mutually_exclusive_group(required=True)
    where.add_argument("--org", help="owner; the repo is <org>/<model name>")
    where.add_argument("--repo", help="the full repo id (its name must be the model's)")
    push.add_argument("--revision", default=None, help="branch to commit to (created when missing; default main)")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--private", action="store_true")
    push.add_argument("--collection", type=Path, help="collection file in which to pin the pushed commit")
    space = sub.add_parser("space", help="write models: and preload_from_hub: into the Space's README")
    space.add_argument("--collection", type=Path, required=True)
    space.add_argument("--readme", type=Path, default=PROJECT_ROOT / "README.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.command == "push":
        repo = args.repo or f"{args.org}/{read_card(args.folder).name}"
        result = push_to_hub(args.folder, repo, args.revision, create_pr=args.create_pr, private=args.private)
        if args.collection and result["commit"] and not args.create_pr:
            update_collection(args.collection, repo, result["commit"])
        print(json.dumps(result))
    else:
        write_space_metadata(args.readme, read_hub_models(str(args.collection)))


if __name__ == "__main__":
    main()
