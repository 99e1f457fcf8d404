"""End to end: the real app and checkpoint, driven through gradio_client as a script would."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from tests.helpers import NIH, png_declaring, synthetic_xray

BOXED = NIH / "images" / "00013118_008.png"  # official box: Atelectasis
needs_nih = pytest.mark.skipif(not BOXED.is_file(), reason="../shared/data/nih14 is not present")


def _overlap(a, b) -> tuple[float, float]:
    """IoU and IoBB of two [x, y, w, h] boxes, written out here independently of the app's code."""
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter), inter / (b[2] * b[3])


def assert_overlap_matches_the_boxes(doc: dict) -> None:
    """The IoU/IoBB an /explain document reports are those of the boxes it returns (best predicted box
    per ground-truth box; boxes are rounded to 0.1 px in the document, hence the tolerance)."""
    pred, truth = doc["predicted_boxes"], doc["ground_truth_boxes"]
    assert pred and truth and len(doc["per_box"]) == len(truth)
    for t, row in zip(truth, doc["per_box"], strict=True):
        assert row["ground_truth"] == t
        assert row["iou"] == pytest.approx(max(_overlap(p, t)[0] for p in pred), abs=0.01)
        assert row["iobb"] == pytest.approx(max(_overlap(p, t)[1] for p in pred), abs=0.01)
    assert doc["iou"] == pytest.approx(max(_overlap(p, t)[0] for p in pred for t in truth), abs=0.01)
    assert doc["iobb"] == pytest.approx(max(_overlap(p, t)[1] for p in pred for t in truth), abs=0.01)


def test_models_lists_the_zoo(client):
    models = client.predict(api_name="/models")
    assert models and {"name", "task", "label_names", "operating_points", "headline_metrics"} <= set(models[0])
    nih = [m for m in models if m["task"] == "nih14"]
    assert nih and nih[0]["headline_metrics"]["macro_auroc"] > 0.5


def _unboxed_test_image():
    boxed = {line.split(",")[0] for line in (NIH / "BBox_List_2017.csv").read_text().splitlines()[1:]}
    test = (NIH / "test_list.txt").read_text().split()
    return next(NIH / "images" / n for n in test if n not in boxed and (NIH / "images" / n).is_file())


@needs_nih
def test_predict_document(client, model_name):
    doc, html = client.predict(handle_file(str(BOXED)), model_name, "f1", api_name="/predict")
    assert doc["model"] == model_name and doc["operating_point"] == "f1"
    models = client.predict(api_name="/models")
    labels = next(m["label_names"] for m in models if m["name"] == model_name)
    assert [f["name"] for f in doc["findings"]] == labels  # card order
    for f in doc["findings"]:
        assert 0 <= f["probability"] <= 1 and 0 <= f["threshold"] <= 1
        assert f["passes_threshold"] == (f["probability"] >= f["threshold"])
        lo, hi = f["test_auroc_ci95"]
        assert lo <= f["test_auroc"] <= hi and f["reliable"] == (lo > 0.5)
        assert f["positive"] == (f["passes_threshold"] and f["reliable"])  # a chance-level finding is never flagged
        if not f["reliable"]:
            assert "not reliable" in f["note"]
        # what the flag means on validation (training.flag_rates stored it in the card)
        assert f["validation_specificity"] is not None and 0 <= f["validation_specificity"] <= 1
        assert f["validation_sensitivity"] is None or 0 <= f["validation_sensitivity"] <= 1
    assert "cxr-findings" in html
    if any(not f["reliable"] for f in doc["findings"]):
        assert "not reliable" in html


@needs_nih
def test_operating_points_change_thresholds(client, model_name):
    f1 = client.predict(handle_file(str(BOXED)), model_name, "f1", api_name="/predict")[0]
    scr = client.predict(handle_file(str(BOXED)), model_name, "screening", api_name="/predict")[0]
    assert [r["probability"] for r in f1["findings"]] == [r["probability"] for r in scr["findings"]]
    assert [r["threshold"] for r in f1["findings"]] != [r["threshold"] for r in scr["findings"]]


