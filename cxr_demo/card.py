"""Model cards: the contract between a checkpoint folder and everything that uses it.

A checkpoint folder ``<name>/`` holds ``config.json`` (this card), ``model.safetensors`` and
``eval.json``. The card carries everything needed to use the weights; loading one that is
incomplete or inconsistent raises with a message that says how to fix it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cxr_demo import INTENDED_USE

CARD_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EVAL_FILE = "eval.json"
# Per-image raw test probabilities written by training.evaluate (for paired comparisons and calibration numbers).
PREDICTIONS_FILE = "test_predictions.npz"
# Keys of config.json that are timm's (so timm can load a checkpoint from the Hub), not the card's.
TIMM_KEYS = ("num_classes", "num_features", "pretrained_cfg")
# Architectures of this project that timm does not know: their config.json carries no timm fields.
ENSEMBLE_ARCHITECTURE = "cxr_ensemble"
NON_TIMM_ARCHITECTURES = ("cxr_small_cnn", ENSEMBLE_ARCHITECTURE)

OPERATING_POINTS: tuple[str, ...] = ("f1", "youden", "screening")
# The ``f1`` rule's flag budget: per finding, at most this many validation flags per validation positive
# (``training.metrics.tune_thresholds``).
F1_FLAG_BUDGET = 1.5
OPERATING_POINT_HELP: dict[str, str] = {
    "f1": f"best F1 per finding while flagging at most {F1_FLAG_BUDGET} images per true case (validation): few "
          "flags, about as many as there are findings",
    "youden": "sensitivity + specificity - 1 maximised per finding (validation): catches more, flags several "
              "findings per film",
    "screening": "highest threshold that keeps validation sensitivity >= 0.9: misses little, flags many findings per "
                 "film (to rule out, not to diagnose)",
}

# A zoo name is a plain identifier, never a path: it indexes a dict, it is not joined to a folder
# by the caller.
# What a card may pass to timm.create_model: architecture sizes only. Anything else (checkpoint_path,
# pretrained, pretrained_cfg_overlay, ...) could make timm read or fetch files the sha256 does not cover.
ALLOWED_MODEL_ARGS = frozenset({"in_chans", "img_size", "drop_rate", "drop_path_rate", "growth_rate", "block_config",
                                "embed_dim", "depths", "num_heads", "members"})

# A shape of cxr_demo.lungs.thorax_region: "lungs" or "hull", optionally "+<dilation fraction>".
PRIOR_PATTERN = r"^(lungs|hull)(\+0\.[0-9]{1,3})?$"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def plain_name(v: str) -> str:
    """A model name as the cards and the UI accept it: never a path.

    Raises:
        ValueError: anything but lower-case letters, digits, '_', '-' or '.', at most 64 characters.
    """
    if not NAME_PATTERN.match(v):
        raise ValueError(f"model name {v!r} must be lower-case letters, digits, '_', '-' or '.', at most 64 "
                         "characters, and never a path")
    return v


class CardError(ValueError):
    """A card is missing, malformed or does not match its weights."""


class ChoiceError(ValueError):
    """A request asks for an operating point, finding or heatmap method the model does not offer."""


def choice_text(value: Any, what: str, optional: bool = True) -> str | None:
    """A text argument from the UI or the API, checked: ``None``/empty (when optional) or a short string.

    Raises:
        ChoiceError: anything else (a number, a list, a very long string), in a sentence.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise ChoiceError(f"Please choose the {what}.")
    if not isinstance(value, str):
        raise ChoiceError(f"The {what} must be given as text, not {type(value).__name__}.")
    if len(value) > 200:
        raise ChoiceError(f"The {what} is too long to be a valid choice.")
    return value


