import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    """Point every Hugging Face cache at tmp_path and keep tests off the network."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    for var in ("CXR_DEMO_HUB_REPO", "CXR_DEMO_HUB_REVISION", "CXR_DEMO_CHECKPOINTS", "CXR_DEMO_EXAMPLES"):
        monkeypatch.delenv(var, raising=False)
    yield


def pytest_configure(config):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