@needs_nih
def test_explain_with_nih_ground_truth(client, model_name):
    overlay, doc, note = client.predict(handle_file(str(BOXED)), model_name, "Atelectasis", "gradcam", "", 0.5, 0.5,
                                        api_name="/explain")
    assert doc["finding"] == "Atelectasis" and doc["method"] == "gradcam"
    assert doc["ground_truth_source"] == "NIH BBox_List_2017.csv"
    assert len(doc["ground_truth_boxes"]) == 1 and len(doc["predicted_boxes"]) == 1
    # the official box (225, 547, 87, 79) in the 1024 frame, scaled to the 384 px image
    assert doc["ground_truth_boxes"][0] == pytest.approx([84.4, 205.1, 32.5, 29.7], abs=0.1)
    assert_overlap_matches_the_boxes(doc)
    im = Image.open(overlay)
    assert im.size == (384, 384) and im.mode == "RGB"


@needs_nih
def test_explain_without_ground_truth_has_null_iou(client, model_name):
    _, doc, note = client.predict(handle_file(str(_unboxed_test_image())), model_name, "", "default",
                                  api_name="/explain")
    assert doc["iou"] is None and doc["iobb"] is None and doc["ground_truth_boxes"] == []
    assert any("No ground-truth box" in w for w in doc["warnings"])


def test_explain_with_typed_box(client, model_name, tmp_path):
    path = tmp_path / "synthetic.png"
    Image.fromarray((synthetic_xray(200) * 255).astype(np.uint8)).save(path)
    _, doc, _ = client.predict(handle_file(str(path)), model_name, "Effusion", "eigencam", "0, 0, 200, 200",
                               api_name="/explain")
    assert doc["ground_truth_source"] == "typed by user"
    # the typed box covers the whole image, so IoU = the largest predicted box's area / image area
    largest = max(w * h for _, _, w, h in doc["predicted_boxes"])
    assert doc["iou"] == pytest.approx(largest / (200 * 200), rel=1e-3)
    assert doc["iobb"] == pytest.approx(doc["iou"], rel=1e-3)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


