"""Every committed checkpoint is consistent: weights match the card, the card's numbers equal its eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cxr_demo.card import F1_FLAG_BUDGET, checkpoint_folders, read_card
from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE, members_digest
from cxr_demo.inference import predict_probabilities, preprocess
from cxr_demo.models import load_weights, sha256_file
from cxr_demo.zoo import DEFAULT_CHECKPOINTS, load_checkpoint
from tests.helpers import NIH, synthetic_xray

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = checkpoint_folders(DEFAULT_CHECKPOINTS)


def test_at_least_one_nih_checkpoint_is_committed():
    assert any(read_card(f).task == "nih14" for f in FOLDERS)


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_checkpoint_is_consistent(folder):
    card = read_card(folder)
    assert card.name == folder.name
    if card.architecture == ENSEMBLE_ARCHITECTURE:  # no weights of its own: it pins its members'
        assert card.sha256 == members_digest(card.model_args["members"])
        for m in card.model_args["members"]:
            assert read_card(folder.parent / m["name"]).sha256 == m["sha256"]
    else:
        assert sha256_file(folder / "model.safetensors") == card.sha256
    ev = json.loads((folder / "eval.json").read_text())
    assert ev["weights_sha256"] == card.sha256, "eval.json was computed on other weights: re-run training.evaluate"
    m = card.eval_metrics
    assert m is not None and m.source_file == "eval.json"
    assert m.macro_auroc == ev["macro_auroc"] and list(m.macro_auroc_ci95) == ev["macro_auroc_ci95"]
    assert m.n_images == ev["n_images"]
    assert m.per_label_auroc == {k: v["auroc"] for k, v in ev["per_label"].items() if v["auroc"] is not None}
    if card.task == "nih14":  # box IoU over every radiologist box of the test images
        assert m.mean_box_iou == ev["localisation"]["overall"]["mean_iou"]
        assert m.n_boxes == ev["localisation"]["overall"]["n_boxes"] > 0
        # studied heatmap defaults for every NIH model: the card's are the study's choice for these weights, and
        # eval.json's box numbers describe them
        assert card.explain_defaults is not None, f"no localisation study: python -m training.localisation {folder}"
        study = json.loads((ROOT / card.explain_defaults.source_file).read_text())
        assert study["model"] == card.name and study["weights_sha256"] == card.sha256
        chosen, kept = study["chosen"], card.explain_defaults
        assert (kept.method, kept.layer, kept.prior) == (chosen["method"], chosen["layer"], chosen["prior"])
        assert kept.box_rule == chosen["rule"]
        if kept.per_finding:  # the second stage's choice, for these weights and this heatmap (training.box_sources)
            pf = json.loads((ROOT / kept.per_finding_source_file).read_text())
            assert pf["model"] == card.name and pf["weights_sha256"] == card.sha256
            assert tuple(pf["heatmap"].values()) == (kept.method, kept.layer, kept.prior)
            assert {f: c.model_dump(exclude_none=True) for f, c in kept.per_finding.items()} == {
                f: {k: v for k, v in c.items() if not k.startswith("select_")} for f, c in pf["per_finding"].items()}
            assert kept.report_mean_iou == round(pf["report"]["mean_iou_over_findings"], 4)
            assert ev["localisation"]["overall"]["mean_iou_over_findings"] == pytest.approx(
                pf["report"]["mean_iou_over_findings"], abs=1e-9)
        else:
            assert kept.report_mean_iou == round(chosen["report"]["mean_iou_over_findings"], 4)
        free = study["image_free_baselines"][kept.image_free_baseline]["report"]["mean_iou_over_findings"]
        assert kept.image_free_baseline == study["margin_over_image_free"]["baseline"]
        assert kept.image_free_mean_iou == round(free, 4)
        assert (ev["localisation"]["method"], ev["localisation"]["prior"]) == (chosen["method"], chosen["prior"])
    else:
        assert m.mean_box_iou is None and ev["localisation"] is None
    if card.task_kind == "multiclass":
        counts = ev["confusion_matrix"]["counts"]
        assert sum(map(sum, counts)) == ev["n_images"]
        assert ev["accuracy"] == pytest.approx(sum(counts[i][i] for i in range(len(counts))) / ev["n_images"])
    assert f"test macro AUROC {ev['macro_auroc']:.3f}" in card.summary
    assert (folder / "roc.png").is_file()
    for op in card.operating_points:
        for lab in card.label_names:
            expected = None if op == "argmax" else card.threshold(op, lab)
            assert ev["operating_points"][op]["per_label"][lab]["threshold"] == expected
    if card.task_kind == "multilabel":  # flags mean something: the counts belong to these thresholds
        flags = json.loads((ROOT / card.training["flag_meaning"]["source_file"]).read_text())
        assert flags["weights_sha256"] == card.sha256
        assert card.training["flag_meaning"]["per_operating_point"] == flags["per_finding"]
        assert flags["operating_points"]["f1"]["ratio_to_true_all_flags"] <= F1_FLAG_BUDGET
        assert f"{F1_FLAG_BUDGET}x" in card.training["thresholds"]["rule"] == flags["threshold_rule"]
    if card.init.startswith("random"):
        assert "random" in card.summary
    model = load_checkpoint(folder)
    probs = predict_probabilities(model, card, preprocess(synthetic_xray(256), card))
    assert probs.shape == (1, card.num_classes)


@pytest.mark.parametrize("size, crop", [(224, None), (128, (0.15, 0.9, 0.2, 0.8))])
def test_the_app_feeds_a_model_exactly_what_training_and_evaluation_fed_it(tmp_path, monkeypatch, size, crop):
    """One film through the training cache (training and evaluation) and through the app's preprocessing
    gives the identical tensor: the app serves what was evaluated."""
    from PIL import Image

    from cxr_demo.card import ModelCard
    from cxr_demo.images import read_xray
    from cxr_demo.inference import normalise_batch
    from training.data import Record, cached_pixels

    real = sorted((NIH / "images").glob("*.png"))[:2] if (NIH / "images").is_dir() else []
    made = tmp_path / "synthetic.png"
    Image.fromarray((synthetic_xray(300) * 255).astype("uint8")).save(made)
    records = [Record(p, None, p.name, "test") for p in [made, *real]]
    cached = cached_pixels(records, size, crop, cache_dir=tmp_path / "cache")
    card = ModelCard(name="x", version="1", changelog=["x"], description="", summary="", task="nih14",
                     task_kind="multilabel", architecture="x", label_names=["a"], input_size=size, mean=0.5, std=0.5,
                     crop=crop, cam_target_layer="x", data_source="", init="", license="", sha256="0" * 64)
    for i, r in enumerate(records):
        served = preprocess(read_xray(r.path).pixels, card)
        assert torch.equal(served, normalise_batch(cached[i : i + 1], card.mean, card.std)), r.path.name


PRETRAIN = checkpoint_folders(ROOT / "pretrain")


@pytest.mark.parametrize("folder", PRETRAIN, ids=[f.name for f in PRETRAIN])
def test_pretraining_checkpoints_used_for_fine_tuning_are_intact(folder):
    card = read_card(folder)
    assert sha256_file(folder / "model.safetensors") == card.sha256
    assert card.task == "pretrain" and card.training["n_train"] > 0
    load_weights(card, folder / "model.safetensors")


def test_readme_zoo_table_is_current():
    from training.report import main

    assert main(["--check"]) == 0, "README.md's zoo table is stale: run python -m training.report"


def test_readme_client_example_runs(live_app, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the example's image path is relative to the project root, as for a user
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- client-example:start -->\n```python\n(.*?)```", text, re.S).group(1)
    block = block.replace('"http://127.0.0.1:7860/"', repr(live_app))
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Atelectasis" in out and "IoU" in out


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_model_card_readme_states_the_evaluation(folder):
    """The Hub model card's model-index carries eval.json's numbers (report --check keeps the text current)."""
    from huggingface_hub import ModelCard

    hub_card = ModelCard.load(folder / "README.md")
    ev = json.loads((folder / "eval.json").read_text())
    results = {r.metric_name: r.metric_value for r in hub_card.data.eval_results}
    assert results["macro AUROC"] == round(ev["macro_auroc"], 4)
    for label, v in ev["per_label"].items():
        if v["auroc"] is not None:
            assert results[f"AUROC {label}"] == round(v["auroc"], 4)
    assert hub_card.data.pipeline_tag == "image-classification" and "research-only" in hub_card.data.tags
    assert read_card(folder).sha256 in hub_card.text


WEIGHTS_BUDGET_MB = 320  # README "How weights travel": weights stay in git, bounded


def test_committed_weights_stay_within_budget_and_each_is_pinned_by_its_card():
    files = sorted((ROOT / "checkpoints").rglob("*.safetensors")) + sorted((ROOT / "pretrain").rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in files) <= WEIGHTS_BUDGET_MB * 1e6
    from cxr_demo.lungs import LUNG_CARD_FILE, read_lung_card

    for f in files:
        if (f.parent / LUNG_CARD_FILE).is_file():  # the lung-field model has its own card
            assert read_lung_card(f.parent).sha256 == sha256_file(f) and f.name == "model.safetensors"
            continue
        card = read_card(f.parent)
        pinned = card.sha256 if f.name == "model.safetensors" else card.ood.sha256 if card.ood and f.name == card.ood.file else None
        assert pinned == sha256_file(f), f"{f.relative_to(ROOT)} is not the file its card pins (a leftover copy?)"
