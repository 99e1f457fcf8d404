"""The model zoo: cards discovered in a checkpoint folder (default) or a Hugging Face Hub repo.

A model name coming from the UI or the API only ever indexes the dict of discovered cards; it is
never joined to a path.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from cxr_demo.card import (
    CARD_FILE,
    EVAL_FILE,
    WEIGHTS_FILE,
    CardError,
    ModelCard,
    checkpoint_folders,
    read_card,
    zoo_order,
)
from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE, ProbabilityEnsemble, members_digest
from cxr_demo.models import WeightsError, load_weights, sha256_file
from cxr_demo.ood import OODDetector
from cxr_demo.paths import DEFAULT_CHECKPOINTS

log = logging.getLogger(__name__)

DEFAULT_MAX_LOADED = 3


class UnknownModelError(KeyError):
    """A requested model name is not in the zoo."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence as is
        return str(self.args[0])


@dataclass(frozen=True)
class ZooSource:
    """Where cards and weights come from."""

    local_dir: Path
    hub_repo: str | None = None
    hub_revision: str | None = None

    def describe(self) -> str:
        if self.hub_repo:
            return f"Hugging Face Hub {self.hub_repo}@{self.hub_revision or 'main'}"
        return str(self.local_dir)


def source_from_env() -> ZooSource:
    """``CXR_DEMO_HUB_REPO`` (+ ``CXR_DEMO_HUB_REVISION``) selects the Hub; else ``CXR_DEMO_CHECKPOINTS``
    or the project's ``checkpoints/``."""
    local = Path(os.environ.get("CXR_DEMO_CHECKPOINTS", DEFAULT_CHECKPOINTS))
    repo = os.environ.get("CXR_DEMO_HUB_REPO") or None
    return ZooSource(local, repo, os.environ.get("CXR_DEMO_HUB_REVISION") or None)


