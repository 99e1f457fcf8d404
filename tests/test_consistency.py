"""Same film, same answer, from the training side (#13): the JPEG round trip, the measurement of how far a model's
probabilities move between a film's PNG and JPEG copies, and training with the consistency term."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cxr_demo.card import Calibration, ModelCard, read_card
from tests.helpers import synthetic_xray, tiny_nih_training, train_tiny
from training.data import Record
from training.losses import consistency_gap
from training.robustness import jpeg_change, jpeg_round_trip


def _films(n=3, size=128):
    return np.stack([np.clip(np.rint(synthetic_xray(size, seed=i) * 255), 0, 255).astype(np.uint8) for i in range(n)])


def test_jpeg_round_trip_is_a_lossy_copy_of_the_same_film():
    films = _films()
    q95 = jpeg_round_trip(films, 95)
    assert q95.shape == films.shape and q95.dtype == np.uint8
    d95 = np.abs(q95.astype(int) - films).mean()
    assert 0 < d95 < 3  # changed, by a few 8-bit steps at most on average
    d30 = np.abs(jpeg_round_trip(films, 30).astype(int) - films).mean()
    assert d30 > d95
    one = jpeg_round_trip(films[0], 95)
    assert one.shape == films[0].shape and np.array_equal(one, q95[0])
    per_image = jpeg_round_trip(films, [95, 30, 95])
    assert np.array_equal(per_image[0], q95[0]) and np.array_equal(per_image[2], q95[2])
    assert np.array_equal(per_image[1], jpeg_round_trip(films[1], 30))


class _Probe(torch.nn.Module):
    """One logit from either the film's mean brightness (blind to JPEG's local changes) or its high-frequency
    energy (what JPEG quantisation changes)."""

    def __init__(self, high_frequency: bool):
        super().__init__()
        self.high_frequency = high_frequency
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        if self.high_frequency:
            lap = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
            return (self.scale * 200 * (lap.abs().mean((1, 2, 3)) - 0.09)).unsqueeze(1)
        return (self.scale * 4 * x.mean((1, 2, 3))).unsqueeze(1)


def test_jpeg_change_sees_a_model_that_reads_what_jpeg_changes(tmp_path):
    records = []
    for i, film in enumerate(_films(4, 160)):
        path = tmp_path / f"{i:08d}_000.png"
        Image.fromarray(film).save(path)
        records.append(Record(path=path, labels=np.zeros(1, np.float32), patient=str(i), split="train_val"))
    card = ModelCard(name="p", version="1", changelog=["x"], description="", summary="", task="t",
                     task_kind="multilabel", architecture="x", label_names=["a"], input_size=128, mean=0.5, std=0.5,
                     thresholds={}, cam_target_layer="x", data_source="", init="", license="", sha256="0" * 64)
    blind = jpeg_change(_Probe(False), card, records)
    seeing = jpeg_change(_Probe(True), card, records)
    assert blind["n_images"] == seeing["n_images"] == 4 and blind["quality"] == 95
    assert blind["mean_max_change"] < 0.005 and blind["share_over_0_02"] == 0.0
    assert seeing["mean_max_change"] > 0.02 and seeing["max_change"] >= seeing["p95_max_change"] >= 0
    assert "calibrated" not in seeing  # no calibration on the card: the raw probabilities are the shown ones
    # a steep calibration map (a model trained to keep its logits small) enlarges the change the app shows
    steep = card.model_copy(update={"calibration": Calibration(method="platt", params={"a": (3.0, 0.0)},
                                                                fitted_on="v", source_file="x.json")})
    shown = jpeg_change(_Probe(True), steep, records)
    assert shown["mean_max_change"] == pytest.approx(seeing["mean_max_change"])
    assert shown["calibrated"]["mean_max_change"] > 1.5 * seeing["mean_max_change"]


def test_training_with_the_jpeg_consistency_term(tmp_path, monkeypatch):
    """--consistency trains on 8-bit images and their JPEG round trips, logs the logit gap per epoch, records the term
    in the card, changes the weights against the same run without it, and is refused with --cam-prior."""
    common = tiny_nih_training(tmp_path, monkeypatch)
    plain = train_tiny(*common, "--name", "plain")
    held = train_tiny(*common, "--name", "held", "--consistency", "5", "--consistency-quality", "70")
    card = read_card(held)
    assert read_card(plain).training["consistency"] is None
    assert card.training["consistency"]["weight"] == 5.0 and card.training["consistency"]["jpeg_quality"] == [70, 100]
    assert "rounded to 8 bits" in card.training["augmentation"]
    log = [json.loads(line) for line in (held / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["train_jpeg_logit_gap"] >= 0 for r in log)
    assert any(r["train_jpeg_logit_gap"] > 0 for r in log)
    wa, wb = load_file(str(plain / "model.safetensors")), load_file(str(held / "model.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    relative = read_card(train_tiny(*common, "--name", "relative", "--consistency", "1", "--consistency-scale", "relative"))
    assert relative.training["consistency"]["term"].endswith("divided by the batch's logit variance")
    assert "divided" not in card.training["consistency"]["term"]
    with pytest.raises(SystemExit, match="not combined"):
        train_tiny(*common, "--name", "both", "--consistency", "1", "--cam-prior", "1")


def test_relative_consistency_gap_cannot_be_met_by_shrinking_the_logits():
    """The plain gap falls 100x when every logit is divided by 10 (what a11 learned, and calibration undid); the
    relative one does not, and its gradient still pulls the two logits together."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 14, generator=gen) * 3
    zj = z + 0.2 * torch.randn(16, 14, generator=gen)
    plain, rel = consistency_gap(z, zj), consistency_gap(z, zj, relative=True)
    assert consistency_gap(z / 10, zj / 10).item() == pytest.approx(plain.item() / 100, rel=1e-4)
    assert consistency_gap(z / 10, zj / 10, relative=True).item() == pytest.approx(rel.item(), rel=1e-4)
    assert consistency_gap(z, z, relative=True).item() == 0.0
    za = z.clone().requires_grad_()
    consistency_gap(za, zj, relative=True).backward()
    assert torch.allclose(za.grad, 2 * (z - zj) / z.numel() / z.var(0, unbiased=False).mean(), atol=1e-6)
