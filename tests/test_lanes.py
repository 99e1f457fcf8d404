"""A slow heatmap never holds up /predict (#14 item 3): two queue lanes, a heatmap copy of each model, and slow
heatmap methods that step aside for interactive work."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cxr_demo.images import XRay
from cxr_demo.inference import preprocess
from cxr_demo.service import DemoService, InteractiveFirst
from cxr_demo.zoo import DEFAULT_CHECKPOINTS, Zoo, ZooSource
from tests.helpers import http_call, synthetic_xray, write_film

SMALL = "nih14-small-cnn"


def film() -> XRay:
    return XRay(pixels=synthetic_xray(256), source_format="test")


@pytest.fixture(scope="module")
def small_zoo():
    zoo = Zoo(ZooSource(DEFAULT_CHECKPOINTS))
    if SMALL not in zoo.names:
        pytest.skip(f"{SMALL} is not committed")
    return zoo


def test_predict_is_answered_while_a_heatmap_is_still_running(small_zoo, monkeypatch, tmp_path):
    """Before the lanes, every endpoint shared one queue slot: a /predict sent during a minutes-long Score-CAM
    waited for it. Here the heatmap blocks until the test releases it."""
    from cxr_demo.memory import HEATMAP_NICE
    from cxr_demo.ui import HEATMAP_LANE_THREADS, build_demo, configure_queue, launch_kwargs

    started, release = threading.Event(), threading.Event()
    real_explain, real_predict = DemoService.explain, DemoService.predict
    nice: dict[str, int] = {}
    lane_threads: list[int] = []

    def held_explain(self, *args, **kwargs):
        nice["explain"] = _my_nice()
        lane_threads.append(torch.get_num_threads())
        started.set()
        release.wait(timeout=120)
        return real_explain(self, *args, **kwargs)

    def seen_predict(self, *args, **kwargs):
        nice["predict"] = _my_nice()
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(DemoService, "explain", held_explain)
    monkeypatch.setattr(DemoService, "predict", seen_predict)
    demo = configure_queue(build_demo(small_zoo, examples=[]))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                            **launch_kwargs(demo))
    image = write_film(tmp_path / "film.png")
    try:
        with httpx.Client(timeout=120) as http:
            failed: list[BaseException] = []

            def explain():
                try:
                    http_call(http, url, "explain", image, SMALL, "", "default", "", 0.5, 0.0)
                except BaseException as e:  # noqa: BLE001 - reported below
                    failed.append(e)

            heatmap = threading.Thread(target=explain)
            heatmap.start()
            assert started.wait(timeout=60), f"the heatmap request never started: {failed}"
            t0 = time.perf_counter()
            out = http_call(http, url, "predict", image, SMALL, "f1")
            waited = time.perf_counter() - t0
            assert heatmap.is_alive(), "the heatmap finished before /predict was answered: nothing was tested"
            assert out[0]["model"] == SMALL and waited < 30
            # the heatmap ran at a lower scheduling priority than /predict (the process's own)
            assert nice == {"explain": _process_nice() + HEATMAP_NICE, "predict": _process_nice()}, nice
            assert lane_threads == [HEATMAP_LANE_THREADS]  # the heatmap lane's intra-op threads, set as it started
            release.set()
            heatmap.join(timeout=120)
            assert not failed
    finally:
        release.set()
        demo.close()


def _my_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _process_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, os.getpid())


def _task_nice() -> dict[int, int]:
    """Nice value of every thread of this process (/proc/self/task/TID/stat, field 19)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            out[int(task.name)] = int(task.joinpath("stat").read_text().rsplit(")", 1)[1].split()[16])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return out


def test_niced_threads_lower_their_priority_and_that_of_the_openmp_team_they_start():
    """The heatmap lane's threads run at +nice, and so do the threads PyTorch starts for them (OpenMP workers
    inherit their parent thread's nice value), while the caller keeps its own; context variables and exceptions
    travel with each call."""
    import contextvars

    from cxr_demo.memory import NicedThreads, torch_threads

    if not hasattr(os, "setpriority") or not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux (per-thread nice values)")
    pool = NicedThreads(1, 5, "test-niced")
    base = _my_nice()
    before = set(_task_nice())
    var = contextvars.ContextVar("var", default="unset")
    var.set("caller's")

    def work():
        with torch_threads(2):
            a = torch.randn(256, 256)
            for _ in range(20):  # parallel regions: this thread's OpenMP team is started (and niced)
                a = torch.tanh(a @ a / 256)
        return _my_nice(), var.get()

    assert pool.run(work) == (min(19, base + 5), "caller's")
    assert _my_nice() == base  # the caller is untouched
    niced = [tid for tid, n in _task_nice().items() if tid not in before and n == min(19, base + 5)]
    assert len(niced) >= 2, _task_nice()  # the pool's thread and at least one OpenMP worker it started

    def fail():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        pool.run(fail)