def choice_number(value: Any, what: str, low: float, high: float) -> float:
    """A numeric argument (a slider) from the UI or the API: a finite number in ``[low, high]``.

    Raises:
        ChoiceError: text that is not a number, None, a boolean, NaN/infinity, or out of range.
    """
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ChoiceError(f"The {what} must be a number between {low:g} and {high:g}.") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ChoiceError(f"The {what} must be a number between {low:g} and {high:g}.")
    return float(value)


class EvalMetrics(BaseModel):
    """Headline metrics copied from the evaluation file next to the card."""

    model_config = ConfigDict(extra="forbid")

    source_file: str = Field(description="evaluation file (relative to the card) the numbers come from")
    dataset: str
    n_images: int
    macro_auroc: float | None = None
    macro_auroc_ci95: tuple[float, float] | None = None
    accuracy: float | None = None
    per_label_auroc: dict[str, float] = Field(default_factory=dict)
    mean_box_iou: float | None = None
    n_boxes: int | None = None


class FindingBox(BaseModel):
    """Where one finding's box comes from, chosen per finding on the localisation study's select half
    (``training.box_sources``)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["heatmap", "peak", "chest", "sided", "place", "weighted"] = Field(
        description="heatmap: a heatmap -> box rule; peak: the finding's usual box size centred on the heatmap's "
                    "peak; chest: the finding's usual box relative to the chest (lung model; not the heatmap); "
                    "sided: the finding's usual box on the image's left or right side of the chest, the side with "
                    "more heat; place: a box rule applied to the finding's usual place within the lung fields (lung "
                    "model; not the heatmap); weighted: a box rule applied to the heatmap times its usual place")
    rule: dict[str, Any] | None = Field(default=None,
                                        description="heatmap, place, weighted: fields of cxr_demo.boxes.BoxRule")
    place: list[list[float]] | None = Field(
        default=None, min_length=1, max_length=2,
        description="place, weighted: the finding's usual place on the select half as Gaussians (weight, centre x, "
                    "centre y, sd x, sd y) in fractions of the chest's bounding box, one per side of the chest")
    power: float | None = Field(default=None, gt=0, le=8, description="weighted: the usual place's exponent")
    scale: float | None = Field(default=None, gt=0, le=4, description="peak: times the usual size")
    typical_box: list[float] | None = Field(
        default=None, min_length=4, max_length=4,
        description="peak, chest: the finding's median box on the select half as (centre x, centre y, w, h) in "
                    "fractions of the chest's bounding box")
    side_boxes: list[list[float]] | None = Field(
        default=None, min_length=2, max_length=2,
        description="sided: the finding's median box on the image's left, then right half of the chest (as typical_box)")
    text: str

    @model_validator(mode="after")
    def _complete(self) -> FindingBox:
        if self.source == "sided" and (self.side_boxes is None or not all(
                len(b) == 4 and all(math.isfinite(v) and -1 <= v <= 2 for v in b) and min(b[2:]) > 0
                for b in self.side_boxes)):
            raise ValueError("a sided box source needs two finite boxes with a positive size")
        if self.source in ("heatmap", "place", "weighted") and self.rule is None:
            raise ValueError(f"a {self.source} box source needs its rule")
        if self.source in ("place", "weighted") and (self.place is None or not all(
                len(c) == 5 and all(math.isfinite(v) for v in c) and c[0] > 0 and -1 <= c[1] <= 2
                and -1 <= c[2] <= 2 and 0.005 <= min(c[3:]) and max(c[3:]) <= 2 for c in self.place)):
            raise ValueError(f"a {self.source} box source needs its usual place: one or two Gaussians (weight > 0, "
                             "centre, sd in 0.005-2)")
        if self.source == "weighted" and self.power is None:
            raise ValueError("a weighted box source needs its power")
        if self.source in ("peak", "chest") and (self.typical_box is None or not all(
                math.isfinite(v) and -1 <= v <= 2 for v in self.typical_box) or min(self.typical_box[2:]) <= 0):
            raise ValueError(f"a {self.source} box source needs a finite typical box with a positive size")
        if self.source == "peak" and self.scale is None:
            raise ValueError("a peak box source needs its scale")
        return self


class ExplainDefaults(BaseModel):
    """Heatmap defaults chosen by the localisation study (``training.localisation``)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    layer: str
    box_rule: dict[str, Any] = Field(description="fields of cxr_demo.boxes.BoxRule")
    prior: str | None = Field(default=None, pattern=PRIOR_PATTERN,
                              description="anatomical prior shape (cxr_demo.lungs.PRIOR_SHAPES); None: no prior")
    source_file: str = Field(description="study result the choice comes from, relative to the project root")
    # what the study measured for this choice on its report half (mean box IoU over findings), beside the best
    # image-free box (a fixed box per finding, or a central box), so the app can say when a heatmap adds nothing
    report_mean_iou: float | None = Field(default=None, ge=0, le=1)
    image_free_baseline: str | None = None
    image_free_mean_iou: float | None = Field(default=None, ge=0, le=1)
    # the box source per finding (training.box_sources), chosen on the same select half for this method, layer and
    # prior; report_mean_iou then is that stage's report-half number. Findings not listed use box_rule.
    per_finding: dict[str, FindingBox] | None = None
    per_finding_source_file: str | None = None

    def adds_over_image_free(self) -> bool | None:
        """Whether the chosen heatmap's boxes beat the best image-free box on the report half (None: not recorded)."""
        if self.report_mean_iou is None or self.image_free_mean_iou is None:
            return None
        return self.report_mean_iou > self.image_free_mean_iou


