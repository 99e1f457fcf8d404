"""Nothing of a patient left behind (#14): the app's private temporary folder is emptied at start, and on
SIGTERM the server stops and deletes what it created. Runs ``python app.py`` as a Space or container would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import free_port, synthetic_xray

ROOT = Path(__file__).resolve().parent.parent


def test_temp_files_are_cleaned_at_start_and_on_sigterm(tmp_path):
    from gradio_client import Client, handle_file

    private = Path(tempfile.gettempdir()) / f"cxr-demo-gradio-{os.getuid()}"
    private.mkdir(exist_ok=True)
    stale = private / "left-by-a-crash" / "patient.png"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"old film")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    server = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        client = None
        for _ in range(120):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        assert client is not None, "the app did not start"
        assert not stale.exists(), "a file from an earlier run survived the start"
        film = tmp_path / "film.png"
        Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(film)
        name = client.predict(api_name="/models")[0]["name"]
        client.predict(handle_file(str(film)), name, "", "gradcam", "", 0.5, 0.0, api_name="/explain")
        made = [p for p in private.rglob("*") if p.is_file() and p.name.endswith((".png", ".jpeg", ".webp"))
                and p.parent.parent == private and "examples" not in str(p)]
        assert made, "the overlay should exist until it is cleaned"
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        assert not private.exists() or not [p for p in private.rglob("*") if p.is_file()]
    finally:
        if server.poll() is None:
            server.kill()


def test_requests_leave_no_empty_temp_files(live_app, tmp_path):
    """Gradio 6.31's gr.File left an empty ``tmp*`` file in the cache folder on every call that handed on a file
    path (one per /predict); the app's upload component does not."""
    import httpx

    from tests.helpers import http_call, write_film

    film = write_film(tmp_path / "film.png")
    cache = Path(os.environ["GRADIO_TEMP_DIR"])

    def empty_files() -> set[Path]:
        return {p for p in cache.glob("tmp*") if p.is_file() and p.stat().st_size == 0}

    before = empty_files()
    with httpx.Client(timeout=120) as http:
        for _ in range(3):
            http_call(http, live_app, "predict", film, "nih14-small-cnn", "f1")
    assert empty_files() - before == set()


def test_an_upload_named_like_an_example_film_is_deleted_like_any_other(live_demo, tmp_path):
    """Example films' cached copies were told from uploads by their file name, so a patient's film uploaded as
    ``00013118_008.png`` stayed in the cache for good. They are told apart by path now: the upload goes once
    analysed and the example's own copy stays."""
    import httpx

    from cxr_demo.ui import kept_files
    from tests.helpers import call_event, write_film

    demo, url = live_demo
    kept = sorted(kept_files(demo))
    assert kept, "the live demo keeps its example films cached"
    film = write_film(tmp_path / Path(kept[0]).name)  # another film under an example's name
    with httpx.Client(timeout=120) as http:
        with open(film, "rb") as f:
            uploaded = http.post(url + "gradio_api/upload", files={"files": (film.name, f)}).json()[0]
        assert Path(uploaded).name == Path(kept[0]).name and Path(uploaded).is_file()
        kind, data = call_event(http, url, "predict", [{"path": uploaded, "meta": {"_type": "gradio.FileData"}},
                                                       "nih14-small-cnn", "f1"])
        assert kind == "complete", data
        assert not Path(uploaded).exists(), "a film uploaded under an example's name stayed on disk"
        assert Path(kept[0]).is_file(), "the example film's kept copy went"
        kind, data = call_event(http, url, "predict", [{"path": kept[0], "meta": {"_type": "gradio.FileData"}},
                                                       "nih14-small-cnn", "f1"])
        assert kind == "complete", data
        assert Path(kept[0]).is_file(), "analysing the example deleted its kept copy"


def test_a_delivered_overlay_goes_after_its_grace_and_examples_stay(live_demo, tmp_path):
    """An overlay (a whole radiograph) is deleted DELIVERED_GRACE_S after it has been fetched once, not two
    minutes after it was made; a second fetch then finds nothing. An example film's cached copy, fetched as
    often as pages show it, stays."""
    import httpx

    from cxr_demo.ui import DELIVERED_GRACE_S, kept_files
    from tests.helpers import call_event, write_film

    demo, url = live_demo
    film = write_film(tmp_path / "film.png")
    with httpx.Client(timeout=120) as http:
        with open(film, "rb") as f:
            uploaded = http.post(url + "gradio_api/upload", files={"files": (film.name, f)}).json()[0]
        kind, data = call_event(http, url, "explain", [{"path": uploaded, "meta": {"_type": "gradio.FileData"}},
                                                       "nih14-small-cnn", "", "gradcam", "", 0.5, 0.0])
        assert kind == "complete", data
        overlay = data[0]
        server_file = Path(overlay["path"])
        assert server_file.is_file(), "the overlay is there until it is fetched"
        time.sleep(DELIVERED_GRACE_S + 2)
        assert server_file.is_file(), "an overlay nobody fetched stays for ResultCleaner (2 minutes)"
        assert http.get(overlay["url"]).status_code == 200
        assert server_file.is_file(), "the page gets DELIVERED_GRACE_S to draw it"
        deadline = time.time() + DELIVERED_GRACE_S + 10
        while server_file.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert not server_file.exists(), "a delivered overlay outlived its grace"
        assert http.get(overlay["url"]).status_code >= 400
        kept = sorted(kept_files(demo))
        assert kept, "the live demo keeps its example films cached"
        for _ in range(2):
            assert http.get(url + "gradio_api/file=" + kept[0]).status_code == 200
        time.sleep(DELIVERED_GRACE_S + 2)
        assert Path(kept[0]).is_file(), "an example film's cached copy was deleted after it was shown"


