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
