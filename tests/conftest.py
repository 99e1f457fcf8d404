import os
import tempfile

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
    for var in ("CXR_DEMO_HUB_MODELS", "CXR_DEMO_CHECKPOINTS", "CXR_DEMO_EXAMPLES"):
        monkeypatch.delenv(var, raising=False)
    yield


def pytest_configure(config):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # A fresh Gradio upload folder per test run, so upload-deletion tests see only this run's files.
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="cxr-tests-gradio-")


@pytest.fixture(scope="session")
def live_demo():
    """The real app (committed checkpoints, shipped examples) served on 127.0.0.1; yields (Blocks, URL)."""
    from cxr_demo.ui import build_demo, configure_queue, launch_kwargs
    from cxr_demo.zoo import DEFAULT_CHECKPOINTS, Zoo, ZooSource

    zoo = Zoo(ZooSource(DEFAULT_CHECKPOINTS))
    assert zoo.names, "no committed checkpoint under checkpoints/"
    demo = build_demo(zoo)
    configure_queue(demo)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                            **launch_kwargs(demo))
    yield demo, url
    demo.close()


@pytest.fixture(scope="session")
def live_app(live_demo):
    """The live app's URL."""
    return live_demo[1]


@pytest.fixture(scope="module")
def client(live_app):
    """A gradio_client for the live app."""
    from gradio_client import Client

    return Client(live_app, verbose=False)


@pytest.fixture(scope="module")
def model_name(client):
    """The first zoo model, as /models lists it."""
    return client.predict(api_name="/models")[0]["name"]