BAD = {
    "empty.png": (b"", "empty"),
    "text.png": (b"hello, I am not an image\n", "not an image"),
    "truncated.png": (_png_bytes(Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)))[:3000], "damaged"),
    "one.png": (_png_bytes(Image.new("L", (1, 1))), "too small"),
    "huge.png": (png_declaring(30000, 30000, zlib.compress(b"\x00" * 100)), "too large"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_an_error_sentence_and_the_app_keeps_serving(client, model_name, tmp_path, name):
    data, expected = BAD[name]
    bad = tmp_path / name
    bad.write_bytes(data)
    for api, args in (("/predict", (model_name, "f1")), ("/explain", (model_name, "", "gradcam")),
                      ("/report", (model_name, "f1"))):
        with pytest.raises(Exception) as info:
            client.predict(handle_file(str(bad)), *args, api_name=api)
        assert expected in str(info.value), str(info.value)
        assert "Traceback" not in str(info.value) and "/tmp" not in str(info.value)
    good = tmp_path / "good.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(good)
    doc, _ = client.predict(handle_file(str(good)), model_name, "f1", api_name="/predict")
    assert len(doc["findings"]) > 0


@pytest.mark.parametrize("args, expected", [
    (("../../etc/passwd", "f1"), "Unknown model"),
    (("MODEL", "nonsense-op"), "Unknown operating point"),
])
def test_bad_choices_are_refused(client, model_name, tmp_path, args, expected):
    good = tmp_path / "good.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(good)
    args = tuple(model_name if a == "MODEL" else a for a in args)
    with pytest.raises(Exception, match=expected):
        client.predict(handle_file(str(good)), *args, api_name="/predict")


def _red_team_file(kind: str, folder: Path) -> Path:
    """The red team's files of #14 items 1, 2, 5 and 6, built as tests/test_images.py builds them in-process."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from tests.test_images import write_dicom

    arr = np.round(synthetic_xray(128) * 4095).astype(np.uint16)
    if kind == "pixel-bomb.png":  # 6000 x 6000 in a few tens of KB
        path = folder / kind
        Image.fromarray(np.zeros((6000, 6000), np.uint8)).save(path, optimize=True)
        return path
    if kind == "film.dcm":  # a PNG named like DICOM
        path = folder / kind
        Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(path, format="PNG")
        return path
    if kind == "window-zero.dcm":
        return write_dicom(folder / kind, arr, window=(2000, 0))
    path = write_dicom(folder / kind, arr)
    ds = pydicom.dcmread(path)
    if kind == "deflated-bomb.dcm":  # 16 MiB of zeros once inflated, a few KB on the wire
        ds.add_new(0x00091010, "OB", b"\0" * (16 * 2**20))
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif kind == "two-frames.dcm":
        ds.PixelData = arr.tobytes() * 2
    elif kind == "short-pixels.dcm":
        ds.PixelData = arr.tobytes()[: arr.nbytes // 2]
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("deflated-bomb.dcm", "Deflated DICOM files are not accepted"),
    ("pixel-bomb.png", "decompression bomb"),
    ("two-frames.dcm", "more pixel data than its header declares"),
    ("short-pixels.dcm", "shorter than its header declares"),
])
def test_the_red_teams_files_get_their_sentence_through_the_server(client, model_name, tmp_path, kind, expected):
    """#14 items 1, 2 and 6 through the running app (test_images.py has them in-process, with time and memory):
    each file is answered with its sentence within seconds, and the next film is analysed."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(Exception, match=expected):
        client.predict(handle_file(str(_red_team_file(kind, tmp_path))), model_name, "f1", api_name="/predict")
    assert time.perf_counter() - t0 < 10
    good = tmp_path / "good.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(good)
    assert client.predict(handle_file(str(good)), model_name, "f1", api_name="/predict")[0]["findings"]


@pytest.mark.parametrize("kind, note", [
    ("film.dcm", "named like DICOM but is a PNG"),
    ("window-zero.dcm", "window width is zero or negative"),
])
def test_the_red_teams_readable_files_are_read_with_a_note_through_the_server(client, model_name, tmp_path, kind,
                                                                              note):
    """#14 items 5 and 6: a PNG named .dcm was told it "holds no image"; a DICOM window width of 0 was an empty
    error. Through the running app both are analysed, with a note that says what was done."""
    doc, _ = client.predict(handle_file(str(_red_team_file(kind, tmp_path))), model_name, "f1", api_name="/predict")
    assert doc["findings"] and any(note in w for w in doc["warnings"]), doc["warnings"]


@pytest.mark.parametrize("finding, method, box, opacity, threshold, expected", [
    ("NotAFinding", "gradcam", "", 0.5, 0.0, "has no finding"),
    ("Effusion", "magic-cam", "", 0.5, 0.0, "Unknown heatmap method"),
    ("Effusion", "gradcam", "1, 2, 3", 0.5, 0.0, "x, y, w, h"),
    # The red team's empty errors and wrongly accepted input (#14): each answered with a sentence.
    ("Effusion", 5, "", 0.5, 0.0, "heatmap method must be given as text"),
    ("Effusion", ["gradcam"], "", 0.5, 0.0, "heatmap method must be given as text"),
    ("Effusion", "gradcam", "[NaN, 0, 10, 10]", 0.5, 0.0, "not a finite number"),
    ("Effusion", "gradcam", "[0, 0, NaN, 10]", 0.5, 0.0, "not a finite number"),
    ("Effusion", "gradcam", "[0, 0, 1e-300, 1e-300]", 0.5, 0.0, "at least one pixel"),
    ("Effusion", "gradcam", "[true, 0, 10, 10]", 0.5, 0.0, "four numbers"),
    ("Effusion", "gradcam", "[" * 100_000 + "]" * 100_000, 0.5, 0.0, "Too much ground-truth text"),
    ("Effusion", "gradcam", "[[[[1, 2, 3, 4]]]]", 0.5, 0.0, "Write each ground-truth box"),
    ("Effusion", "gradcam", "; ".join(["1, 1, 5, 5"] * 100), 0.5, 0.0, "at most 20"),
    ("Effusion", "gradcam", "", "abc", 0.0, "opacity must be a number"),
    ("Effusion", "gradcam", "", None, 0.0, "opacity must be a number"),
    ("Effusion", "gradcam", "", 0.5, "abc", "box threshold must be a number"),
    ("Effusion", "gradcam", "", "nan", 0.0, "opacity must be a number"),
    ("Effusion", "gradcam", "", 0.5, 1e9, "box threshold must be a number"),
])
def test_bad_explain_arguments_are_refused(client, model_name, tmp_path, finding, method, box, opacity, threshold,
                                           expected):
    good = tmp_path / "good.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(good)
    with pytest.raises(Exception, match=expected):
        client.predict(handle_file(str(good)), model_name, finding, method, box, opacity, threshold,
                       api_name="/explain")


@needs_nih
def test_report_is_a_one_page_pdf_with_the_findings_the_model_and_the_box(client, model_name):
    """/report returns a PDF (opened here with pypdf) that holds the film's findings as /predict gives them, the
    model's name and weights hash, the operating point, the radiologist's box overlap and the disclaimer."""
    from pypdf import PdfReader

    from cxr_demo import INTENDED_USE
    from cxr_demo.labels import display_name

    doc, _ = client.predict(handle_file(str(BOXED)), model_name, "f1", api_name="/predict")
    path = client.predict(handle_file(str(BOXED)), model_name, "f1", "Atelectasis", "default", "",
                          api_name="/report")
    data = Path(path).read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-64:]
    reader = PdfReader(io.BytesIO(data))
    assert len(reader.pages) == 1
    text = " ".join(reader.pages[0].extract_text().split())
    assert model_name in text and "Operating point: f1" in text and INTENDED_USE in text
    from cxr_demo.card import read_card
    from cxr_demo.zoo import DEFAULT_CHECKPOINTS

    assert read_card(DEFAULT_CHECKPOINTS / model_name).sha256 in text
    for row in doc["findings"]:
        line = f"{display_name(row['name'])} {row['probability']:.3f} {row['threshold']:.3f}"
        assert line in text, line
        if row["positive"]:
            assert f"{line} POSITIVE" in text
    assert "IoU with the radiologist's box" in text and "Atelectasis" in text
    assert "00013118_008.png" in text


