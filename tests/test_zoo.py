"""The zoo: cards parse strictly, weights load only when they match, names are never paths, Hub offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr_demo.card import CardError, read_card
from cxr_demo.models import WeightsError, load_weights
from cxr_demo.zoo import UnknownModelError, Zoo, ZooSource
from tests.helpers import make_checkpoint


def test_card_round_trip_and_summary(tmp_path):
    card = read_card(make_checkpoint(tmp_path))
    entry = card.summary_entry()
    assert entry["name"] == "tiny" and entry["operating_points"] == ["f1", "youden", "screening"]
    assert len(entry["label_names"]) == 14


def test_card_missing_field_says_which(tmp_path):
    folder = make_checkpoint(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    del raw["sha256"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CardError, match="sha256"):
        read_card(folder)


@pytest.mark.parametrize("bad_name", ["../../etc/passwd", "/abs/path", "UPPER", "a" * 80, ""])
def test_card_name_cannot_be_a_path(tmp_path, bad_name):
    folder = make_checkpoint(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["name"] = bad_name
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CardError, match="name"):
        read_card(folder)


def test_thresholds_must_cover_every_label(tmp_path):
    folder = make_checkpoint(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    del raw["thresholds"]["f1"]["Hernia"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CardError, match="Hernia"):
        read_card(folder)


def test_tampered_weights_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.01
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(read_card(folder), folder / "model.safetensors")


def test_labels_that_do_not_match_the_head_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path, labels=["a", "b", "c"])
    other = make_checkpoint(tmp_path / "x", labels=["a", "b"])  # 2-class head
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    raw = json.loads((folder / "config.json").read_text())
    raw["sha256"] = json.loads((other / "config.json").read_text())["sha256"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match="do not fit"):
        load_weights(read_card(folder), folder / "model.safetensors")


def test_unknown_and_path_like_names_are_refused(tmp_path):
    make_checkpoint(tmp_path)
    zoo = Zoo(ZooSource(tmp_path))
    for name in ["../../etc/passwd", "nope", str(tmp_path / "tiny"), None]:
        with pytest.raises(UnknownModelError, match="Unknown model"):
            zoo.model(name)
    assert isinstance(zoo.model("tiny"), torch.nn.Module)


def test_broken_card_is_skipped_and_reported(tmp_path):
    make_checkpoint(tmp_path, name="good")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    zoo = Zoo(ZooSource(tmp_path))
    assert zoo.names == ["good"] and "bad" in zoo.problems


def test_loaded_model_cache_is_bounded(tmp_path):
    for i in range(4):
        make_checkpoint(tmp_path, name=f"m{i}", seed=i)
    zoo = Zoo(ZooSource(tmp_path), max_loaded=2)
    for name in ["m0", "m1", "m2", "m0", "m3"]:
        zoo.model(name)
    assert zoo.loaded == ["m0", "m3"]


def test_timm_fields_that_disagree_with_the_card_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["pretrained_cfg"]["mean"] = [0.1]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CardError, match="pretrained_cfg"):
        read_card(folder)
