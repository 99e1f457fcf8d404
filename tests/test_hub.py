"""Hub-native checkpoints, offline: one repo per model that timm loads, the zoo over several repos at
pinned revisions (resolved once), pushes that create branches or open pull requests, tampered files
refused, and the Space's front matter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr_demo.card import CardError, read_card, write_card
from cxr_demo.models import WeightsError, load_weights
from cxr_demo.zoo import (
    DEFAULT_CHECKPOINTS,
    HubModel,
    ModelUnavailableError,
    Zoo,
    ZooSource,
    read_hub_models,
    source_from_env,
)
from tests.helpers import make_checkpoint

C1 = "1" * 40
C2 = "2" * 40


def hub_cache() -> Path:
    import huggingface_hub.constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


def publish_to_cache(repo: str, commit: str, src: Path, main: bool = True) -> None:
    """Lay out a model repo in the Hugging Face cache exactly as an earlier online download would have."""
    root = hub_cache() / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    if main:
        (root / "refs" / "main").write_text(commit)
    shutil.copytree(src, root / "snapshots" / commit)


def _scaled_weights(folder: Path, factor: float) -> None:
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v * factor if v.is_floating_point() else v for k, v in state.items()}, str(folder / "model.safetensors"))


def test_zoo_over_several_repos_at_pinned_revisions(tmp_path):
    publish_to_cache("org/alpha", C1, make_checkpoint(tmp_path / "a", name="alpha", seed=1))
    publish_to_cache("org/beta", C2, make_checkpoint(tmp_path / "b", name="beta", seed=2))
    zoo = Zoo(ZooSource(tmp_path / "unused", (HubModel("org/alpha", C1), HubModel("org/beta"))))
    assert sorted(zoo.names) == ["alpha", "beta"]
    assert zoo.hub_commits == {"alpha": ("org/alpha", C1), "beta": ("org/beta", C2)}
    assert C1 in str(zoo.weights_path("alpha")) and C2 in str(zoo.weights_path("beta"))
    assert isinstance(zoo.model("alpha"), torch.nn.Module) and isinstance(zoo.model("beta"), torch.nn.Module)


def test_revision_is_resolved_once_so_one_model_never_mixes_commits(tmp_path):
    """``main`` moves to a new commit after the zoo started: the weights still come from the first one."""
    publish_to_cache("org/alpha", C1, make_checkpoint(tmp_path / "a", name="alpha"))
    zoo = Zoo(ZooSource(tmp_path, (HubModel("org/alpha"),)))
    newer = make_checkpoint(tmp_path / "b", name="alpha", seed=5)
    publish_to_cache("org/alpha", C2, newer)  # refs/main now says C2
    assert C1 in str(zoo.weights_path("alpha"))
    zoo.model("alpha")  # the C1 weights match the C1 card
    assert Zoo(ZooSource(tmp_path, (HubModel("org/alpha"),))).hub_commits["alpha"][1] == C2


def test_tampered_hub_weights_are_refused(tmp_path):
    folder = make_checkpoint(tmp_path / "a", name="alpha")
    _scaled_weights(folder, 2.0)
    publish_to_cache("org/alpha", C1, folder)
    zoo = Zoo(ZooSource(tmp_path, (HubModel("org/alpha", C1),)))
    with pytest.raises(ModelUnavailableError, match="could not be loaded"):
        zoo.model("alpha")
    assert "sha256" in zoo.problems["alpha"] and zoo.names == []


def test_a_missing_repo_or_a_misnamed_one_is_skipped_with_a_reason(tmp_path):
    publish_to_cache("org/alpha", C1, make_checkpoint(tmp_path / "a", name="alpha"))
    publish_to_cache("org/renamed", C1, make_checkpoint(tmp_path / "b", name="beta"))
    zoo = Zoo(ZooSource(tmp_path, (HubModel("org/alpha"), HubModel("org/gone", C2), HubModel("org/renamed"))))
    assert zoo.names == ["alpha"]
    assert "org/gone" in zoo.problems["gone"] and "differs" in zoo.problems["renamed"]


def test_an_ensemble_over_member_repos(tmp_path):
    from cxr_demo.ensemble import ENSEMBLE_ARCHITECTURE, members_digest

    a = make_checkpoint(tmp_path / "a", name="alpha", seed=1)
    b = make_checkpoint(tmp_path / "b", name="beta", seed=2)
    members = [{"name": read_card(f).name, "sha256": read_card(f).sha256} for f in (a, b)]
    card = read_card(a).model_copy(update={"name": "both", "architecture": ENSEMBLE_ARCHITECTURE,
                                           "model_args": {"members": members}, "sha256": members_digest(members),
                                           "cam_target_layer": "members.0.bn2,members.1.bn2"})
    (tmp_path / "e" / "both").mkdir(parents=True)
    write_card(card, tmp_path / "e" / "both")
    for repo, folder in (("org/alpha", a), ("org/beta", b), ("org/both", tmp_path / "e" / "both")):
        publish_to_cache(repo, C1, folder)
    zoo = Zoo(ZooSource(tmp_path, tuple(HubModel(r, C1) for r in ("org/alpha", "org/beta", "org/both"))))
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        expected = (torch.sigmoid(zoo.model("alpha")(x)) + torch.sigmoid(zoo.model("beta")(x))) / 2
        assert torch.allclose(torch.sigmoid(zoo.model("both")(x)), expected, atol=1e-5)


def test_hub_model_list_from_env_items_or_collection_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_DEMO_HUB_MODELS", f"org/alpha@{C1}, org/beta")
    assert source_from_env() == ZooSource(DEFAULT_CHECKPOINTS, (HubModel("org/alpha", C1), HubModel("org/beta")))
    collection = tmp_path / "hub_models.json"
    collection.write_text(json.dumps({"models": [{"repo": "org/alpha", "revision": C1}]}))
    monkeypatch.setenv("CXR_DEMO_HUB_MODELS", str(collection))
    assert source_from_env().hub_models == (HubModel("org/alpha", C1),)
    monkeypatch.delenv("CXR_DEMO_HUB_MODELS")
    monkeypatch.setenv("CXR_DEMO_CHECKPOINTS", str(tmp_path))
    assert source_from_env() == ZooSource(tmp_path)


@pytest.mark.parametrize("bad", ["../x", "org/../x", "/etc/passwd", "org/x@..", "org", "org/a/b", "org/x@a%b"])
def test_hub_model_ids_that_are_not_ids_are_refused(bad):
    with pytest.raises(CardError):
        read_hub_models(bad)


def test_card_is_a_config_timm_loads_from_an_offline_hub_cache(tmp_path):
    """A checkpoint folder pushed as its own repo loads with timm.create_model("hf-hub:...") and gives the
    app's probabilities."""
    import timm
    from PIL import Image

    from cxr_demo.images import read_xray
    from cxr_demo.inference import preprocess
    from cxr_demo.service import DemoService
    from tests.helpers import synthetic_xray

    folder = make_checkpoint(tmp_path / "publish", name="tiny")
    model = load_weights(read_card(folder), folder / "model.safetensors")
    write_card(read_card(folder), folder, num_features=model.num_features)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["num_classes"] == 14 and raw["pretrained_cfg"]["input_size"] == [1, 64, 64]
    publish_to_cache("org/tiny", C1, folder)
    hub_model = timm.create_model("hf-hub:org/tiny", pretrained=True).eval()
    assert hub_model.pretrained_cfg["label_names"] == read_card(folder).label_names

    path = tmp_path / "x.png"
    Image.fromarray((synthetic_xray(80) * 255).astype("uint8")).save(path)
    xray = read_xray(path)
    with torch.inference_mode():
        timm_probs = torch.sigmoid(hub_model(preprocess(xray.pixels, read_card(folder))))[0].numpy()
    app = DemoService(Zoo(ZooSource(tmp_path, (HubModel("org/tiny"),)))).predict(xray, "tiny").document["findings"]
    assert [r["probability"] for r in app] == pytest.approx(timm_probs.tolist(), abs=1e-6)


