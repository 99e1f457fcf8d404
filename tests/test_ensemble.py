"""Ensembles served as one model, the recipe flags the ablation uses, and its noise measurement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cxr_demo.card import read_card, write_card
from cxr_demo.images import read_xray
from cxr_demo.service import DemoService
from cxr_demo.zoo import Zoo, ZooSource
from tests.helpers import make_fake_nih, synthetic_xray

TINY = ["--arch", "test_efficientnet", "--init", "random", "--input-size", "64", "--epochs", "2", "--batch-size", "8",
        "--val-fraction", "0.25", "--threads", "1", "--no-eval"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny NIH models on a fake NIH layout (one with the stem, noise and EMA options) and their data."""
    from training.train import main as train_main

    root = tmp_path_factory.mktemp("ens")
    data = make_fake_nih(root / "data")
    mp = pytest.MonkeyPatch()
    mp.setenv("CXR_TRAIN_CACHE", str(root / "cache"))
    mp.setenv("CXR_DEMO_DATA_ROOT", str(data))
    mp.chdir(root)
    out = root / "ck"
    train_main(["--name", "a", "--out", str(out), "--seed", "0", *TINY])
    train_main(["--name", "b", "--out", str(out), "--seed", "0", "--freeze-stem-bn", "--noise", "1", "--ema", "0.9",
                "--drop-rate", "0.5", "--lr", "3e-3", "--select-on", "findings", *TINY])
    yield out, data
    mp.undo()