def test_heatmaps_run_on_their_own_copy_of_the_model(small_zoo):
    """pytorch-grad-cam hooks the explained layers: a /predict running meanwhile must not pass through them."""
    assert small_zoo.heatmap_model(SMALL) is not small_zoo.model(SMALL)
    assert small_zoo.heatmap_model(SMALL) is small_zoo.heatmap_model(SMALL)  # kept for the next heatmap
    a, b = small_zoo.model(SMALL).state_dict(), small_zoo.heatmap_model(SMALL).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_heatmap_copies_of_a_few_models_in_turn_are_kept(tmp_path):
    """Heatmaps of up to ``max_loaded`` models in turn reuse their copies (no deep copy per request); one more
    model drops the least recently explained; slow heatmaps keep one copy of their own."""
    from tests.helpers import make_checkpoint

    for n in ("a", "b", "c"):
        make_checkpoint(tmp_path, name=n, input_size=32)
    zoo = Zoo(ZooSource(tmp_path), max_loaded=2)
    a, b = zoo.heatmap_model("a"), zoo.heatmap_model("b")
    assert zoo.heatmap_model("a") is a and zoo.heatmap_model("b") is b
    slow = zoo.heatmap_model("a", "slow")
    assert slow is not a and zoo.heatmap_model("a") is a
    zoo.heatmap_model("c")  # "b" was explained longest ago
    assert zoo.heatmap_model("a") is a and zoo.heatmap_model("b") is not b
    assert zoo.heatmap_model("c", "slow") is not slow and zoo.heatmap_model("a", "slow") is not slow
    zoo.withdraw("a", "test")
    assert not any(k[1] == "a" for k in zoo._heatmap_copies)


def test_predictions_are_the_same_while_heatmaps_run(small_zoo):
    service = DemoService(small_zoo, lungs=False)
    xray = film()
    alone = [r["probability"] for r in service.predict(xray, SMALL, "f1").document["findings"]]
    stop = threading.Event()
    errors: list[BaseException] = []

    def heatmaps():
        try:
            while not stop.is_set():
                service.explain(xray, SMALL, "", "gradcam")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    worker = threading.Thread(target=heatmaps)
    worker.start()
    try:
        during = [[r["probability"] for r in service.predict(xray, SMALL, "f1").document["findings"]]
                  for _ in range(10)]
    finally:
        stop.set()
        worker.join(timeout=60)
    assert not errors
    for probs in during:
        assert np.allclose(probs, alone, atol=1e-6)


def test_slow_work_steps_aside_while_interactive_work_waits():
    gate = InteractiveFirst(max_wait_s=5.0, linger_s=0.0)
    t0 = time.perf_counter()
    gate.step_aside()  # nothing urgent: no wait
    assert time.perf_counter() - t0 < 0.5
    waited: list[float] = []

    def slow_step():
        t = time.perf_counter()
        gate.step_aside()
        waited.append(time.perf_counter() - t)

    with gate.urgent():
        worker = threading.Thread(target=slow_step)
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()  # waiting for the urgent work
    worker.join(timeout=5)
    assert 0.4 < waited[0] < 4.0
    # Never starved for good: at most max_wait_s per step.
    gate = InteractiveFirst(max_wait_s=0.2)
    with gate.urgent():
        t = time.perf_counter()
        gate.step_aside()
        assert time.perf_counter() - t < 2.0
    # Right after interactive work ends, slow work waits a little longer (the next request is usually queued).
    gate = InteractiveFirst(max_wait_s=5.0, linger_s=0.5)
    with gate.urgent():
        pass
    t = time.perf_counter()
    gate.step_aside()
    assert 0.3 < time.perf_counter() - t < 2.0