class FakeHub:
    """Enough of ``HfApi`` to check what a push does: repos, branches (which must exist before a commit to
    them, as on the Hub), commits and pull requests."""

    def __init__(self) -> None:
        self.branches: dict[str, set[str]] = {}
        self.commits: list[dict] = []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        if repo_id in self.branches and not exist_ok:
            raise FileExistsError(repo_id)
        self.branches.setdefault(repo_id, {"main"})

    def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False):
        if branch in self.branches[repo_id] and not exist_ok:
            raise FileExistsError(branch)
        self.branches[repo_id].add(branch)

    def upload_folder(self, *, folder_path, repo_id, repo_type, revision, allow_patterns, commit_message,
                      create_pr=False):
        branch = revision or "main"
        if branch not in self.branches[repo_id]:
            raise LookupError(f"Revision Not Found: {branch}")
        files = sorted(p.name for p in Path(folder_path).iterdir() if p.name in allow_patterns)
        n = len(self.commits) + 1
        self.commits.append({"repo": repo_id, "branch": branch, "files": files, "pr": create_pr})
        return SimpleNamespace(oid=f"{n:040d}", pr_url=f"https://hf.co/{repo_id}/discussions/{n}" if create_pr else None)


def _publishable(tmp_path: Path, name: str = "tiny") -> Path:
    folder = make_checkpoint(tmp_path, name=name)
    (folder / "eval.json").write_text("{}")
    (folder / "README.md").write_text("---\nlibrary_name: timm\n---\n")
    return folder