def test_compare_runs_every_model_of_the_chosen_models_task(client, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(good)
    models = client.predict(api_name="/models")
    html, doc = client.predict(handle_file(str(good)), "f1", api_name="/compare")  # the default model's task
    assert list(doc["results"]) == [m["name"] for m in models if m["task"] == models[0]["task"]] and "<table" in html
    paediatric = next(m for m in models if m["task"].startswith("kermany"))
    _, doc = client.predict(handle_file(str(good)), "f1", paediatric["name"], api_name="/compare")
    assert list(doc["results"]) == [m["name"] for m in models if m["task"] == paediatric["task"]]


@needs_nih
def test_uploads_are_not_kept_after_the_request(client, model_name, tmp_path):
    """An API upload is decoded and deleted: nothing with the image's name is left in Gradio's cache."""
    from gradio.utils import get_upload_folder

    unique = tmp_path / "never-kept-7f3a.png"
    unique.write_bytes(BOXED.read_bytes())
    for api, args in (("/predict", (model_name, "f1")), ("/explain", (model_name, "", "gradcam", "", 0.5, 0.0))):
        client.predict(handle_file(str(unique)), *args, api_name=api)
        left = list(Path(get_upload_folder()).rglob(unique.name))
        assert left == [], f"{api} left the upload on disk: {left}"


def test_simultaneous_requests_with_the_same_file_all_succeed(live_app, model_name, tmp_path):
    """Gradio stores identical bytes at one path; one request deleting it must not break the others
    (found by the 8-client benchmark: 3 of 6 requests failed with 'could not be found')."""
    import threading

    from gradio.utils import get_upload_folder
    from gradio_client import Client

    same = tmp_path / "shared-by-four-2c9e.png"
    Image.fromarray((synthetic_xray(256) * 255).astype(np.uint8)).save(same)
    errors: list[str] = []
    done: list[int] = []

    def worker() -> None:
        c = Client(live_app, verbose=False)
        for i in range(3):
            try:
                if i == 1:
                    c.predict(handle_file(str(same)), model_name, "", "gradcam", "", 0.5, 0.0, api_name="/explain")
                else:
                    c.predict(handle_file(str(same)), model_name, "f1", api_name="/predict")
                done.append(1)
            except Exception as e:  # collected: the assertion below names them
                errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(done) == 12
    assert list(Path(get_upload_folder()).rglob(same.name)) == []


def test_upload_store_reuses_a_just_decoded_upload_and_forgets_it(tmp_path, monkeypatch):
    """Unit view of the same: the second take of a deleted content-addressed path gets the decoded
    image while it is recent, and the sentence for a missing file once it is not."""
    from gradio.utils import get_upload_folder

    from cxr_demo import uploads
    from cxr_demo.images import ImageInputError
    from cxr_demo.uploads import UploadStore

    folder = Path(get_upload_folder()) / "0123abcd"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "x.png"
    Image.fromarray((synthetic_xray(64) * 255).astype(np.uint8)).save(path)
    store = UploadStore(recent_seconds=60)
    first = store.take(str(path), None)
    assert not path.exists() and store.recent_count() == 1
    assert store.take(str(path), None) is first
    # each use keeps it another recent_seconds: alive 90 s after its decode when used at 50 s
    now = uploads.now()
    clock = iter([now + 50, now + 90, now + 151])
    monkeypatch.setattr(uploads, "now", lambda: next(clock))
    assert store.take(str(path), None) is first
    assert store.take(str(path), None) is first
    with pytest.raises(ImageInputError, match="could not be found"):  # 61 s after its last use
        store.take(str(path), None)
    assert store.recent_count() == 0
    monkeypatch.undo()
    big = UploadStore(recent_bytes=100)
    path.parent.mkdir(exist_ok=True)
    Image.fromarray((synthetic_xray(64) * 255).astype(np.uint8)).save(path)
    big.take(str(path), None)
    assert big.recent_count() == 0  # larger than the budget: not remembered


def test_upload_over_the_size_limit_is_refused_and_the_app_keeps_serving(client, model_name, tmp_path):
    """Gradio's max_file_size (64 MB) refuses the upload itself, before any handler runs."""
    big = tmp_path / "huge.png"
    with open(big, "wb") as f:
        f.write(png_declaring(8000, 8000))
        f.truncate(65 * 2**20)
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(big)), model_name, "f1", api_name="/predict")
    ok = tmp_path / "ok.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(ok)
    assert client.predict(handle_file(str(ok)), model_name, "f1", api_name="/predict")[0]["findings"]