def test_recipe_flags_are_recorded_and_the_stem_statistics_stay_frozen(trained):
    out, _ = trained
    card = read_card(out / "b")
    assert card.training["freeze_stem_bn"] and card.training["ema_decay"] == 0.9
    assert "noise sd 1/255" in card.training["augmentation"]
    assert card.training["val_macro_auroc_findings_only"] is not None
    assert card.training["epoch_chosen_on"] == "validation films with a finding"
    log = [json.loads(line) for line in (out / "b" / "train_log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda r: r["val_macro_auroc_findings_only"])
    assert card.training["best_epoch"] == best["epoch"]
    from training.models import create_training_model

    fresh = create_training_model("test_efficientnet", 14, 0.0, 64)
    # the saved statistics (the served model has them folded into the stem convolution)
    saved = {m: load_file(str(out / m / "model.safetensors"))["bn1.running_var"].float() for m in ("a", "b")}
    assert torch.equal(saved["b"], fresh.bn1.running_var.float())
    assert not torch.equal(saved["a"], fresh.bn1.running_var.float())


def test_ensemble_averages_its_members_and_explains(trained, tmp_path, monkeypatch):
    from training.ensemble import main as ensemble_main

    out, data = trained
    monkeypatch.setenv("CXR_DEMO_DATA_ROOT", str(data))
    folder = ensemble_main(["--name", "ens", "--members", "a", "b", "--checkpoints", str(out), "--no-eval"])
    card = read_card(folder)
    assert card.model_args["members"][0]["name"] == "a" and card.cam_target_layer == "members.0.bn2,members.1.bn2"
    zoo = Zoo(ZooSource(out))
    assert "ens" in zoo.names and not zoo.problems
    service = DemoService(zoo)
    path = tmp_path / "x.png"
    Image.fromarray((synthetic_xray(96) * 255).astype(np.uint8)).save(path)
    xray = read_xray(path)
    probs = {n: np.array([r["probability"] for r in service.predict(xray, n).document["findings"]]) for n in ("a", "b", "ens")}
    assert np.allclose(probs["ens"], (probs["a"] + probs["b"]) / 2, atol=1e-5)
    overlay, doc = service.explain(xray, "ens", "Effusion", "default")
    assert overlay.shape == (96, 96, 3) and doc["layer"] == card.cam_target_layer
    assert doc["probability"] == pytest.approx(probs["ens"][card.label_names.index("Effusion")], abs=1e-5)


def test_ensemble_with_changed_member_or_edited_list_is_refused(trained, tmp_path, monkeypatch):
    import shutil

    from training.ensemble import main as ensemble_main

    out, data = trained
    monkeypatch.setenv("CXR_DEMO_DATA_ROOT", str(data))
    copy = tmp_path / "ck"
    shutil.copytree(out, copy)
    ensemble_main(["--name", "ens2", "--members", "a", "b", "--checkpoints", str(copy), "--no-eval"])
    raw = json.loads((copy / "ens2" / "config.json").read_text())
    raw["model_args"]["members"][1]["sha256"] = "0" * 64
    (copy / "ens2" / "config.json").write_text(json.dumps(raw))
    zoo = Zoo(ZooSource(copy))
    assert "ens2" not in zoo.cards and "digest" in zoo.problems["ens2"]
    ensemble_main(["--name", "ens2", "--members", "a", "b", "--checkpoints", str(copy), "--no-eval"])
    card_b = read_card(copy / "b")
    card_b.sha256 = "1" * 64  # member b retrained (or tampered with) after the ensemble pinned it
    write_card(card_b, copy / "b")
    zoo = Zoo(ZooSource(copy))
    assert "ens2" not in zoo.cards and "pinned" in zoo.problems["ens2"]


def test_rebuilding_an_ensemble_is_its_next_version_and_drops_what_described_the_old_members(trained, tmp_path,
                                                                                             monkeypatch):
    import shutil

    from training.ensemble import main as ensemble_main

    out, data = trained
    monkeypatch.setenv("CXR_DEMO_DATA_ROOT", str(data))
    copy = tmp_path / "ck"
    shutil.copytree(out, copy)
    ensemble_main(["--name", "ens3", "--members", "a", "b", "--checkpoints", str(copy), "--no-eval"])
    (copy / "ens3" / "ood.safetensors").write_bytes(b"a detector of the old members' features")
    ensemble_main(["--name", "ens3", "--members", "b", "a", "--checkpoints", str(copy), "--no-eval",
                   "--why", "members retrained"])
    card = read_card(copy / "ens3")
    assert card.version == "2.0.0" and card.model_args["members"][0]["name"] == "b"
    assert card.changelog == ["2.0.0: ensemble of b, a, chosen on validation: members retrained",
                              "1.0.0: ensemble of a, b, chosen on validation"]
    assert [p.name for p in (copy / "ens3").iterdir()] == ["config.json"]


def test_greedy_selection_adds_a_complementary_member_and_skips_a_useless_one():
    from training.ensemble import greedy_selection

    rng = np.random.default_rng(0)
    y = (rng.random((400, 2)) < 0.3).astype(float)
    good_on_0 = np.stack([y[:, 0] + rng.normal(0, 0.3, 400), rng.random(400)], 1)
    good_on_1 = np.stack([rng.random(400), y[:, 1] + rng.normal(0, 0.3, 400)], 1)
    noise = rng.random((400, 2))
    chosen, path = greedy_selection(y, {"m0": good_on_0, "m1": good_on_1, "noise": noise})
    assert sorted(chosen) == ["m0", "m1"] and len(path) == 2


def test_half_step_noise_measurement_sees_a_fragile_model():
    from cxr_demo.card import ModelCard
    from training.robustness import half_step_noise_change

    class Fragile(torch.nn.Module):
        """Logit 0 on the clean image (all 128), steep around it: moves only under sub-8-bit noise."""

        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.tensor(10000.0))

        def forward(self, x):
            return (self.gain * (x.mean((1, 2, 3)) - (128 / 255 - 0.5) / 0.5)).unsqueeze(1)

    card = ModelCard(name="f", version="1", changelog=["x"], description="", summary="", task="t",
                     task_kind="multilabel", architecture="x", label_names=["a"], input_size=16, mean=0.5, std=0.5,
                     thresholds={"f1": {"a": 0.5}}, cam_target_layer="x", data_source="", init="", license="",
                     sha256="0" * 64)
    pixels = np.full((4, 16, 16), 128, np.uint8)
    r = half_step_noise_change(Fragile(), card, pixels)
    assert r["n_images"] == 4 and r["max_abs_change"] > 0.05 and r["f1_flags_changed"] > 0


def test_evaluated_models_compare_paired_on_the_same_images(trained, tmp_path, monkeypatch):
    import shutil

    from training.compare import compare
    from training.evaluate import PREDICTIONS_FILE, evaluate_checkpoint

    out, data = trained
    copy = tmp_path / "ck"
    shutil.copytree(out, copy)
    monkeypatch.setenv("CXR_TRAIN_CACHE", str(tmp_path / "cache"))
    for name in ("a", "b"):
        ev = evaluate_checkpoint(copy / name, data, n_boot=50)
        assert ev["bootstrap"]["unit"] == "patient"
    saved = np.load(copy / "a" / PREDICTIONS_FILE)
    assert saved["probabilities"].shape == (16, 14) and len(set(saved["patients"].tolist())) == 8
    same = compare(copy / "a", copy / "a", n_boot=50)["macro_auroc_difference"]
    assert same["difference"] == 0 and same["ci95"] == (0.0, 0.0)
    ab = compare(copy / "a", copy / "b", n_boot=50)
    assert ab["n_patients"] == 8 and set(ab["macro_auroc_difference"]["per_label"]) == set(read_card(copy / "a").label_names)


def test_training_seeds_share_a_split_with_split_seed(trained, monkeypatch):
    """--split-seed keeps the validation films while the training seed changes, so seeds compare on the same films
    and can be ensembled; a model split with another seed is refused as a member."""
    from training.robustness import validation_predictions, validation_records
    from training.train import main as train_main

    out, data = trained
    monkeypatch.setenv("CXR_DEMO_DATA_ROOT", str(data))
    train_main(["--name", "c", "--out", str(out), "--seed", "1", "--split-seed", "0", *TINY])
    train_main(["--name", "d", "--out", str(out), "--seed", "1", *TINY])
    cards = {m: read_card(out / m) for m in "acd"}
    assert (cards["c"].training["seed"], cards["c"].training["split_seed"]) == (1, 0)
    assert cards["d"].training["split_seed"] == 1
    names = lambda m: [r.path.name for r in validation_records(cards[m])]  # noqa: E731
    assert names("c") == names("a") != names("d")
    y, probs = validation_predictions([out / "a", out / "c"])
    assert set(probs) == {"a", "c"} and len(y) == len(names("a"))
    assert not np.allclose(probs["a"], probs["c"])  # another training seed: another model
    with pytest.raises(ValueError, match="split seed"):
        validation_predictions([out / "a", out / "d"])
