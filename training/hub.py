"""Publish a checkpoint folder to the Hugging Face Hub (the same folder the zoo reads).

    python -m training.hub checkpoints/nih14-efficientnet-lite0 --repo org/cxr-zoo

The folder lands as ``<name>/`` in the repo, so the app can use it with
``CXR_DEMO_HUB_REPO=org/cxr-zoo CXR_DEMO_HUB_REVISION=<commit>``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from huggingface_hub import HfApi

from cxr_demo.card import CARD_FILE, EVAL_FILE, WEIGHTS_FILE, read_card
from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE, members_digest
from cxr_demo.models import WeightsError, sha256_file
from training.model_card import MODEL_CARD_FILE

log = logging.getLogger(__name__)

PUBLISHED_FILES = [CARD_FILE, WEIGHTS_FILE, EVAL_FILE, "roc.png", "train_log.jsonl", "ood.safetensors",
                   "test_predictions.npz", MODEL_CARD_FILE]


def push_to_hub(folder: Path, repo_id: str, revision: str | None = None, token: str | None = None,
                private: bool = False, api: HfApi | None = None) -> str:
    """Upload ``folder`` to ``repo_id`` under ``<card name>/`` after checking its weights' sha256.

    Returns:
        The commit id of the upload (pin it as ``CXR_DEMO_HUB_REVISION``).
    """
    folder = Path(folder)
    card = read_card(folder)
    if card.architecture == ENSEMBLE_ARCHITECTURE:  # no weights of its own; push its members too
        if card.sha256 != members_digest(card.model_args["members"]):
            raise WeightsError(f"{folder}: the member list does not match the card's sha256; rebuild the ensemble")
    else:
        digest = sha256_file(folder / WEIGHTS_FILE)
        if digest != card.sha256:
            raise WeightsError(f"{folder}: weights sha256 {digest[:12]}... differs from the card; re-export first")
    if not (folder / EVAL_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {EVAL_FILE}; evaluate before publishing (python -m training.evaluate)")
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder), path_in_repo=card.name, repo_id=repo_id, repo_type="model", revision=revision,
        allow_patterns=PUBLISHED_FILES, commit_message=f"{card.name} v{card.version}",
    )
    commit = getattr(info, "oid", None) or str(info)
    log.info("pushed %s to %s (commit %s)", card.name, repo_id, commit)
    return commit


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--repo", required=True)
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(push_to_hub(args.folder, args.repo, args.revision, private=args.private))


if __name__ == "__main__":
    main()
