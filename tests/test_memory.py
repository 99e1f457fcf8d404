"""Memory stays bounded under load: at most CXR_DEMO_MAX_LOADED_MODELS models in memory, and no
per-request growth once every code path has run (the server runs in this test process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from cxr_demo.ui import RECENT_UPLOAD_BYTES
from cxr_demo.zoo import DEFAULT_MAX_LOADED
from tests.helpers import synthetic_xray

ROUNDS = 6


def _rss_mib() -> float:
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc/self/status on this platform")
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_rss_does_not_grow_with_requests(client, tmp_path):
    # A 1024 x 1024 upload: 4 MiB once decoded, so keeping every decoded image would add ~200 MiB here.
    image = tmp_path / "big.png"
    Image.fromarray((synthetic_xray(1024) * 255).astype(np.uint8)).save(image)
    # As many models as the loaded-model cache holds: a per-request leak is what this test looks for.
    # Cycling more models than the cache holds reloads one on every request, and the allocator's
    # fragmentation from that churn alone grew RSS by ~70 MiB over 60 requests (5 models, 16-model zoo).
    models = [m for m in client.predict(api_name="/models") if m["task"] == "nih14"][:DEFAULT_MAX_LOADED]

    def round_of_requests():
        for m in models:
            client.predict(handle_file(str(image)), m["name"], "f1", api_name="/predict")
            client.predict(handle_file(str(image)), m["name"], m["label_names"][0], "gradcam", "", 0.5, 0.0,
                           api_name="/explain")

    for _ in range(2):
        round_of_requests()  # warm-up: every model loaded once, allocator pools filled
    before = _rss_mib()
    for _ in range(ROUNDS):
        round_of_requests()
    grown = _rss_mib() - before
    n_requests = ROUNDS * 2 * len(models)
    print(f"RSS {before:.0f} MiB, +{grown:.1f} MiB over {n_requests} requests")
    # 60 MiB of allocator noise plus the bounded memory of recently decoded uploads (UploadStore); keeping
    # every decoded image would add 144 MiB here.
    bound = 60 + RECENT_UPLOAD_BYTES / 2**20
    assert grown < bound, f"RSS grew {grown:.0f} MiB over {n_requests} requests (bound {bound:.0f} MiB)"