@needs_nih
def test_plain_http_api_as_curl_uses_it(live_app, model_name):
    """The README's curl route (upload, POST /gradio_api/call/<api>, read the event stream) gives the same
    document as gradio_client, and an error event carries the sentence."""
    import httpx

    from tests.helpers import http_call

    url = live_app if live_app.endswith("/") else live_app + "/"
    with httpx.Client(timeout=120) as http:
        doc, _html = http_call(http, url, "predict", BOXED, model_name, "f1")
        assert doc["model"] == model_name and len(doc["findings"]) >= 2
        _overlay, box_doc, _note = http_call(http, url, "explain", BOXED, model_name, "Atelectasis", "default", "", 0.5, 0.0)
        assert_overlap_matches_the_boxes(box_doc)
        with pytest.raises(RuntimeError, match="Unknown model"):
            http_call(http, url, "predict", BOXED, "../../etc/passwd", "f1")


def test_user_errors_log_one_line_each_without_traceback_or_file_name(client, model_name, tmp_path, caplog, capfd):
    """The red team counted 59 tracebacks for ~30 bad inputs, each naming the uploaded file (#14)."""
    import logging

    secret = tmp_path / "patient-Jane-Doe-1960.png"
    secret.write_bytes(b"not an image at all")
    good = tmp_path / "good.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(good)
    calls = [((handle_file(str(secret)), model_name, "f1"), "/predict"),
             ((handle_file(str(good)), "../../etc/passwd", "f1"), "/predict"),
             ((handle_file(str(good)), model_name, "Effusion", "gradcam", "[NaN,0,10,10]", 0.5, 0.0), "/explain"),
             ((handle_file(str(good)), model_name, "Effusion", "gradcam", "", "abc", 0.0), "/explain")]
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="cxr_demo.ui"):
        for args, api in calls:
            with pytest.raises(Exception):
                client.predict(*args, api_name=api)
    lines = [r.getMessage() for r in caplog.records if r.name == "cxr_demo.ui" and "user error" in r.getMessage()]
    assert len(lines) == len(calls)
    out, err = capfd.readouterr()
    logged = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert "Traceback" not in logged and "Jane-Doe" not in logged


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_slow_heatmap_methods_are_off_the_public_api(client, model_name, tmp_path, method):
    """Score-CAM took 273 s and Ablation-CAM 261 s on Lite0 and blocked every other request (#14)."""
    import time

    good = tmp_path / "good.png"
    Image.fromarray((synthetic_xray(128) * 255).astype(np.uint8)).save(good)
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="switched off here"):
        client.predict(handle_file(str(good)), model_name, "", method, "", 0.5, 0.0, api_name="/explain")
    assert time.perf_counter() - t0 < 10


