"""training.promote: a training run becomes a zoo checkpoint, or the next major version of one."""

from __future__ import annotations

import json
import shutil

import pytest

from cxr_demo.card import read_card, write_card
from cxr_demo.models import sha256_file
from tests.helpers import tiny_nih_training, train_tiny
from training.promote import main as promote_main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promote")
    with pytest.MonkeyPatch.context() as mp:
        train_tiny(*tiny_nih_training(tmp, mp), "--name", "tiny-run")
    return tmp / "ck" / "tiny-run"


def test_a_run_becomes_a_new_checkpoint_under_its_zoo_name(run, tmp_path):
    folder = promote_main([str(run), "--name", "nih14-tiny", "--why", "first", "--checkpoints", str(tmp_path)])
    card = read_card(folder)
    assert card.sha256 == sha256_file(folder / "model.safetensors") == read_card(run).sha256
    assert (card.name, card.version, card.changelog) == ("nih14-tiny", "1.0.0", ["1.0.0: first"])
    assert card.training["command"] == read_card(run).training["command"]  # how the weights were made stays
    assert json.loads((folder / "config.json").read_text())["num_features"] is not None  # timm's fields too


def test_a_new_version_keeps_the_history_and_drops_what_described_the_old_weights(run, tmp_path):
    promote_main([str(run), "--name", "nih14-tiny", "--why", "first", "--checkpoints", str(tmp_path),
                  "--description", "the old recipe"])
    for derived in ("eval.json", "roc.png", "ood.safetensors"):
        (tmp_path / "nih14-tiny" / derived).write_text("about the old weights")
    folder = promote_main([str(run), "--name", "nih14-tiny", "--why", "retrained", "--checkpoints", str(tmp_path)])
    card = read_card(folder)
    assert card.version == "2.0.0" and card.changelog == ["2.0.0: retrained", "1.0.0: first"]
    assert card.description == "the old recipe"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "train_log.jsonl"]


def test_refuses_an_evaluated_checkpoint_and_another_tasks_name(run, tmp_path):
    evaluated = tmp_path / "evaluated"
    shutil.copytree(run, evaluated)
    card = read_card(evaluated)
    write_card(card.model_copy(update={"task": "chexpert"}), tmp_path / "evaluated")
    other = promote_main([str(evaluated), "--name", "other-task", "--why", "x", "--checkpoints", str(tmp_path / "ck")])
    with pytest.raises(ValueError, match="choose another name"):
        promote_main([str(run), "--name", "other-task", "--why", "x", "--checkpoints", str(tmp_path / "ck")])
    assert read_card(other).task == "chexpert"
    data = json.loads((run / "config.json").read_text())
    data["ood"] = {"file": "ood.safetensors", "sha256": "0" * 64, "threshold": 1.0, "source_file": "x.json"}
    (evaluated / "config.json").write_text(json.dumps(data))
    shutil.copy2(run / "model.safetensors", evaluated / "model.safetensors")
    with pytest.raises(ValueError, match="already an evaluated checkpoint"):
        promote_main([str(evaluated), "--name", "x", "--why", "x", "--checkpoints", str(tmp_path / "ck2")])
    (evaluated / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(ValueError, match="sha256 differs"):
        promote_main([str(evaluated), "--name", "x", "--why", "x", "--checkpoints", str(tmp_path / "ck2")])
