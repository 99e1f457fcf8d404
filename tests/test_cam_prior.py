"""The training-side anatomical prior (training.cam_prior, training.train --cam-prior): what the penalty measures,
that masks move with the film, that the CAM is the logit's own map, and a training run with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from cxr_demo.card import read_card
from tests.helpers import tiny_nih_training, train_tiny
from training.cam_prior import FeaturesAndLogits, class_maps, outside_share
from training.train import augment


def test_outside_share_is_the_mass_outside_the_region_for_present_findings():
    cams = torch.zeros(3, 2, 4, 4)
    cams[:, :, :, :2] = 1.0  # all activation in the left half
    cams[:, 1, 0, 0] = -5.0  # negative evidence is not mass
    left = torch.zeros(3, 1, 8, 8)
    left[..., :4] = 1
    right = 1 - left
    both = torch.ones(3, 2)
    assert outside_share(cams, left, both).item() == pytest.approx(0.0, abs=1e-6)
    assert outside_share(cams, right, both).item() == pytest.approx(1.0, abs=1e-6)
    half = torch.ones(3, 1, 8, 8)
    half[..., :2] = 0  # a quarter of the left half is outside
    assert outside_share(cams[:, :1], half, both[:, :1]).item() == pytest.approx(0.5, abs=1e-6)
    # the second finding: its negative cell at (0, 0), which lies outside, is no mass; 3 of its 7 cells lie outside
    assert outside_share(cams[:, 1:], half, both[:, 1:]).item() == pytest.approx(3 / 7, abs=1e-6)
    # only present findings count (soft labels from 0.5), and a film without lungs counts for nothing
    labels = torch.tensor([[1.0, 0.0], [0.4, 0.0], [0.0, 0.0]])
    mixed = torch.cat([right[:1], left[1:]])
    assert outside_share(cams, mixed, labels).item() == pytest.approx(1.0, abs=1e-6)
    no_lungs = right.clone()
    no_lungs[0] = 0
    assert outside_share(cams, no_lungs, labels).item() == 0.0
    per = outside_share(cams, mixed, labels, reduce=False)
    assert per[0, 0].item() == pytest.approx(1.0, abs=1e-6) and torch.isnan(per[1:]).all() and torch.isnan(per[0, 1])


def test_outside_share_has_a_gradient_that_moves_mass_inside():
    cams = torch.rand(1, 1, 4, 4, requires_grad=True)
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2] = 1
    outside_share(cams, region, torch.ones(1, 1)).backward()
    assert (cams.grad[..., 2:] > 0).all() and (cams.grad[..., :2] < 0).all()


def test_masks_move_with_the_film_and_the_films_are_augmented_as_without_them():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((4, 1, 32, 32), dtype=np.float32))
    plain = augment(x, torch.Generator().manual_seed(3))
    with_masks, _ = augment(x, torch.Generator().manual_seed(3), masks=torch.ones(4, 1, 32, 32))
    assert torch.equal(plain, with_masks)
    block = torch.zeros(4, 1, 32, 32)
    block[..., 8:24, 6:20] = 1.0  # away from the border: the film's border padding and the mask's zeros agree
    moved_film, moved_mask = augment(block, torch.Generator().manual_seed(5), jitter=0.0, masks=block)
    assert torch.allclose(moved_film, moved_mask, atol=1e-6)
    assert not torch.equal(moved_mask, block)


def test_the_class_map_averages_to_the_logit():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, feats = FeaturesAndLogits(model)(x)
        cams = class_maps(feats, model.get_classifier())
    assert torch.allclose(cams.mean(dim=(2, 3)) + model.get_classifier().bias, logits, atol=1e-5)
    assert torch.allclose(logits, model(x), atol=1e-6)


def test_a_transformer_is_refused():
    with pytest.raises(SystemExit, match="linear layer over globally pooled"):
        FeaturesAndLogits(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="feature map"):
        class_maps(torch.zeros(2, 5, 8), torch.nn.Linear(8, 3))


def test_training_with_the_cam_prior(tmp_path, monkeypatch):
    """--cam-prior trains (the lung model's masks of the fake films, moved with each augmentation), logs the share per
    epoch, records the prior and its validation measure in the card, changes the weights against the same run without
    it, and is refused with a crop."""
    common = tiny_nih_training(tmp_path, monkeypatch)
    plain = train_tiny(*common, "--name", "plain")
    prior = train_tiny(*common, "--name", "prior", "--cam-prior", "5")
    card, plain_card = read_card(prior), read_card(plain)
    assert plain_card.training["cam_prior"] is None
    cp = card.training["cam_prior"]
    assert cp["weight"] == 5.0 and cp["shape"] == "hull+0.05" and cp["lung_model"] == "lungseg-efficientnet-lite0"
    assert len(cp["lung_model_sha256"]) == 64 and 0 <= cp["train_films_without_lungs"] <= plain_card.training["n_train"]
    val = cp["val_cam_outside_thorax"]
    assert set(val) == {"mean", "pairs", "per_finding"} and list(val["per_finding"]) == card.label_names
    assert val["mean"] is None or 0.0 <= val["mean"] <= 1.0
    log = [json.loads(line) for line in (prior / "train_log.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["train_cam_outside_thorax"] <= 1.0 for r in log)
    assert "class activation inside the thorax" in card.description
    wa, wb = load_file(str(plain / "model.safetensors")), load_file(str(prior / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(SystemExit, match="not with --crop"):
        train_tiny(*common, "--name", "crop", "--cam-prior", "1", "--crop", "lung")