def test_the_queue_is_bounded(live_demo):
    from cxr_demo.ui import QUEUE_MAX_SIZE

    demo, _ = live_demo
    assert demo._queue.max_size == QUEUE_MAX_SIZE


@needs_nih
def test_turned_inverted_and_non_chest_images_are_told_and_never_flagged(client, model_name, tmp_path):
    """The lung-based is-this-a-chest-X-ray check, through the running app: the film as given passes; turned,
    inverted, noise, a gradient, a page of text and a greyscale photograph (the red team's kinds, #14 item 7) do
    not, say why, and no finding is flagged. Not every photograph is caught: scikit-image's cameraman is not
    (docs/lungs/chest_check.json has the rates: 21/23 of scikit-image's photographs, 8/10 held-out ones)."""
    import skimage.data
    from PIL import ImageDraw

    from cxr_demo.lungs import default_lung_folder

    if default_lung_folder() is None:
        pytest.skip("no lung model in checkpoints/")
    film = np.asarray(Image.open(BOXED).convert("L"))
    page = Image.new("L", (768, 1024), 245)
    draw = ImageDraw.Draw(page)
    for row in range(40):
        draw.text((48, 40 + 24 * row), "Chest radiograph report: lungs clear, heart size normal. " * 2, fill=20)
    variants = {"upright": film, "rotated 90": np.rot90(film), "upside down": np.rot90(film, 2), "inverted": 255 - film,
                "noise": np.random.default_rng(0).integers(0, 256, film.shape, dtype=np.uint8),
                "gradient": np.tile(np.linspace(0, 255, 512).astype(np.uint8), (512, 1)),
                "text page": np.asarray(page),
                "greyscale photo": np.asarray(Image.fromarray(skimage.data.chelsea()).convert("L"))}
    for name, pixels in variants.items():
        path = tmp_path / f"{name.replace(' ', '_')}.png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path)
        doc, _ = client.predict(handle_file(str(path)), model_name, "screening", api_name="/predict")
        problem = doc["chest_check"]["problem"]
        if name == "upright":
            assert doc["chest_check"] == {"checked": True, "problem": None}
            continue
        assert problem, name
        assert any("does not look like an upright frontal chest X-ray" in w for w in doc["warnings"])
        assert not any(f["positive"] for f in doc["findings"])


@needs_nih
def test_explain_prior_endpoint_restricts_to_the_chest_and_outlines_the_lungs(client, live_app, model_name):
    """/explain_prior (what the UI's button calls) takes the prior and the outline; /explain keeps its seven
    values over plain HTTP and uses the model's studied prior."""
    import httpx

    from cxr_demo.lungs import default_lung_folder
    from tests.helpers import http_call

    if default_lung_folder() is None:
        pytest.skip("no lung model in checkpoints/")
    _, doc, note = client.predict(handle_file(str(BOXED)), model_name, "Atelectasis", "gradcam", "", 0.5, 0.0, "hull",
                                  True, api_name="/explain_prior")
    assert doc["prior"] == "hull" and doc["lung_outline"] is True and doc["lungs"]["found"] is True
    assert "lung outline" in note and "Anatomical prior: lungs closed over the mediastinum" in note
    _, off, _ = client.predict(handle_file(str(BOXED)), model_name, "Atelectasis", "gradcam", "", 0.5, 0.0, "off",
                               False, api_name="/explain_prior")
    assert off["prior"] is None and off["lung_outline"] is False
    with pytest.raises(Exception, match="anatomical prior"):
        client.predict(handle_file(str(BOXED)), model_name, "Atelectasis", "gradcam", "", 0.5, 0.0, "/etc/passwd",
                       False, api_name="/explain_prior")
    url = live_app if live_app.endswith("/") else live_app + "/"
    with httpx.Client(timeout=120) as http:
        _, plain, _ = http_call(http, url, "explain", BOXED, model_name, "Atelectasis", "default", "", 0.5, 0.0)
        _, full, _ = http_call(http, url, "explain_prior", BOXED, model_name, "Atelectasis", "default", "", 0.5, 0.0,
                               "default", False)
    assert plain["prior"] == full["prior"] and plain["predicted_boxes"] == full["predicted_boxes"]
