"""The model zoo: cards discovered in a checkpoint folder (default) or in Hugging Face Hub model repos.

On the Hub each model is its own repo named like the model (``org/nih14-efficientnet-lite1``): a
``config.json`` that is both timm's config and this project's card, ``model.safetensors``, ``eval.json``,
plots and a generated ``README.md``. The zoo reads a list of such repos (``CXR_DEMO_HUB_MODELS``: a
collection file or ``repo[@revision]`` items), resolves each repo's revision to one commit when it starts,
and downloads every later file of that model at that commit, so one model never mixes two commits.

A model name coming from the UI or the API only ever indexes the dict of discovered cards; it is
never joined to a path.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
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
from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE, MEMBER_SHARED_FIELDS, ProbabilityEnsemble, members_digest
from cxr_demo.models import WeightsError, for_inference, load_weights, sha256_file
from cxr_demo.ood import OODDetector
from cxr_demo.paths import DEFAULT_CHECKPOINTS

log = logging.getLogger(__name__)

DEFAULT_MAX_LOADED = 3
# The sha256 of every shipped model's weights (and OOD file), kept in the package, away from the cards: a card
# and weights changed together in checkpoints/ no longer load in the app. training.report writes it.
PINS_FILE = Path(__file__).resolve().parent / "pinned_weights.json"


def read_pins(path: Path = PINS_FILE) -> dict[str, dict[str, str | None]] | None:
    """``{model name: {"sha256": ..., "ood_sha256": ... or None}}`` of the shipped checkpoints (None, with a
    warning, when the file is missing: then only the cards' own sha256 protect the weights)."""
    if not path.is_file():
        log.warning("no %s: weights are checked against their cards only", path.name)
        return None
    return json.loads(path.read_text())["models"]


class UnknownModelError(KeyError):
    """A requested model name is not in the zoo."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence as is
        return str(self.args[0])


class ModelUnavailableError(UnknownModelError):
    """A listed model could not be loaded (damaged or mismatched files); it has been withdrawn from the zoo."""


HUB_MODELS_ENV = "CXR_DEMO_HUB_MODELS"
# What the zoo reads of each repo when it starts; weights and the OOD file follow at the same commit when used.
HUB_CARD_FILES = [CARD_FILE, EVAL_FILE, "roc.png", "README.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_REVISION = re.compile(r"^[\w.\-/]{1,200}$")


@dataclass(frozen=True)
class HubModel:
    """One model repo on the Hub and the revision to read (a commit id is best; ``None`` means ``main``)."""

    repo: str
    revision: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.repo, str) or not _REPO_ID.match(self.repo) or ".." in self.repo:
            raise CardError(f"{self.repo!r} is not a Hub model id of the form org/name")
        if self.revision is not None and (not isinstance(self.revision, str) or not _REVISION.match(self.revision)
                                          or ".." in self.revision):
            raise CardError(f"{self.revision!r} is not a revision (a branch, tag or commit id)")

    @property
    def name(self) -> str:
        """The zoo name: the repo's name, which must equal the card's ``name``."""
        return self.repo.split("/", 1)[1]

    def spec(self) -> str:
        return f"{self.repo}@{self.revision}" if self.revision else self.repo


def read_hub_models(value: str) -> tuple[HubModel, ...]:
    """Hub model repos from a collection file (JSON ``{"models": [{"repo": ..., "revision": ...}]}``, as
    ``python -m training.hub push --collection`` writes it) or from ``repo[@revision]`` items separated by
    commas or spaces.

    Raises:
        CardError: the file or an item cannot be read as Hub models.
    """
    value = value.strip()
    path = Path(value)
    if value.endswith(".json") or path.is_file():
        try:
            items = json.loads(path.read_text())["models"]
            return tuple(HubModel(m["repo"], m.get("revision")) for m in items)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CardError(f"cannot read the Hub model list {path}: {e}") from e
    models = []
    for item in re.split(r"[,\s]+", value):
        if item:
            repo, _, revision = item.partition("@")
            models.append(HubModel(repo, revision or None))
    return tuple(models)


@dataclass(frozen=True)
class ZooSource:
    """Where cards and weights come from: a local folder of checkpoint folders, or Hub model repos."""

    local_dir: Path
    hub_models: tuple[HubModel, ...] = ()

    def describe(self) -> str:
        if self.hub_models:
            return "Hugging Face Hub " + ", ".join(m.spec() for m in self.hub_models)
        return str(self.local_dir)


def source_from_env() -> ZooSource:
    """``CXR_DEMO_HUB_MODELS`` (a collection file or ``repo[@revision]`` items) selects the Hub; else
    ``CXR_DEMO_CHECKPOINTS`` or the project's ``checkpoints/``."""
    local = Path(os.environ.get("CXR_DEMO_CHECKPOINTS", DEFAULT_CHECKPOINTS))
    hub = os.environ.get(HUB_MODELS_ENV, "").strip()
    return ZooSource(local, read_hub_models(hub) if hub else ())


def _hub_card_folder(model: HubModel) -> tuple[Path, str]:
    """Download (or find in the cache) a model repo's card files; returns the snapshot folder and the commit
    the revision resolved to (the snapshot folder's name)."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(repo_id=model.repo, revision=model.revision, allow_patterns=HUB_CARD_FILES))
    return folder, folder.name


class Zoo:
    """Cards of every checkpoint, and a bounded cache of loaded models.

    Args:
        source: where to look; cards are read once, weights only when a model is first used.
        max_loaded: how many models stay in memory (least recently used is dropped).
    """

    def __init__(self, source: ZooSource | None = None, max_loaded: int | None = None,
                 pins: dict[str, dict[str, str | None]] | None = None) -> None:
        """``pins`` (name -> pinned sha256s): only pinned models whose cards agree are served. The app's
        default zoo (no ``source``, the project's ``checkpoints/``) uses :data:`PINS_FILE`.

        Models read from the Hub are held to :data:`PINS_FILE` too where their name is one of the project's
        shipped models: a repo whose card and weights were changed together is refused, whatever its revision
        (``pins_required`` False: a model the file does not name is served). Other Hub models are the deployer's
        own; a revision that is not a commit id is resolved once at start and logged, so what was served can be
        told afterwards."""
        self.source = source or source_from_env()
        self.pins_required = pins is not None
        if pins is None and source is None and not self.source.hub_models \
                and self.source.local_dir.resolve() == DEFAULT_CHECKPOINTS.resolve():
            pins, self.pins_required = read_pins(), True
        elif pins is None and self.source.hub_models:
            pins = read_pins()
        self.pins = pins
        self.max_loaded = max_loaded or int(os.environ.get("CXR_DEMO_MAX_LOADED_MODELS", DEFAULT_MAX_LOADED))
        self._lock = threading.Lock()
        self._loaded: OrderedDict[str, torch.nn.Module] = OrderedDict()
        # (purpose, name) -> a copy of the model for heatmaps, least recently used first
        self._heatmap_copies: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()
        self._ood: dict[str, OODDetector] = {}
        self.cards: dict[str, ModelCard] = {}
        self.folders: dict[str, Path] = {}
        self.problems: dict[str, str] = {}
        # zoo name -> (repo, commit) for models read from the Hub; every file of one model comes from its commit
        self.hub_commits: dict[str, tuple[str, str]] = {}
        if self.source.hub_models:
            for hub_model in self.source.hub_models:
                try:
                    folder, commit = _hub_card_folder(hub_model)
                except Exception as e:  # noqa: BLE001 - network, missing repo or revision: skip the model, say why
                    self._skip(hub_model.name, f"{hub_model.spec()}: {type(e).__name__}: {e}")
                    continue
                if self._add(folder, hub_model.name):
                    self.hub_commits[hub_model.name] = (hub_model.repo, commit)
                    if hub_model.revision != commit and hub_model.name not in (self.pins or {}):
                        log.warning("zoo: %s is not pinned to a commit; serving commit %s that %r pointed to at "
                                    "start (pin it as %s@%s)", hub_model.name, commit, hub_model.revision or "main",
                                    hub_model.repo, commit)
        else:
            for folder in checkpoint_folders(self.source.local_dir):
                self._add(folder, folder.name)
        for name in [n for n, c in self.cards.items() if c.architecture == ENSEMBLE_ARCHITECTURE]:
            try:
                self._check_ensemble(self.cards[name])
            except CardError as e:
                self._skip(name, str(e))
                del self.cards[name], self.folders[name]
        log.info("zoo: %d models from %s", len(self.cards), self.source.describe())

    def _skip(self, name: str, reason: str) -> bool:
        """Leave a checkpoint out of the zoo with one log line; ``problems`` keeps the reason."""
        log.error("skipping checkpoint %s: %s", name, reason)
        self.problems[name] = reason
        return False

    def _add(self, folder: Path, name: str) -> bool:
        """Read the card in ``folder``, which must be called ``name``; keep it or record why not."""
        try:
            card = read_card(folder)
        except CardError as e:
            return self._skip(name, str(e))
        if card.name != name:
            return self._skip(name, f"card name {card.name!r} differs from its folder or repo name {name!r}")
        if self.pins is not None:
            pin = self.pins.get(card.name)
            ood = card.ood.sha256 if card.ood else None
            if pin is None and self.pins_required:
                return self._skip(name, "not pinned in cxr_demo/pinned_weights.json (run python -m training.report)")
            if pin is not None and (pin.get("sha256") != card.sha256 or pin.get("ood_sha256") != ood):
                return self._skip(name, "its card's sha256 differs from the one pinned in cxr_demo/pinned_weights.json; "
                                        "refusing a card and weights changed together")
        if card.name in self.cards:
            return self._skip(name, f"two checkpoints are called {card.name!r}")
        self.cards[card.name] = card
        self.folders[card.name] = folder
        return True

    def _file(self, name: str, file_name: str) -> Path:
        """A file of a model's checkpoint: from its folder, or from its Hub repo at the commit resolved at start."""
        if name in self.hub_commits:
            from huggingface_hub import hf_hub_download

            repo, commit = self.hub_commits[name]
            return Path(hf_hub_download(repo, file_name, revision=commit))
        return self.folders[name] / file_name

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
        return self._file(self.card(name).name, WEIGHTS_FILE)

    def model(self, name: str) -> torch.nn.Module:
        """The loaded model (sha256-verified, strict), from the bounded cache."""
        card = self.card(name)
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
        try:
            model = self._build(card)
        except Exception as e:  # noqa: BLE001 - any broken checkpoint: withdraw it, say so once, keep serving
            self.withdraw(name, f"{type(e).__name__}: {e}")
            raise ModelUnavailableError(
                f"The model {name!r} could not be loaded (its files are damaged or do not match its card) and has "
                f"been withdrawn; choose one of: {', '.join(self.names) or '(none left)'}."
            ) from None
        with self._lock:
            self._loaded[name] = model
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.max_loaded:
                dropped, _ = self._loaded.popitem(last=False)
                log.info("zoo: unloaded %s (cache holds %d)", dropped, self.max_loaded)
        return model

    def heatmap_model(self, name: str, purpose: str = "fast") -> torch.nn.Module:
        """A copy of the model that only heatmaps use. pytorch-grad-cam hooks the target layers (Ablation-CAM
        also swaps one), so a ``/predict`` running at the same time in another lane must never pass through
        them. Copies are kept per ``purpose`` (``fast`` heatmaps; ``slow`` ones: Score-CAM, Ablation-CAM, which
        run beside the fast ones): for fast heatmaps the ``max_loaded`` models explained last (so that heatmaps
        of a few models in turn do not copy a model each time), for slow ones the last."""
        keep = self.max_loaded if purpose == "fast" else 1
        key = (purpose, name)
        with self._lock:
            if key in self._heatmap_copies and name in self.cards:
                self._heatmap_copies.move_to_end(key)
                return self._heatmap_copies[key]
            # old copies go before the new one is made
            while sum(k[0] == purpose for k in self._heatmap_copies) >= keep:
                del self._heatmap_copies[next(k for k in self._heatmap_copies if k[0] == purpose)]
        duplicate = copy.deepcopy(self.model(name)).eval()
        with self._lock:
            self._heatmap_copies[key] = duplicate
        return duplicate

    def _build(self, card: ModelCard) -> torch.nn.Module:
        # Folded and NHWC (models.for_inference); outputs differ from the plain weights by float rounding only
        # (<= 1.4e-5 on the logits of every zoo model). Evaluation loads models through the zoo too: what is
        # served was evaluated.
        return for_inference(self.plain_model(card), card.input_size)

    def plain_model(self, card: ModelCard) -> torch.nn.Module:
        """The card's weights (sha256-checked) in the model they were trained in: not folded, NCHW."""
        if card.architecture != ENSEMBLE_ARCHITECTURE:
            return load_weights(card, self.weights_path(card.name))
        # Each member is verified against its own card's sha256, which the ensemble pinned (checked
        # when the zoo was read).
        members = [load_weights(self.cards[m["name"]], self.weights_path(m["name"])) for m in card.model_args["members"]]
        return ProbabilityEnsemble(members, card.task_kind).eval()

    def withdraw(self, name: str, reason: str) -> None:
        """Hide a model that failed to load from the zoo (and ``/models``), with one log line; ensembles that
        use it go too."""
        with self._lock:
            if self.cards.pop(name, None) is None:
                return
            self.problems[name] = reason
            self._loaded.pop(name, None)
            for key in [k for k in self._heatmap_copies if k[1] == name]:
                del self._heatmap_copies[key]
        log.error("withdrew model %s: %s", name, reason)
        for other, card in list(self.cards.items()):
            if card.architecture == ENSEMBLE_ARCHITECTURE and any(m.get("name") == name for m in card.model_args.get("members", [])):
                self.withdraw(other, f"member {name} was withdrawn")

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
            diff = [f for f in MEMBER_SHARED_FIELDS if getattr(other, f) != getattr(card, f)]
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
        path = self._file(card.name, card.ood.file)
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
