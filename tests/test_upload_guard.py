"""Uploads belong to whoever sent them (#14 item 8), through the running server: a path seen in a log and replayed
by another client gets a sentence, not the first client's film; one upload request carries at most a few files."""

from __future__ import annotations

import os
import time

import httpx
import numpy as np
from PIL import Image

from cxr_demo.uploads import MAX_FILES_PER_UPLOAD, NOT_YOUR_UPLOAD
from tests.helpers import call_event, synthetic_xray


def _film(path, seed=0):
    Image.fromarray((synthetic_xray(128, seed) * 255).astype(np.uint8)).save(path)
    return path


def _call(http, url, path, model_name, headers=None):
    return call_event(http, url, "predict", [{"path": path, "meta": {"_type": "gradio.FileData"}}, model_name, "f1"],
                      headers)


def test_a_replayed_upload_path_gets_a_sentence_not_the_film(live_app, model_name, tmp_path):
    film = _film(tmp_path / "mine.png", seed=7)
    with httpx.Client(timeout=120) as http:
        with open(film, "rb") as f:
            path = http.post(live_app + "gradio_api/upload", files={"files": (film.name, f)},
                             headers={"X-Forwarded-For": "203.0.113.5"}).json()[0]
        # another client, who saw the path (e.g. in a log), asks first while the file is still there ...
        kind, data = _call(http, live_app, path, model_name, {"X-Forwarded-For": "198.51.100.9"})
        assert kind == "error" and NOT_YOUR_UPLOAD[:40] in data, data
        # ... the uploader's own call works and deletes the file ...
        kind, data = _call(http, live_app, path, model_name, {"X-Forwarded-For": "203.0.113.5"})
        assert kind == "complete" and data[0]["findings"]
        # ... and the replay afterwards does not get the remembered decode either
        kind, data = _call(http, live_app, path, model_name, {"X-Forwarded-For": "198.51.100.9"})
        assert kind == "error" and NOT_YOUR_UPLOAD[:40] in data, data


def test_an_upload_request_with_too_many_files_is_refused_and_nothing_is_kept(live_app, tmp_path):
    from gradio.utils import get_upload_folder

    films = [_film(tmp_path / f"many-{i}-c41e.png", seed=20 + i) for i in range(MAX_FILES_PER_UPLOAD + 1)]
    with httpx.Client(timeout=120) as http:
        handles = [open(f, "rb") for f in films]
        try:
            r = http.post(live_app + "gradio_api/upload", files=[("files", (f.name, h)) for f, h in zip(films, handles)])
        finally:
            for h in handles:
                h.close()
        assert r.status_code == 413 and f"At most {MAX_FILES_PER_UPLOAD} files" in r.text
        for _ in range(40):  # the server deletes them once Gradio has moved them into place (within seconds)
            # os.walk, not rglob: the server removes folders while this looks (rglob raises on a vanished one)
            left = [name for _, _, names in os.walk(get_upload_folder()) for name in names if name.endswith("-c41e.png")]
            if not left:
                break
            time.sleep(0.25)
        assert left == []
        with open(films[0], "rb") as f:  # a normal upload still works
            ok = http.post(live_app + "gradio_api/upload", files={"files": (films[0].name, f)})
        assert ok.status_code == 200 and len(ok.json()) == 1


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_upload_rate_buckets_refill_per_client_and_for_everyone():
    from cxr_demo.uploads import MIB, UploadRate

    clock = _Clock()
    rate = UploadRate(client_mib_per_minute=4, total_mib_per_minute=6, clock=clock)
    assert rate.take("a", 3 * MIB) == (0.0, None)
    wait, whose = rate.take("a", 2 * MIB)  # 1 MiB left: 1 more MiB takes 15 s at 4 MiB a minute
    assert whose == "client" and abs(wait - 15.0) < 1e-6
    assert rate.take("a", 100) == (0.0, None)  # a tiny upload counts 1 MiB: the last one
    assert rate.take("a", 100)[1] == "client"
    assert rate.take("b", None) == (0.0, None)  # another client has its own bucket ...
    assert rate.take("c", 2 * MIB)[1] == "server"  # ... but everyone together has 6 MiB a minute (5 used)
    clock.t = 30.0  # half a minute: 2 MiB back for a, 3 MiB for everyone
    assert rate.take("a", 2 * MIB) == (0.0, None)
    rate.charge("b", 10 * MIB)  # an upload without a Content-Length, charged afterwards
    assert rate.take("b", None)[1] == "client"


def test_upload_rate_forgets_full_buckets_first():
    from cxr_demo.uploads import MIB, UploadRate

    clock = _Clock()
    rate = UploadRate(client_mib_per_minute=4, total_mib_per_minute=10**6, max_clients=3, clock=clock)
    for who in ("a", "b", "c"):
        rate.take(who, MIB)
    clock.t = 60.0  # a, b, c are full again
    rate.take("d", 4 * MIB)
    rate.take("e", 4 * MIB)
    assert set(rate._buckets) <= {"", "d", "e"}
    assert rate.take("d", MIB)[1] == "client"  # d's empty bucket was kept


def test_a_client_over_its_upload_rate_gets_429_with_a_sentence_and_nothing_is_stored(live_app, tmp_path,
                                                                                        monkeypatch):
    from gradio.utils import get_upload_folder

    from cxr_demo import uploads

    monkeypatch.setattr(uploads, "UPLOAD_RATE", uploads.UploadRate(client_mib_per_minute=3, total_mib_per_minute=100))
    film = _film(tmp_path / "rate-9d1f.png", seed=3)
    flood = {"X-Forwarded-For": "192.0.2.77"}
    with httpx.Client(timeout=60) as http:
        def upload(headers):
            with open(film, "rb") as f:
                return http.post(live_app + "gradio_api/upload", files={"files": (film.name, f)}, headers=headers)

        before = len([n for _, _, names in os.walk(get_upload_folder()) for n in names if n.endswith("-9d1f.png")])
        assert all(upload(flood).status_code == 200 for _ in range(3))  # each counts 1 MiB
        refused = upload(flood)
        assert refused.status_code == 429, refused.text
        assert "Too many uploads from this address" in refused.text and "MiB a minute" in refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 20
        stored = len([n for _, _, names in os.walk(get_upload_folder()) for n in names if n.endswith("-9d1f.png")])
        assert stored - before <= 3  # the refused one was never read, let alone stored
        assert upload({"X-Forwarded-For": "192.0.2.78"}).status_code == 200  # another client is not held up