def _hub_snapshot(repo: str, revision: str | None) -> Path:
    """Download (or find in the cache) the cards and eval files of every model in a Hub repo."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=repo, revision=revision, allow_patterns=[f"*/{CARD_FILE}", f"*/{EVAL_FILE}", "*/roc.png"]
        )
    )


class Zoo:
    """Cards of every checkpoint, and a bounded cache of loaded models.

    Args:
        source: where to look; cards are read once, weights only when a model is first used.
        max_loaded: how many models stay in memory (least recently used is dropped).
    """

    def __init__(self, source: ZooSource | None = None, max_loaded: int | None = None) -> None:
        self.source = source or source_from_env()
        self.max_loaded = max_loaded or int(os.environ.get("CXR_DEMO_MAX_LOADED_MODELS", DEFAULT_MAX_LOADED))
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._ood: dict[str, OODDetector] = {}
        self.cards: dict[str, ModelCard] = {}
        self.folders: dict[str, Path] = {}
        self.problems: dict[str, str] = {}
        root = _hub_snapshot(self.source.hub_repo, self.source.hub_revision) if self.source.hub_repo else self.source.local_dir
        for folder in checkpoint_folders(root):
            try:
                card = read_card(folder)
            except CardError as e:
                log.error("skipping checkpoint %s: %s", folder.name, e)
                self.problems[folder.name] = str(e)
                continue
            if card.name != folder.name:
                msg = f"card name {card.name!r} differs from its folder {folder.name!r}"
                log.error("skipping checkpoint %s: %s", folder.name, msg)
                self.problems[folder.name] = msg
                continue
            self.cards[card.name] = card
            self.folders[card.name] = folder
        for name in [n for n, c in self.cards.items() if c.architecture == ENSEMBLE_ARCHITECTURE]:
            try:
                self._check_ensemble(self.cards[name])
            except CardError as e:
                log.error("skipping checkpoint %s: %s", name, e)
                self.problems[name] = str(e)
                del self.cards[name], self.folders[name]
        log.info("zoo: %d models from %s", len(self.cards), self.source.describe())

    @property
    def names(self) -> list[str]:
        """Model names, the default first (:func:`cxr_demo.card.zoo_order`: by validation macro AUROC)."""
        return zoo_order(list(self.cards.values()))

    def card(self, name: str) -> ModelCard:
        """The card of a zoo model.

        Raises:
            UnknownModelError: ``name`` is not a model of this zoo (paths are never accepted).
        """
        if not isinstance(name, str) or name not in self.cards:
            shown = repr(name)[:80]
            raise UnknownModelError(
                f"Unknown model {shown}; choose one of: {', '.join(self.names) or '(the zoo is empty)'}."
            )
        return self.cards[name]

    def weights_path(self, name: str) -> Path:
        """Local path of a model's weights (downloaded from the Hub at the pinned revision if needed)."""
        card = self.card(name)
        if self.source.hub_repo:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(self.source.hub_repo, f"{card.name}/{WEIGHTS_FILE}", revision=self.source.hub_revision))
        return self.folders[name] / WEIGHTS_FILE

    def model(self, name: str) -> torch.nn.Module:
        """The loaded model (sha256-verified, strict), from the bounded cache."""
        card = self.card(name)
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        model = self._build(card)
        with self._lock:
            self._loaded[name] = model
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.max_loaded:
                dropped, _ = self._loaded.popitem(last=False)
                log.info("zoo: unloaded %s (cache holds %d)", dropped, self.max_loaded)
        return model

    def _build(self, card: ModelCard) -> torch.nn.Module:
        if card.architecture != ENSEMBLE_ARCHITECTURE:
            return load_weights(card, self.weights_path(card.name))
        # Each member is verified against its own card's sha256, which the ensemble pinned (checked
        # when the zoo was read).
        members = [load_weights(self.cards[m["name"]], self.weights_path(m["name"])) for m in card.model_args["members"]]
        return ProbabilityEnsemble(members, card.task_kind).eval()

    def _check_ensemble(self, card: ModelCard) -> None:
        """An ensemble card's members exist in this zoo, are the pinned weights, and read films as it does.

        Raises:
            CardError: which member is missing or differs, and how.
        """
        members = card.model_args.get("members")
        if not isinstance(members, list) or not members:
            raise CardError(f"ensemble {card.name!r} lists no members in model_args['members']")
        if card.sha256 != members_digest(members):
            raise CardError(f"ensemble {card.name!r}: its sha256 is not the digest of its member list; the list was "
                            "edited by hand (rebuild it with python -m training.ensemble)")
        for m in members:
            other = self.cards.get(m.get("name"))
            if other is None:
                raise CardError(f"ensemble {card.name!r}: member {m.get('name')!r} is not in the zoo")
            if other.sha256 != m.get("sha256"):
                raise CardError(f"ensemble {card.name!r}: member {other.name!r} has other weights than the pinned ones")
            same = ("task", "task_kind", "label_names", "input_size", "mean", "std", "crop")
            diff = [f for f in same if getattr(other, f) != getattr(card, f)]
            if diff:
                raise CardError(f"ensemble {card.name!r}: member {other.name!r} differs in {', '.join(diff)}")

    def ood(self, name: str) -> OODDetector | None:
        """The model's out-of-distribution detector (sha256-checked), or None if its card has none."""
        card = self.card(name)
        if card.ood is None:
            return None
        with self._lock:
            if name in self._ood:
                return self._ood[name]
        if self.source.hub_repo:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(self.source.hub_repo, f"{card.name}/{card.ood.file}", revision=self.source.hub_revision))
        else:
            path = self.folders[name] / card.ood.file
        if sha256_file(path) != card.ood.sha256:
            raise WeightsError(f"the out-of-distribution file of {card.name!r} does not match the sha256 in its card")
        detector = OODDetector.load(path)
        with self._lock:
            self._ood[name] = detector
        return detector

    @property
    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def eval_file(self, name: str) -> Path:
        """The model's evaluation file (``eval.json``; it may not exist for an unevaluated model)."""
        return self.folders[self.card(name).name] / EVAL_FILE


def load_checkpoint(folder: Path) -> torch.nn.Module:
    """The model of a local checkpoint folder (an ensemble finds its members beside it), verified as the
    app loads it."""
    folder = Path(folder)
    zoo = Zoo(ZooSource(folder.parent), max_loaded=1)
    if folder.name not in zoo.cards:
        raise CardError(zoo.problems.get(folder.name, f"no usable checkpoint in {folder}"))
    return zoo.model(folder.name)