def test_the_same_answer_for_a_second_request_outlives_the_first_ones_delivery(live_demo, tmp_path):
    """Gradio names a result by its content, so the same film explained the same way twice is one path. The first
    answer's delivery used to delete the file under the second one, whose client then got 403 (bench.serving's 30
    sequential /explain of one film failed this way). A file written again since its delivery is left for the
    later request's own fetch, which then deletes it after its grace."""
    import httpx

    from cxr_demo.ui import DELIVERED_GRACE_S
    from tests.helpers import call_event, write_film

    _demo, url = live_demo
    film = write_film(tmp_path / "film.png")
    with httpx.Client(timeout=120) as http:
        def explain() -> dict:
            with open(film, "rb") as f:
                uploaded = http.post(url + "gradio_api/upload", files={"files": (film.name, f)}).json()[0]
            kind, data = call_event(http, url, "explain", [{"path": uploaded, "meta": {"_type": "gradio.FileData"}},
                                                           "nih14-small-cnn", "", "gradcam", "", 0.5, 0.0])
            assert kind == "complete", data
            return data[0]

        first = explain()
        assert http.get(first["url"]).status_code == 200  # delivered: goes DELIVERED_GRACE_S from now
        time.sleep(1.0)
        second = explain()
        assert second["path"] == first["path"], "the same answer is the same file"
        time.sleep(DELIVERED_GRACE_S + 1)  # past the first delivery's grace
        assert http.get(second["url"]).status_code == 200, "the second answer was deleted under its client"
        server_file = Path(second["path"])
        deadline = time.time() + DELIVERED_GRACE_S + 10
        while server_file.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert not server_file.exists(), "the second delivery did not delete it"


def _gradio_moves_in(folder: Path, name: str, source: Path) -> Path:
    """What Gradio 6.31's upload route (and its result writers) do with a content-hash folder: make it with
    ``mkdir(exist_ok=True)``, then move the file in."""
    folder.mkdir(exist_ok=True, parents=True)
    dest = folder / name
    os.rename(source, dest)
    return dest


def test_a_deleted_upload_or_result_leaves_its_folder_to_a_request_for_the_same_content(tmp_path, monkeypatch):
    """Two clients sending the same film share Gradio's folder named by its sha256. Deleting the first one's upload
    (or a delivered result) used to remove that folder too, and a second upload caught between Gradio's
    ``mkdir(exist_ok=True)`` and its move failed with a 500 (FileExistsError: the folder existed when mkdir tried,
    and was gone when it looked again; seen once in test_simultaneous_requests_with_the_same_file_all_succeed).
    The folder now stays; ResultCleaner removes it once it has been empty for minutes."""
    import gradio as gr

    from cxr_demo.ui import delete_result
    from cxr_demo.uploads import UploadStore

    cache = tmp_path / "cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    incoming = tmp_path / "incoming.png"

    upload_folder = cache / ("a" * 64)
    incoming.write_bytes(b"film")
    first = _gradio_moves_in(upload_folder, "film.png", incoming)
    UploadStore().discard(str(first))
    assert not first.exists(), "the decoded upload is deleted at once"
    assert upload_folder.is_dir(), "the upload's folder went with it: a concurrent upload of the same film fails"
    incoming.write_bytes(b"film")
    assert _gradio_moves_in(upload_folder, "film.png", incoming).is_file()

    result_folder = cache / ("b" * 64)
    incoming.write_bytes(b"overlay")
    overlay = _gradio_moves_in(result_folder, "image.webp", incoming)
    with gr.Blocks() as demo:
        gr.Markdown("x")
    assert delete_result(demo, str(overlay))
    assert not overlay.exists()
    assert result_folder.is_dir(), "a delivered result's folder went with it: the same result written now fails"


def test_the_cleaner_removes_folders_empty_for_its_age_and_nothing_else(tmp_path):
    from cxr_demo.ui import delete_empty_folders

    old = time.time() - 600
    empty_old, empty_young, full_old = tmp_path / "empty-old", tmp_path / "empty-young", tmp_path / "full-old"
    for folder in (empty_old, empty_young, full_old):
        folder.mkdir()
    (full_old / "film.png").write_bytes(b"film")
    (tmp_path / "loose-file").write_bytes(b"x")
    for path in (empty_old, full_old):
        os.utime(path, (old, old))
    assert delete_empty_folders(tmp_path, age_s=120) == 1
    assert not empty_old.exists()
    assert empty_young.is_dir() and (full_old / "film.png").is_file() and (tmp_path / "loose-file").is_file()
    assert delete_empty_folders(tmp_path, age_s=None) == 1, "None: every empty folder, whatever its age"
    assert not empty_young.exists() and full_old.is_dir()
    assert delete_empty_folders(tmp_path / "gone", age_s=None) == 0


def test_the_running_cleaner_removes_empty_folders(tmp_path, monkeypatch):
    import gradio as gr

    from cxr_demo.ui import ResultCleaner

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    (tmp_path / ("c" * 64)).mkdir()
    with gr.Blocks() as demo:
        gr.Markdown("x")
    cleaner = ResultCleaner(demo, every_s=0.05, age_s=0).start()
    try:
        deadline = time.time() + 10
        while (tmp_path / ("c" * 64)).exists() and time.time() < deadline:
            time.sleep(0.05)
    finally:
        cleaner.stop()
    assert not (tmp_path / ("c" * 64)).exists()
