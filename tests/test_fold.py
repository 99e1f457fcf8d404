"""Served models are BatchNorm-folded and NHWC: same outputs (logits and the activations heatmaps read) as the
weights loaded plainly, and a fold that would change the output is refused."""

from __future__ import annotations

import logging

import pytest
import torch

from cxr_demo.cam import target_layers
from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE
from cxr_demo.lungs import create_unet, default_segmenter
from cxr_demo.models import fold_batchnorm
from cxr_demo.zoo import Zoo

ZOO = Zoo()
NAMES = ZOO.names


def outputs_and_activations(model: torch.nn.Module, layers: str, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().contiguous()))
             for m in target_layers(model, layers)]
    try:
        with torch.inference_mode():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return [out, *seen]


@pytest.mark.skipif(not NAMES, reason="no committed checkpoints")
@pytest.mark.parametrize("name", NAMES)
def test_served_model_matches_its_plain_weights(name):
    card = ZOO.card(name)
    served, reference = ZOO.model(name), ZOO.plain_model(card)
    x = torch.rand(2, 1, card.input_size, card.input_size, generator=torch.Generator().manual_seed(1))
    got = outputs_and_activations(served, card.cam_target_layer, x)
    want = outputs_and_activations(reference, card.cam_target_layer, x)
    assert len(got) == len(want) > 1
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)  # float rounding of activations ~3
    if "efficientnet" in card.architecture or card.architecture == ENSEMBLE_ARCHITECTURE:
        # the EfficientNets have a norm after every convolution: nothing left to normalise at run time
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    conv = next(m for m in served.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_lung_model_is_folded_and_gives_the_same_masks():
    seg = default_segmenter()
    if seg is None:
        pytest.skip("no lung model committed")
    reference = create_unet(seg.card.encoder, seg.card.decoder_channels)
    from safetensors.torch import load_file

    reference.load_state_dict(load_file(str(seg.folder / "model.safetensors")), strict=True)
    reference.eval()
    x = torch.rand(2, 1, seg.card.input_size, seg.card.input_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(seg.model(x), reference(x), rtol=0.0, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in seg.model.modules())


class NormBeforeConv(torch.nn.Module):
    """A conv registered before its norm although the norm runs first: folding by registration order would be
    wrong here."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
            self.norm.weight.uniform_(0.5, 2)
            self.norm.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.conv(self.norm(x.repeat(1, 4, 1, 1))).mean((2, 3))


def test_a_fold_that_changes_the_output_is_refused(caplog):
    model = NormBeforeConv().eval()
    with caplog.at_level(logging.WARNING, logger="cxr_demo.models"):
        assert fold_batchnorm(model, 16) is model
    assert "serving it unfolded" in caplog.text


def test_fold_keeps_the_norms_output_and_activation():
    torch.manual_seed(0)
    from timm.layers import BatchNormAct2d

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), BatchNormAct2d(8, act_layer=torch.nn.ReLU6)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    folded = fold_batchnorm(model, 16)
    assert folded is not model and isinstance(folded[1], torch.nn.Sequential)
    assert isinstance(folded[1][-1], torch.nn.ReLU6)
    x = torch.rand(3, 1, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=0.0, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train(), 16)
