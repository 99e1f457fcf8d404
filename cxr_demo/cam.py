"""Class activation maps: the methods, the layer each model family is explained at, and the settings
an ``/explain`` request resolves to.

pytorch-grad-cam needs gradients (never run it under ``torch.inference_mode``/``no_grad``) and keeps
its hooks on the module: a shared model must not run two CAMs at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cxr_demo.boxes import BoxRule
from cxr_demo.card import ChoiceError, ModelCard
from cxr_demo.images import crop_rect

log = logging.getLogger(__name__)

# pytorch-grad-cam class per method; imported on first use (it pulls in OpenCV: ~2.5 s of the app's start).
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
CAM_LABELS: dict[str, str] = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "scorecam": "Score-CAM (slow)",
    "ablationcam": "Ablation-CAM (slow)",
}
DEFAULT_CAM_METHOD = "gradcam"
# One forward pass per activation channel (Score-CAM) or per ablated channel (Ablation-CAM): minutes per image
# on a 2-core CPU (273 s and 261 s measured for Lite0). The localisation study may use them; the app's public
# API offers them only when CXR_DEMO_SLOW_CAM=1.
SLOW_CAM_METHODS = ("scorecam", "ablationcam")

# CAM target layer per timm family (checked on timm 1.0.31 with in_chans=1). The first matching
# prefix of the architecture name wins. Transformers also need a reshape, see ``reshape_for``.
CAM_TARGET_LAYERS: dict[str, str] = {
    "resnet": "layer4.-1",
    "densenet": "features.-1",
    "efficientnet": "bn2",
    "tf_efficientnet": "bn2",
    "mobilenetv3": "blocks.-1",  # conv_head runs after global pooling in MobileNetV3
    "tf_mobilenetv3": "blocks.-1",
    "convnext": "stages.-1",
    "swin": "layers.-1.blocks.-1.norm1",
    "vit": "blocks.-1.norm1",
    "deit": "blocks.-1.norm1",
    "beit": "blocks.-1.norm1",
    "test_resnet": "layer4.-1",
    "test_efficientnet": "bn2",
    "test_vit": "blocks.-1.norm1",
    "test_convnext": "stages.-1",
    "cxr_small_cnn": "features.-1",
}
# Families whose activations are tokens (B, N, C) with prefix tokens; Swin's are (B, H, W, C).
TOKEN_FAMILIES = ("vit", "deit", "beit", "test_vit")


def default_cam_layer(architecture: str) -> str:
    """The CAM target layer for a timm architecture name (longest matching family prefix)."""
    matches = [k for k in CAM_TARGET_LAYERS if architecture.startswith(k)]
    if not matches:
        raise KeyError(
            f"no CAM target layer known for {architecture!r}; add its family to CAM_TARGET_LAYERS "
            "or set cam_target_layer in the card"
        )
    return CAM_TARGET_LAYERS[max(matches, key=len)]


def resolve_module(model: torch.nn.Module, dotted: str) -> torch.nn.Module:
    """Find a sub-module by a dotted path in which integers index sequences (``layer4.-1``).

    Raises:
        ChoiceError: the path names no sub-module of this model (a card's layer that does not exist).
    """
    module: torch.nn.Module = model
    try:
        for part in dotted.split("."):
            if part.lstrip("-").isdigit():
                index = int(part)
                module = module[index] if hasattr(module, "__getitem__") else list(module.children())[index]
            else:
                module = getattr(module, part)
    except (AttributeError, IndexError, KeyError, TypeError):
        raise ChoiceError(f"The heatmap layer {dotted[:60]!r} does not exist in this model; its card is wrong, so no "
                          "heatmap can be drawn for it.") from None
    if not isinstance(module, torch.nn.Module):
        raise ChoiceError(f"The heatmap layer {dotted[:60]!r} is not a layer of this model; its card is wrong.")
    return module


def reshape_for(model: torch.nn.Module, architecture: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A reshape_transform for pytorch-grad-cam, for families whose activations are not (B,C,H,W)."""
    if architecture.startswith("swin"):
        # Swin block outputs are (B, H, W, C).
        return lambda t: t.permute(0, 3, 1, 2)
    if architecture.startswith(TOKEN_FAMILIES):
        n_prefix = getattr(model, "num_prefix_tokens", 1)
        grid = model.patch_embed.grid_size

        def _vit(t: torch.Tensor) -> torch.Tensor:
            t = t[:, n_prefix:, :]
            return t.reshape(t.shape[0], grid[0], grid[1], t.shape[2]).permute(0, 3, 1, 2)

        return _vit
    return None


# Set around a slow heatmap by whoever shows its progress (the app: Gradio's progress bar): called with the loop
# over batches of forward passes that pytorch-grad-cam would wrap in tqdm, and ``desc``; returns the loop to run.
CAM_PROGRESS: ContextVar[Callable[..., Iterable] | None] = ContextVar("cam_progress", default=None)


class _QuietTqdm:
    """Stands in for the ``tqdm`` module inside pytorch-grad-cam's Score-CAM and Ablation-CAM, whose loops draw a
    progress bar on the server's stderr on every call (no option turns it off): a log line per batch of every
    heatmap, and a server whose stderr is a pipe nobody drains blocks in the middle of a heatmap, for good (seen
    in bench.load: the slow heatmap hung after ~20 minutes). The loop goes to :data:`CAM_PROGRESS` instead (the
    app's progress bar counts its batches), or runs as it is."""

    @staticmethod
    def tqdm(iterable=None, *args, **kwargs):
        show = CAM_PROGRESS.get()
        return iterable if show is None or iterable is None else show(iterable, desc="batches of forward passes")


def quiet_cam_progress() -> None:
    """Silence pytorch-grad-cam's own progress bars (module-scoped; idempotent)."""
    import importlib

    for name in ("score_cam", "ablation_cam", "ablation_cam_multilayer"):
        try:
            module = importlib.import_module(f"pytorch_grad_cam.{name}")
        except ImportError:
            continue
        if hasattr(module, "tqdm"):
            module.tqdm = _QuietTqdm


def cam_class(method: str) -> type:
    """The pytorch-grad-cam class of a method name (a key of :data:`CAM_METHODS`)."""
    import pytorch_grad_cam

    quiet_cam_progress()
    return getattr(pytorch_grad_cam, CAM_METHODS[method])


def compute_heatmap(
    model: torch.nn.Module,
    card: ModelCard,
    input_tensor: torch.Tensor,
    class_index: int,
    method: str = DEFAULT_CAM_METHOD,
    layer: str | None = None,
) -> np.ndarray:
    """A class activation map for one image, at the model's input resolution, scaled to [0, 1].

    ``layer`` overrides the card's CAM target layer (a dotted path such as ``blocks.4``).
    """
    return heatmap_and_logits(model, card, input_tensor, class_index, method, layer)[0]


def target_layers(model: torch.nn.Module, layers: str) -> list[torch.nn.Module]:
    """The modules of a CAM layer setting: one dotted path, or several joined by commas (an ensemble's
    members; pytorch-grad-cam scales each layer's map to [0, 1] and averages them)."""
    return [resolve_module(model, part.strip()) for part in layers.split(",")]


def heatmap_and_logits(
    model: torch.nn.Module,
    card: ModelCard,
    input_tensor: torch.Tensor,
    class_index: int | None,
    method: str = DEFAULT_CAM_METHOD,
    layer: str | None = None,
    pause: Callable[[], None] | None = None,
) -> tuple[np.ndarray, torch.Tensor, int]:
    """:func:`compute_heatmap` that also returns the logits of the CAM's own forward pass (so the
    probabilities cost no second forward) and the class explained (``None``: the top-scoring one).

    ``pause``: called before every forward pass of the model (Score-CAM and Ablation-CAM then run in batches of
    4 instead of 32), so that a long heatmap can wait for more urgent work.
    """
    if method not in CAM_METHODS:
        raise KeyError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    layers = target_layers(model, layer or card.cam_target_layer)
    kwargs = {}
    reshape = reshape_for(model, card.architecture)
    if reshape is not None:
        kwargs["reshape_transform"] = reshape
    if reshape is not None and method == "ablationcam":
        # Token / channels-last activations: ablate the last dimension (pytorch-grad-cam's ViT layer
        # transposes channels to dim 1 and back, which also fits Swin's (B, H, W, C)).
        from pytorch_grad_cam.ablation_layer import AblationLayerVit

        kwargs["ablation_layer"] = AblationLayerVit()
    x = input_tensor.detach().clone()  # a tensor born under inference_mode cannot take part in autograd
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cam_class(method)(model=model, target_layers=layers, **kwargs)
    if method in {"scorecam", "ablationcam"}:
        cam.batch_size = 32 if pause is None else 4
    waiting = model.register_forward_pre_hook(lambda *_: pause()) if pause is not None else None
    # Not ``with cam:``: BaseCAM.__exit__ prints and swallows IndexError, hiding real failures.
    try:
        # targets=None: pytorch-grad-cam explains the arg-max logit, the top finding (sigmoid and softmax
        # are monotonic), and keeps that forward pass's output in ``cam.outputs``.
        targets = None if class_index is None else [ClassifierOutputTarget(class_index)]
        grayscale = cam(input_tensor=x, targets=targets)
        logits = cam.outputs.detach()
    finally:
        cam.activations_and_grads.release()
        if waiting is not None:
            waiting.remove()
    index = int(logits[0].argmax()) if class_index is None else class_index
    heat = np.asarray(grayscale[0], dtype=np.float32)
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(heat.max())
    return (heat / peak if peak > 0 else heat), logits, index


def resize_heatmap(heatmap: np.ndarray, width: int, height: int,
                   crop: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Map a heatmap of the model's input back to the image's pixel frame (bilinear).

    With a ``crop`` (the card's, as :func:`cxr_demo.images.resize_gray` cut it), the heatmap covers only
    that rectangle of the image; outside it the model saw nothing and the map is 0.
    """
    if crop is None:
        im = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))
        return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    x0, y0, x1, y1 = crop_rect(width, height, crop)
    out = np.zeros((height, width), dtype=np.float32)
    out[y0:y1, x0:x1] = resize_heatmap(heatmap, x1 - x0, y1 - y0)
    return out


PRIOR_LABELS: dict[str, str] = {
    "default": "as studied for this model",
    "off": "off (the whole image)",
    "lungs": "lung fields",
    "lungs+0.05": "lung fields, widened by 5%",
    "lungs+0.1": "lung fields, widened by 10%",
    "hull": "lungs closed over the mediastinum",
    "hull+0.05": "lungs closed over the mediastinum, widened by 5%",
    "hull+0.1": "lungs closed over the mediastinum, widened by 10%",
}


@dataclass(frozen=True)
class ExplainSettings:
    """What an ``/explain`` request runs: CAM method, target layer, heatmap -> box rule, and the anatomical
    prior's shape (``None``: the heatmap is not restricted)."""

    method: str
    layer: str
    rule: BoxRule
    prior: str | None = None
    studied: bool = False  # the method, layer and rule are the localisation study's choice for this model
    # the study's box source per finding (cxr_demo.card.FindingBox), when it has one and the request keeps the
    # studied method, layer, prior and box rule
    per_finding: dict | None = None

    def box_source(self, finding: str):
        """The studied box source of ``finding`` (None: the box rule)."""
        return (self.per_finding or {}).get(finding)


def prior_text(prior: str | None) -> str:
    """A prior shape in words."""
    if prior is None:
        return "off"
    if prior in PRIOR_LABELS:
        return PRIOR_LABELS[prior]
    kind, _, dilation = prior.partition("+")
    base = PRIOR_LABELS[kind]
    return f"{base}, widened by {float(dilation) * 100:g}%" if dilation else base


def explain_settings(card: ModelCard, method: str | None = None, box_threshold: float | None = None,
                     prior: str | None = None) -> ExplainSettings:
    """The settings of a request; ``method`` ``"default"`` (or None) means the card's studied choice
    (``explain_defaults`` from ``training.localisation``), else Grad-CAM at the card's layer.
    ``box_threshold`` None or 0 keeps the studied box rule; otherwise the largest region above that
    fraction of the heatmap's maximum. ``prior`` ``"default"`` (or None) is the card's studied prior
    (none for a model without one), ``"off"`` none, else one of :data:`PRIOR_LABELS`' shapes.

    Raises:
        ChoiceError: an unknown method or prior, or a box threshold outside 0.05-0.95.
    """
    method = (method or "default").strip().lower()
    prior = (prior or "default").strip().lower()
    layer = card.cam_target_layer
    tuned = BoxRule()
    studied = card.explain_defaults is not None
    if studied:
        tuned = BoxRule(**card.explain_defaults.box_rule)
    if method == "default":
        if studied:
            method, layer = card.explain_defaults.method, card.explain_defaults.layer
        else:
            method = DEFAULT_CAM_METHOD
    elif studied and (method, layer) != (card.explain_defaults.method, card.explain_defaults.layer):
        studied = False
    if method not in CAM_METHODS:
        raise ChoiceError(f"Unknown heatmap method {method[:40]!r}; choose one of: {', '.join(CAM_METHODS)}, default.")
    if prior not in PRIOR_LABELS:
        raise ChoiceError(f"Unknown anatomical prior {prior[:40]!r}; choose one of: {', '.join(PRIOR_LABELS)}.")
    if prior == "default":
        shape = card.explain_defaults.prior if card.explain_defaults is not None else None
    else:
        shape = None if prior == "off" else prior
        if card.explain_defaults is None or shape != card.explain_defaults.prior:
            studied = False
    if box_threshold is None or float(box_threshold) == 0.0:
        per_finding = card.explain_defaults.per_finding if studied and card.explain_defaults is not None else None
        return ExplainSettings(method, layer, tuned, shape, studied, per_finding or None)
    if not 0.05 <= float(box_threshold) <= 0.95:
        raise ChoiceError("The box threshold must be 0 (the model's tuned rule) or between 0.05 and 0.95 of the "
                          "heatmap's maximum.")
    return ExplainSettings(method, layer, BoxRule(float(box_threshold), "relative", "largest", "rect"), shape, False)