class OODInfo(BaseModel):
    """The model's out-of-distribution check (``training.ood``)."""

    model_config = ConfigDict(extra="forbid")

    file: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]*\.safetensors$",
                      description="a file name beside the card, never a path")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    threshold: float
    source_file: str = Field(description="measurement the threshold's rates come from, relative to the project root")
    features_from: str | None = Field(
        default=None, pattern=NAME_PATTERN.pattern,
        description="the zoo model whose penultimate features the check reads instead of this model's own (one of "
                    "the same training films that tells them from other populations better; training.ood "
                    "--features-from); costs one more forward pass of that model per /predict")
    features_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$",
                                        description="the weights sha256 of features_from the check was fitted on")

    @model_validator(mode="after")
    def _features_pinned(self) -> "OODInfo":
        if (self.features_from is None) != (self.features_sha256 is None):
            raise ValueError("ood.features_from and ood.features_sha256 go together")
        return self


class Calibration(BaseModel):
    """Post-hoc calibration fitted on the model's validation images (``training.calibration``); applied by
    :func:`cxr_demo.calibration.calibrate`. On the logit scale (multi-label: per finding ``sigmoid(a * logit(p) +
    b)``; multi-class: ``softmax(a * log p)``, one ``a`` stored under ``"*"``), with ``a > 0`` so that the ranking
    of films, every AUROC and every flag stay exactly as they were."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["identity", "temperature", "platt"]
    params: dict[str, tuple[float, float]] = Field(description="slope a > 0 and offset b per finding (or '*')")
    fitted_on: str = Field(description="the images the parameters were fitted on (validation only)")
    source_file: str = Field(description="the calibration study, relative to the project root")

    @field_validator("params")
    @classmethod
    def _positive_slopes(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for key, (a, b) in v.items():
            if not (math.isfinite(a) and math.isfinite(b) and 0 < a <= 100 and abs(b) <= 100):
                raise ValueError(f"calibration of {key!r}: slope must lie in (0, 100] and offset in [-100, 100], "
                                 f"got {a}, {b}")
        return v


class ModelCard(BaseModel):
    """Everything needed to use one checkpoint, as stored in ``config.json``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    changelog: list[str] = Field(min_length=1)
    description: str
    summary: str = Field(description="one line: architecture, init, training data, headline metric")
    task: str = Field(description="task id, e.g. nih14, kermany2, kermany3, covid3")
    task_kind: Literal["multilabel", "multiclass"]
    architecture: str = Field(description="timm model name")
    model_args: dict[str, Any] = Field(default_factory=dict)
    label_names: list[str] = Field(min_length=1)
    input_size: int = Field(gt=15, le=2048)
    mean: float
    std: float = Field(gt=0)
    crop: tuple[float, float, float, float] | None = Field(
        default=None, description="fixed crop (top, bottom, left, right) as fractions of the image"
    )
    thresholds: dict[str, dict[str, float]] = Field(default_factory=dict)
    cam_target_layer: str
    intended_use: str = INTENDED_USE
    limitations: list[str] = Field(default_factory=list)
    data_source: str
    init: str = Field(description="ImageNet / random / in-domain pretrain (and from what)")
    training: dict[str, Any] = Field(default_factory=dict)
    eval_metrics: EvalMetrics | None = None
    explain_defaults: ExplainDefaults | None = None
    ood: OODInfo | None = None
    calibration: Calibration | None = None
    license: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    _plain_name = field_validator("name")(classmethod(lambda cls, v: plain_name(v)))

    @field_validator("model_args")
    @classmethod
    def _allowed_model_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if key not in ALLOWED_MODEL_ARGS:
                raise ValueError(f"model_args key {key!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_MODEL_ARGS))}); "
                                 "keys such as checkpoint_path or pretrained would make timm read other files")
            if key == "members":
                if not (isinstance(value, list) and all(isinstance(m, dict) and set(m) == {"name", "sha256"} for m in value)):
                    raise ValueError("model_args['members'] must list {name, sha256} of each ensemble member")
                continue
            numbers = value if isinstance(value, list | tuple) else [value]
            if not numbers or any(isinstance(n, bool) or not isinstance(n, int | float) for n in numbers):
                raise ValueError(f"model_args[{key!r}] must be a number or a list of numbers, not {value!r}")
        return v

    @field_validator("label_names")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"label_names has duplicates: {v}")
        return v

    @model_validator(mode="after")
    def _thresholds_cover_labels(self) -> ModelCard:
        if self.task_kind == "multilabel":
            for op, per_label in self.thresholds.items():
                if op not in OPERATING_POINTS:
                    raise ValueError(f"unknown operating point {op!r}; expected one of {OPERATING_POINTS}")
                missing = set(self.label_names) - set(per_label)
                extra = set(per_label) - set(self.label_names)
                if missing or extra:
                    raise ValueError(
                        f"thresholds[{op!r}] must have one value per label; missing {sorted(missing)}, "
                        f"unknown {sorted(extra)}"
                    )
        if self.calibration is not None:
            expected = set(self.label_names) if self.task_kind == "multilabel" else {"*"}
            if set(self.calibration.params) != expected:
                raise ValueError(f"calibration.params must have one entry per label (multi-label) or '*' (multi-class); "
                                 f"expected {sorted(expected)}, got {sorted(self.calibration.params)}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def operating_points(self) -> list[str]:
        """Operating points this card can apply (multi-class models use the arg-max)."""
        if self.task_kind == "multiclass":
            return ["argmax"]
        return [op for op in OPERATING_POINTS if op in self.thresholds]

    def threshold(self, operating_point: str, label: str) -> float:
        """The decision threshold of ``label`` at ``operating_point``."""
        return self.thresholds[operating_point][label]

    def summary_entry(self) -> dict[str, Any]:
        """A JSON-able description of this zoo entry for the ``/models`` endpoint."""
        headline: dict[str, Any] = {}
        if self.eval_metrics is not None:
            headline = self.eval_metrics.model_dump(exclude={"per_label_auroc"}, exclude_none=True)
        return {
            "name": self.name,
            "version": self.version,
            "summary": self.summary,
            "task": self.task,
            "task_kind": self.task_kind,
            "architecture": self.architecture,
            "init": self.init,
            "label_names": list(self.label_names),
            "operating_points": self.operating_points,
            "headline_metrics": headline,
            "intended_use": self.intended_use,
            **({"members": [m["name"] for m in self.model_args["members"]]} if "members" in self.model_args else {}),
        }


def zoo_order(cards: list[ModelCard]) -> list[str]:
    """Model names in the order the app offers them, its default first: NIH ChestX-ray14 models by
    validation macro AUROC (best first; never by test AUROC: the default is a model choice, and model
    choices are made on validation), then the other tasks' the same way; models without a validation
    number last within their task."""

    def key(card: ModelCard) -> tuple:
        auc = card.training.get("val_macro_auroc")
        return (card.task != "nih14", card.task, -(auc if isinstance(auc, int | float) else -1.0), card.name)

    return [c.name for c in sorted(cards, key=key)]


def checkpoint_folders(root: Path) -> list[Path]:
    """Every checkpoint folder directly under ``root`` (a folder holding a card), sorted by name."""
    return sorted(p.parent for p in Path(root).glob(f"*/{CARD_FILE}"))


def timm_fields(card: ModelCard, num_features: int | None = None) -> dict[str, Any]:
    """The keys timm reads from a Hub ``config.json`` (``timm.create_model("hf-hub:<repo>")``): architecture
    and ``model_args`` are the card's own; this adds ``num_classes``, ``num_features`` and ``pretrained_cfg``
    (one-channel input size, mean, std, label names). Empty for architectures timm does not know."""
    if card.architecture in NON_TIMM_ARCHITECTURES:
        return {}
    n = card.num_classes
    pretrained_cfg = {"input_size": [1, card.input_size, card.input_size], "interpolation": "bilinear",
                      "crop_pct": 1.0, "crop_mode": "center", "mean": [card.mean], "std": [card.std],
                      "num_classes": n, "label_names": list(card.label_names), "license": card.license}
    return {"num_classes": n, **({"num_features": num_features} if num_features else {}), "pretrained_cfg": pretrained_cfg}


def _check_timm_fields(card: ModelCard, found: dict[str, Any], path: Path) -> None:
    expected = timm_fields(card, found.get("num_features"))
    if found and found != expected:
        wrong = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        raise CardError(f"{path}: the timm fields {wrong} disagree with the card (labels, input size, mean or std "
                        "changed by hand?); rewrite the card with cxr_demo.card.write_card")


def read_card(folder: Path) -> ModelCard:
    """Parse ``folder/config.json`` into a :class:`ModelCard` (and check the timm fields beside it).

    Raises:
        CardError: the file is missing, is not JSON, or does not describe a usable model.
    """
    path = Path(folder) / CARD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CardError(f"{path} is missing: every checkpoint folder needs a {CARD_FILE} card") from e
    except json.JSONDecodeError as e:
        raise CardError(
            f"{path} is not valid JSON ({e}); restore it from version control, or retrain the model with "
            "python -m training.train, which writes the card"
        ) from e
    if not isinstance(raw, dict):
        raise CardError(f"{path} is not a model card (a JSON object is expected)")
    found = {k: raw.pop(k) for k in TIMM_KEYS if k in raw}
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as e:
        raise CardError(f"{path} is not a valid model card; fix these fields:\n{e}") from e
    _check_timm_fields(card, found, path)
    return card


def write_card(card: ModelCard, folder: Path, num_features: int | None = None) -> Path:
    """Write ``card`` as ``folder/config.json`` with the fields timm reads beside it (stable key order,
    trailing newline). ``num_features`` (the pooled feature width) is kept from the file when not given."""
    path = Path(folder) / CARD_FILE
    if num_features is None and path.is_file():
        try:
            num_features = json.loads(path.read_text(encoding="utf-8")).get("num_features")
        except (json.JSONDecodeError, AttributeError):
            num_features = None
    data = {**card.model_dump(mode="json"), **timm_fields(card, num_features)}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