def test_slow_heatmap_methods_pause_before_each_forward_pass(small_zoo):
    from cxr_demo.cam import heatmap_and_logits

    card = small_zoo.card(SMALL)
    x = preprocess(synthetic_xray(256), card)
    calls = []
    heat, _, _ = heatmap_and_logits(small_zoo.heatmap_model(SMALL), card, x, None, "scorecam",
                                    pause=lambda: calls.append(1))
    # one forward for the activations, then the masked inputs in batches of 4
    assert len(calls) >= 2 and heat.shape == (card.input_size, card.input_size)
    assert not small_zoo.heatmap_model(SMALL)._forward_pre_hooks  # the hook is gone afterwards


def test_a_second_slow_heatmap_is_refused_with_a_sentence(small_zoo):
    from cxr_demo.card import ChoiceError
    from cxr_demo.service import SLOW_HEATMAP_BUSY

    service = DemoService(small_zoo, allow_slow_cam=True, lungs=False)
    xray = film()
    assert service._slow_heatmap_lock.acquire()  # as if a Score-CAM were under way
    try:
        with pytest.raises(ChoiceError, match="Another slow heatmap"):
            service.explain(xray, SMALL, "", "scorecam")
        service.explain(xray, SMALL, "", "gradcam")  # a fast one still runs
    finally:
        service._slow_heatmap_lock.release()
    assert "Try again" in SLOW_HEATMAP_BUSY


def test_the_service_runs_slow_heatmaps_with_the_step_aside_pause(small_zoo, monkeypatch):
    """The wiring, not only the mechanism: a Score-CAM through DemoService waits while a /predict runs."""
    import cxr_demo.service as service_module
    seen = {}
    real = service_module.heatmap_and_logits

    def spy(*args, **kwargs):
        seen[args[4]] = kwargs.get("pause")
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module, "heatmap_and_logits", spy)
    service = DemoService(small_zoo, allow_slow_cam=True, lungs=False)
    xray = film()
    service.explain(xray, SMALL, "", "scorecam")
    service.explain(xray, SMALL, "", "gradcam")
    assert seen["scorecam"] == service._interactive.step_aside
    assert seen["gradcam"] is None  # fast heatmaps are interactive work themselves


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_a_slow_heatmap_counts_its_batches_in_the_progress_bar(small_zoo, method):
    """#14 item 3: the page said "122.7/2.7s" during a Score-CAM (the queue's guess from earlier, fast calls). The
    handler now hands the method's loop over batches of forward passes to Gradio's progress bar (its ``tqdm``),
    named after the method; fast methods have no such loop, and without a progress bar the loop runs as it is."""
    from cxr_demo.cam import CAM_PROGRESS
    from cxr_demo.ui import Handlers

    seen = []

    class Recorder:  # what gr.Progress offers the handler
        def tqdm(self, iterable, desc=None, total=None, unit="steps"):
            steps = list(iterable)
            seen.append((desc, len(steps)))
            return iter(steps)

    handlers = Handlers(small_zoo, [])
    handlers.service.allow_slow_cam = True
    path = write_film(Path(os.environ["GRADIO_TEMP_DIR"]) / f"progress-{method}.png", size=128)
    overlay, doc, _ = handlers.explain(str(path), SMALL, "", method, progress=Recorder())
    label = {"scorecam": "Score-CAM", "ablationcam": "Ablation-CAM"}[method]
    assert seen and all(desc == f"{label}: batches of forward passes" and n >= 1 for desc, n in seen), seen
    assert doc["method"] == method and overlay is not None
    assert CAM_PROGRESS.get() is None, "the progress hook outlived its heatmap"
    seen.clear()
    handlers.explain(str(write_film(path)), SMALL, "", "gradcam", progress=Recorder())
    assert seen == []
    _, again = DemoService(small_zoo, allow_slow_cam=True, lungs=False).explain(film(), SMALL, "", method)
    assert again["method"] == method


