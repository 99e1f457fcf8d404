"""A broken checkpoint is withdrawn with a sentence and one log line, never an empty error, and never stays
listed in /models (#14): wrong sha256, unknown architecture, disallowed model_args, a CAM layer that does not
exist."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from cxr_demo.card import ChoiceError
from cxr_demo.images import read_xray
from cxr_demo.service import DemoService
from cxr_demo.zoo import ModelUnavailableError, Zoo, ZooSource
from tests.helpers import make_checkpoint, synthetic_xray


def _film(tmp_path):
    path = tmp_path / "film.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(path)
    return read_xray(path)


def _edit(folder, **changes):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("breakage", ["sha256", "architecture"])
def test_a_model_that_fails_to_load_is_withdrawn_with_a_sentence(tmp_path, caplog, breakage):
    root = tmp_path / "zoo"
    make_checkpoint(root, name="good", seed=1)
    bad = make_checkpoint(root, name="bad", seed=2)
    if breakage == "sha256":
        (bad / "model.safetensors").write_bytes((root / "good" / "model.safetensors").read_bytes())
    else:
        _edit(bad, architecture="no_such_network_anywhere")
    service = DemoService(Zoo(ZooSource(root)))
    assert {m["name"] for m in service.models()} == {"good", "bad"}
    with caplog.at_level(logging.ERROR, logger="cxr_demo.zoo"), pytest.raises(ModelUnavailableError) as info:
        service.predict(_film(tmp_path), "bad", "f1")
    assert "could not be loaded" in str(info.value) and "withdrawn" in str(info.value)
    assert [m["name"] for m in service.models()] == ["good"]
    assert sum("withdrew model bad" in r.getMessage() for r in caplog.records) == 1
    assert service.predict(_film(tmp_path), "good", "f1").document["findings"]  # the server keeps serving


@pytest.mark.parametrize("args", [{"in_chans": 1, "checkpoint_path": "/etc/passwd"}, {"in_chans": 1, "pretrained": True},
                                  {"in_chans": "1"}])
def test_model_args_outside_the_allowed_set_are_refused_when_the_zoo_is_read(tmp_path, args):
    root = tmp_path / "zoo"
    make_checkpoint(root, name="good")
    _edit(make_checkpoint(root, name="odd"), model_args=args)
    zoo = Zoo(ZooSource(root))
    assert zoo.names == ["good"] and "model_args" in zoo.problems["odd"]


def test_a_cam_layer_that_does_not_exist_gets_a_sentence(tmp_path):
    root = tmp_path / "zoo"
    _edit(make_checkpoint(root, name="m"), cam_target_layer="no.such.layer")
    with pytest.raises(ChoiceError, match="does not exist in this model"):
        DemoService(Zoo(ZooSource(root))).explain(_film(tmp_path), "m", None, "gradcam")


def test_a_card_and_weights_changed_together_do_not_load_against_the_pins(tmp_path):
    """The red team changed both weights and the card's sha256: it loaded silently (#14). With the sha256 pinned
    in the package, it is refused."""
    from safetensors.torch import load_file, save_file

    from cxr_demo.card import read_card, write_card
    from cxr_demo.models import sha256_file

    root = tmp_path / "zoo"
    folder = make_checkpoint(root, name="m")
    pins = {"m": {"sha256": read_card(folder).sha256, "ood_sha256": None}}
    assert Zoo(ZooSource(root), pins=pins).names == ["m"]
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}, str(folder / "model.safetensors"))
    card = read_card(folder)
    card.sha256 = sha256_file(folder / "model.safetensors")
    write_card(card, folder)
    assert Zoo(ZooSource(root)).names == ["m"]  # consistent card and weights: only the pin can tell
    zoo = Zoo(ZooSource(root), pins=pins)
    assert zoo.names == [] and "pinned" in zoo.problems["m"]
    assert "not pinned" in Zoo(ZooSource(root), pins={}).problems["m"]


def test_the_apps_default_zoo_serves_exactly_the_pinned_shipped_models(monkeypatch):
    from cxr_demo.zoo import DEFAULT_CHECKPOINTS, read_pins

    for var in ("CXR_DEMO_CHECKPOINTS", "CXR_DEMO_HUB_MODELS"):
        monkeypatch.delenv(var, raising=False)
    zoo = Zoo()
    assert zoo.pins == read_pins() and not zoo.problems
    assert sorted(zoo.names) == sorted(read_pins()) == sorted(p.name for p in DEFAULT_CHECKPOINTS.iterdir()
                                                              if (p / "config.json").is_file())
