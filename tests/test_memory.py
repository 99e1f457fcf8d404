"""Memory stays bounded under load: at most CXR_DEMO_MAX_LOADED_MODELS models in memory, and no
per-request growth once every code path has run (the server runs in this test process)."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from cxr_demo import uploads
from cxr_demo.uploads import RECENT_UPLOAD_BYTES
from cxr_demo.zoo import DEFAULT_MAX_LOADED
from tests.helpers import synthetic_xray

WARMUP_ROUNDS = 2
ROUNDS = 6
# Allocator noise left after trimming, plus the bounded memory of recently decoded uploads (UploadStore).
BOUND_MIB = 60 + RECENT_UPLOAD_BYTES / 2**20


def _live_rss_mib() -> float:
    """Resident memory after glibc hands freed heap pages back (``malloc_trim``).

    Untrimmed RSS also counts memory the allocator keeps for reuse: in CI, with the whole test suite's
    history in this process, it grew 198 MiB over 36 requests that leaked nothing. What is still
    resident after a trim is memory something holds on to, which is what a per-request leak is."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc/self/status on this platform")
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _growth_mib(client, tmp_path) -> tuple[float, int]:
    """RSS growth over ROUNDS rounds of /predict + /explain (after WARMUP_ROUNDS), and the request count.

    Every request sends a different 1024 x 1024 upload (4 MiB once decoded), so each one is decoded
    anew rather than served from the remembered uploads; keeping every decoded image would add 144 MiB.
    As many models as the loaded-model cache holds: cycling more models than that reloads one on every
    request, and the allocator churn of that alone is not what this test looks for."""
    models = [m for m in client.predict(api_name="/models") if m["task"] == "nih14"][:DEFAULT_MAX_LOADED]
    base = (synthetic_xray(1024) * 255).astype(np.uint8)
    counter = itertools.count()

    def fresh_upload() -> str:
        k = next(counter)
        pixels = base.copy()
        pixels.flat[k] ^= 1  # a different file, so a different content-addressed upload
        path = tmp_path / f"upload-{k}.png"
        Image.fromarray(pixels).save(path)
        return handle_file(str(path))

    def round_of_requests():
        for m in models:
            client.predict(fresh_upload(), m["name"], "f1", api_name="/predict")
            client.predict(fresh_upload(), m["name"], m["label_names"][0], "gradcam", "", 0.5, 0.0,
                           api_name="/explain")

    for _ in range(WARMUP_ROUNDS):
        round_of_requests()  # every model loaded once, allocator pools filled
    before = _live_rss_mib()
    for _ in range(ROUNDS):
        round_of_requests()
    grown = _live_rss_mib() - before
    n_requests = ROUNDS * 2 * len(models)
    print(f"RSS {before:.0f} MiB, +{grown:.1f} MiB over {n_requests} requests")
    return grown, n_requests


def test_rss_does_not_grow_with_requests(client, tmp_path):
    grown, n_requests = _growth_mib(client, tmp_path)
    assert grown < BOUND_MIB, f"RSS grew {grown:.0f} MiB over {n_requests} requests (bound {BOUND_MIB:.0f} MiB)"


def test_a_leak_of_decoded_uploads_would_be_caught(client, tmp_path, monkeypatch):
    """The measurement above can fail: keep every decoded upload alive and it goes over the bound."""
    kept = []
    decode = uploads.read_xray

    def leaky_read_xray(path):
        kept.append(decode(path))
        return kept[-1]

    monkeypatch.setattr(uploads, "read_xray", leaky_read_xray)
    grown, n_requests = _growth_mib(client, tmp_path)
    assert len(kept) >= n_requests
    assert grown > BOUND_MIB, f"a leak of {len(kept)} decoded uploads grew RSS by only {grown:.0f} MiB"