def test_push_to_a_new_branch_creates_it(tmp_path):
    from training.hub import push_to_hub

    hub = FakeHub()
    result = push_to_hub(_publishable(tmp_path), "org/tiny", revision="retrain-2", api=hub)
    assert hub.branches["org/tiny"] == {"main", "retrain-2"}
    assert hub.commits == [{"repo": "org/tiny", "branch": "retrain-2", "pr": False,
                            "files": ["README.md", "config.json", "eval.json", "model.safetensors"]}]
    assert result["commit"] == "1".zfill(40) and result["revision"] == "retrain-2"


def test_push_can_open_a_pull_request_and_pins_commits_in_a_collection(tmp_path):
    from training.hub import main, push_to_hub, update_collection

    hub = FakeHub()
    folder = _publishable(tmp_path)
    result = push_to_hub(folder, "org/tiny", create_pr=True, api=hub)
    assert hub.commits[0]["pr"] and result["pr_url"].endswith("/discussions/1")
    collection = tmp_path / "hub_models.json"
    update_collection(collection, "org/tiny", C1)
    update_collection(collection, "org/other", C2)
    update_collection(collection, "org/tiny", C2)
    assert read_hub_models(str(collection)) == (HubModel("org/tiny", C2), HubModel("org/other", C2))
    with pytest.raises(SystemExit):
        main(["push", str(folder)])  # --org or --repo is required


def test_push_refuses_a_tampered_folder_or_a_repo_named_otherwise(tmp_path):
    from training.hub import push_to_hub

    folder = _publishable(tmp_path)
    with pytest.raises(ValueError, match="named like the model"):
        push_to_hub(folder, "org/cxr-zoo", api=FakeHub())
    (folder / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(WeightsError, match="sha256"):
        push_to_hub(folder, "org/tiny", api=FakeHub())


def test_space_front_matter_lists_and_preloads_the_pinned_models(tmp_path):
    from huggingface_hub import metadata_load

    from training.hub import MAX_PRELOAD, write_space_metadata

    readme = tmp_path / "README.md"
    shutil.copy(Path(__file__).resolve().parent.parent / "README.md", readme)
    models = tuple(HubModel(f"org/m{i}", f"{i:040d}") for i in range(12))
    write_space_metadata(readme, models)
    meta = metadata_load(readme)
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"  # the rest of the front matter is kept
    assert meta["models"] == [m.repo for m in models]
    assert len(meta["preload_from_hub"]) == MAX_PRELOAD
    repo, files, commit = meta["preload_from_hub"][0].split(" ")
    assert repo == "org/m0" and "model.safetensors" in files.split(",") and commit == "0" * 40
    assert "# Chest X-ray model zoo and demo" in readme.read_text()


def test_a_shipped_model_from_the_hub_must_carry_its_pinned_weights(tmp_path, caplog):
    """#14 item 10 for the Hub: a repo at ``main`` carrying one of the project's models with card and weights
    changed together loaded silently (only the local zoo was held to the pins). A shipped model's name is now held
    to cxr_demo/pinned_weights.json from any source; the deployer's own models load, with a log line naming the
    commit a moving revision resolved to."""
    import logging

    from cxr_demo.models import sha256_file

    name = "nih14-small-cnn"
    published = tmp_path / "published"
    shutil.copytree(DEFAULT_CHECKPOINTS / name, published)
    publish_to_cache(f"org/{name}", C1, published)
    assert Zoo(ZooSource(tmp_path, (HubModel(f"org/{name}"),))).names == [name], "the shipped weights load"

    tampered = tmp_path / "tampered"
    shutil.copytree(DEFAULT_CHECKPOINTS / name, tampered)
    _scaled_weights(tampered, 1.5)
    card = read_card(tampered)
    card.sha256 = sha256_file(tampered / "model.safetensors")
    write_card(card, tampered)
    publish_to_cache(f"org/{name}", C2, tampered)  # refs/main now says C2
    zoo = Zoo(ZooSource(tmp_path, (HubModel(f"org/{name}"),)))
    assert zoo.names == [] and "pinned" in zoo.problems[name]

    publish_to_cache("org/own", C1, make_checkpoint(tmp_path / "own", name="own"))
    with caplog.at_level(logging.WARNING, logger="cxr_demo.zoo"):
        assert Zoo(ZooSource(tmp_path, (HubModel("org/own"),))).names == ["own"]
    assert any("not pinned to a commit" in r.getMessage() and C1 in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cxr_demo.zoo"):
        assert Zoo(ZooSource(tmp_path, (HubModel("org/own", C1),))).names == ["own"]
    assert not any("not pinned" in r.getMessage() for r in caplog.records)