def test_a_slow_heatmap_stops_soon_after_its_client_goes(monkeypatch, tmp_path):
    """#14 item 3: a Score-CAM kept running for minutes after its client had gone (Gradio marks the job dead
    when the event stream closes but cannot stop a function running in a thread). Through the running server:
    a Score-CAM on Lite0 (a minute of work here) is started over plain HTTP, its event stream is closed, and the
    heatmap must stop with ClientGone within seconds, freeing the one slow slot."""
    import cxr_demo.service as service_module
    from cxr_demo.ui import build_demo, configure_queue, launch_kwargs

    lite0 = "nih14-efficientnet-lite0"
    zoo = Zoo(ZooSource(DEFAULT_CHECKPOINTS))
    if lite0 not in zoo.names:
        pytest.skip(f"{lite0} is not committed")
    monkeypatch.setenv("CXR_DEMO_SLOW_CAM", "1")
    started, ended, outcome = threading.Event(), threading.Event(), {}
    real = service_module.heatmap_and_logits

    def watched(*args, **kwargs):
        started.set()
        try:
            return real(*args, **kwargs)
        except BaseException as e:
            outcome["error"] = type(e).__name__
            raise
        finally:
            outcome["at"] = time.monotonic()
            ended.set()

    monkeypatch.setattr(service_module, "heatmap_and_logits", watched)
    # 0.1 s a step (as when /predict traffic makes it step aside): 320 steps, a minute of work on its own
    monkeypatch.setattr(InteractiveFirst, "step_aside", lambda self: time.sleep(0.1))
    demo = configure_queue(build_demo(zoo, examples=[]))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                            **launch_kwargs(demo))
    image = write_film(tmp_path / "film.png")
    try:
        with httpx.Client(timeout=60) as http:
            with open(image, "rb") as f:
                path = http.post(url + "gradio_api/upload", files={"files": (image.name, f)}).json()[0]
            file = {"path": path, "meta": {"_type": "gradio.FileData"}}
            r = http.post(url + "gradio_api/call/explain", json={"data": [file, lite0, "", "scorecam", "", 0.5, 0.0]})
            r.raise_for_status()
            with http.stream("GET", f"{url}gradio_api/call/explain/{r.json()['event_id']}"):
                assert started.wait(timeout=60), "the slow heatmap never started"
                time.sleep(1.0)
                assert not ended.is_set(), "the Score-CAM ended by itself: nothing was tested"
            gone_at = time.monotonic()  # the stream is closed: the client has gone
        # Gradio looks at the stream at least every 10 s
        assert ended.wait(timeout=20), "the slow heatmap was still running 20 s after its client had gone"
        assert outcome.get("error") == "ClientGone", outcome
        print(f"stopped {outcome['at'] - gone_at:.1f} s after the client went")
    finally:
        demo.close()


class _Job:
    def __init__(self, session_hash: str, alive: bool) -> None:
        self.session_hash, self.alive = session_hash, alive


class _Request:
    def __init__(self, session_hash: str) -> None:
        self.session_hash, self.headers, self.client = session_hash, {}, None


def test_client_gone_check_reads_the_queue_of_its_own_session():
    from types import SimpleNamespace

    from cxr_demo.ui import client_gone_check

    demo = SimpleNamespace(_queue=SimpleNamespace(active_jobs=[None, [_Job("a", True)], [_Job("b", False)]]))
    assert client_gone_check(demo, _Request("b"))() is True
    assert client_gone_check(demo, _Request("a"))() is False
    assert client_gone_check(demo, _Request("c"))() is False  # not (or no longer) running: nothing to stop
    assert client_gone_check(None, _Request("b")) is None and client_gone_check(demo, None) is None
    assert client_gone_check(SimpleNamespace(), _Request("b"))() is False  # a Gradio without this queue: run on


def test_compare_stops_between_models_once_its_client_has_gone(small_zoo, tmp_path):
    """/compare runs every model of a task (15 for NIH): it stops at the next model instead of running on."""
    from types import SimpleNamespace

    import gradio as gr

    from cxr_demo.ui import Handlers

    handlers = Handlers(small_zoo, [])
    handlers.demo = SimpleNamespace(_queue=SimpleNamespace(active_jobs=[[_Job("gone", False)]]))
    image = write_film(tmp_path / "film.png")
    with pytest.raises(gr.Error, match="closed"):
        handlers.compare(str(image), "f1", SMALL, None, request=_Request("gone"))
    html, doc = handlers.compare(str(image), "f1", SMALL, None, request=_Request("here"))
    assert SMALL in doc["results"]


def test_a_slow_heatmap_step_raises_once_the_client_has_gone(small_zoo):
    from cxr_demo.service import ClientGone

    service = DemoService(small_zoo, allow_slow_cam=True, lungs=False)
    gone = {"now": False}
    step = service._slow_step(lambda: gone["now"])
    step()
    gone["now"] = True
    with pytest.raises(ClientGone):
        step()
    with pytest.raises(ClientGone):  # through the service: the slot is free again afterwards
        service.explain(film(), SMALL, "", "scorecam", client_gone=lambda: True)
    assert not service._slow_heatmap_lock.locked()
