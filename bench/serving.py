"""Serving benchmark: each model's own cost (the floor) against end-to-end latency through the app.

    python -m bench.serving                      # every zoo model, 30 requests per endpoint
    python -m bench.serving --concurrency 8 --requests-per-client 100

Starts ``python app.py`` in a subprocess on a free port (so cold start is measured as a user sees
it), then drives it with ``gradio_client``. Prints markdown tables; ``--json`` also writes the raw
numbers. Run it on an otherwise idle machine: timings on 2 shared cores are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cxr_demo.groundtruth import nih_folder
from cxr_demo.images import read_xray
from cxr_demo.inference import preprocess
from cxr_demo.paths import PROJECT_ROOT as ROOT
from cxr_demo.zoo import Zoo
from tests.helpers import free_port, http_call  # the README's plain-HTTP route, which the tests also run

DEFAULT_IMAGE = nih_folder() / "images" / "00013118_008.png"


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _model_and_input(zoo: Zoo, name: str, image: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    """The loaded model and ``image`` preprocessed for it (a batch of one)."""
    return zoo.model(name), preprocess(read_xray(image).pixels, zoo.card(name))


def floor_times(zoo: Zoo, name: str, image: Path, repeats: int) -> dict[str, float]:
    """Median forward and forward+backward seconds of one preprocessed image (no decoding, no UI)."""
    model, x = _model_and_input(zoo, name, image)
    fwd, fwd_bwd = [], []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(x)
        t1 = time.perf_counter()
        xg = x.clone()
        model(xg)[0, 0].backward()
        model.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i >= 3:
            fwd.append(t1 - t0)
            fwd_bwd.append(t2 - t1)
    return {"forward_s": statistics.median(fwd), "forward_backward_s": statistics.median(fwd_bwd)}


def batch_floor(zoo: Zoo, name: str, image: Path, sizes: list[int], repeats: int) -> dict[int, float]:
    """Median forward seconds per image when ``size`` copies of one preprocessed image go through the
    model together: what batching concurrent requests (Gradio's ``batch=True``) could save at best."""
    model, x = _model_and_input(zoo, name, image)
    out = {}
    for size in sizes:
        xb = x.expand(size, *x.shape[1:]).contiguous()
        with torch.inference_mode():
            out[size] = statistics.median(latencies(lambda: model(xb), repeats, warm=3)) / size
    return out


def latencies(call, repeats: int, warm: int = 1, after_warm=None) -> list[float]:
    """Seconds of ``repeats`` calls of ``call`` after ``warm`` untimed ones (``after_warm`` runs between)."""
    for _ in range(warm):
        call()
    if after_warm is not None:
        after_warm()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def service_times(service, name: str, image: Path, repeats: int) -> dict[str, float]:
    """Median seconds of the app's own pipeline without Gradio: decode the file, preprocess, run the
    model (and the OOD check, or the CAM), build the result document and overlay."""
    card = service.zoo.card(name)
    label = card.label_names[0]
    out: dict[str, float] = {}
    for key, call in (("service_predict_s", lambda: service.predict(read_xray(image), name, card.operating_points[0])),
                      ("service_explain_s", lambda: service.explain(read_xray(image), name, label, "default"))):
        out[key] = statistics.median(latencies(call, repeats))
    return out


def serve_noop(port: int) -> None:
    """A Gradio app whose one endpoint takes the same upload and does nothing: the transport's own cost
    (upload, queue, server-sent events, JSON) with the app's launch settings."""
    import gradio as gr

    from cxr_demo.ui import MAX_FILE_SIZE, configure_queue

    with gr.Blocks() as demo:
        f = gr.File()
        out = gr.JSON()
        gr.Button().click(lambda path: {"bytes": Path(path).stat().st_size}, f, out, api_name="noop")
    configure_queue(demo).launch(server_name="127.0.0.1", server_port=port, max_file_size=MAX_FILE_SIZE,
                                 prevent_thread_lock=False)


PHASES = ("upload", "queue_wait", "preprocess", "fn_call", "postprocess", "total")


def _profiling(url: str, action: str) -> dict:
    """Gradio's own profiler (the app runs with ``GRADIO_PROFILING=1``): ``clear`` or ``summary``."""
    import urllib.request

    if action == "clear":
        urllib.request.urlopen(urllib.request.Request(url + "gradio_api/profiling/clear", method="POST"), timeout=10)
        return {}
    with urllib.request.urlopen(url + "gradio_api/profiling/summary", timeout=10) as r:
        return json.loads(r.read())


def server_phases(summary: dict) -> dict[str, float]:
    """Median milliseconds of each server-side phase since the last clear (uploads are separate requests)."""
    out = {p: summary["phases"][p]["p50"] for p in PHASES if p in summary.get("phases", {})}
    out["upload"] = summary.get("upload", {}).get("p50", 0.0)
    return out


def _status_mib(pid: int, field: str) -> float:
    """A memory field of /proc/<pid>/status (``VmHWM``: peak resident set size, ``VmRSS``: now), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, in MiB."""
    return _status_mib(pid, "VmHWM")


def start_app(port: int, noop: bool = False, profiling: bool = True) -> tuple[subprocess.Popen, float, str]:
    """Start ``python app.py`` (or the no-op app) and wait until it answers; returns (process, seconds
    to ready, url). ``profiling`` turns on Gradio's per-phase profiler (GRADIO_PROFILING=1)."""
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", CXR_DEMO_LOG_LEVEL="WARNING",
               **({"GRADIO_PROFILING": "1"} if profiling else {}))
    cmd = [sys.executable, "-m", "bench.serving", "--serve-noop", str(port)] if noop else [sys.executable, "app.py"]
    t0 = time.perf_counter()
    # The server's log goes to a file, not a pipe: a pipe nobody reads fills up (64 KiB) and then blocks the
    # server at its next write, mid-request (bench.load's slow heatmap hung that way after ~20 minutes).
    log_file = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    while time.perf_counter() - t0 < 120:
        if proc.poll() is not None:
            log_file.seek(0)
            raise RuntimeError(f"app.py exited: {log_file.read().decode(errors='replace')[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, time.perf_counter() - t0, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("app.py did not answer within 120 s")


def cold_start(image: Path, model: str) -> tuple[subprocess.Popen, str, dict[str, float]]:
    """Start ``python app.py`` and time it until the page answers and until a first ``/predict`` (the
    gradio_client connection included) is answered; returns (process, url, timings in seconds)."""
    from gradio_client import Client, handle_file

    t0 = time.perf_counter()
    proc, ready_s, url = start_app(free_port())
    try:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(image)), model, "f1", api_name="/predict")
    except BaseException:
        proc.kill()
        raise
    return proc, url, {"server_ready_s": ready_s, "total_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    p.add_argument("--requests", type=int, default=30, help="sequential requests per endpoint and model")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=100)
    p.add_argument("--models", nargs="+", default=None, help="only these zoo models (default: all)")
    p.add_argument("--concurrency-models", type=int, default=None,
                   help="how many models the concurrent clients spread over (default: the loaded-model cache size)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rss-bound-mib", type=float, default=3072.0,
                   help="the server's peak RSS must stay under this (exit status 1 otherwise, or on any error)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the printed tables to this file")
    p.add_argument("--cold-start-only", type=int, default=None, metavar="N",
                   help="only time N cold starts of app.py (page answering, first /predict answered) and exit")
    p.add_argument("--batch-floor", type=int, nargs="+", default=None, metavar="SIZE",
                   help="only time the forward pass per image at these batch sizes for each model and exit")
    p.add_argument("--serve-noop", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return 0
    if args.batch_floor:
        zoo = Zoo()
        print(f"Forward ms per image by batch size ({torch.get_num_threads()} CPU threads, median of {args.requests}):")
        print("| model | " + " | ".join(f"batch {b}" for b in args.batch_floor) + " | best speed-up |")
        print("|---|" + "---|" * (len(args.batch_floor) + 1))
        for name in args.models or zoo.names:
            per_image = batch_floor(zoo, name, args.image, args.batch_floor, args.requests)
            cells = " | ".join(f"{per_image[b] * 1e3:.1f}" for b in args.batch_floor)
            print(f"| {name} | {cells} | {per_image[args.batch_floor[0]] / min(per_image.values()):.2f}x |", flush=True)
        return 0
    if args.cold_start_only:
        model = (args.models or Zoo().names)[0]
        for k in range(args.cold_start_only):
            proc, _, cs = cold_start(args.image, model)
            proc.terminate()
            proc.wait(timeout=30)
            print(f"cold start {k + 1}: page answering after {cs['server_ready_s']:.1f} s, first /predict "
                  f"({model}) answered after {cs['total_s']:.1f} s", flush=True)
        return 0
    import httpx
    from gradio_client import Client, handle_file

    from cxr_demo.service import DemoService

    zoo = Zoo()
    service = DemoService(zoo)
    image = args.image
    names = args.models or zoo.names
    results: dict = {"image": str(image), "cpu_threads": torch.get_num_threads(), "models": {},
                     "max_loaded_models": zoo.max_loaded}

    noop_proc, _, noop_url = start_app(free_port(), noop=True)
    try:
        c = Client(noop_url, verbose=False)
        lat = latencies(lambda: c.predict(handle_file(str(image)), api_name="/noop"), args.requests, warm=3,
                        after_warm=lambda: _profiling(noop_url, "clear"))
        with httpx.Client(timeout=60) as h:
            hl = latencies(lambda: http_call(h, noop_url, "noop", image), args.requests, warm=3)
        results["gradio_noop"] = {"median_s": statistics.median(lat), "p95_s": _pct(lat, 95),
                                  "http_median_s": statistics.median(hl), "http_p95_s": _pct(hl, 95),
                                  "server_phases_ms": server_phases(_profiling(noop_url, "summary"))}
    finally:
        noop_proc.terminate()
        noop_proc.wait(timeout=30)

    proc, url, results["cold_start"] = cold_start(image, zoo.names[0])
    http = httpx.Client(timeout=120)
    try:
        client = Client(url, verbose=False)
        for name in names:
            floor = floor_times(zoo, name, image, args.requests)
            floor.update(service_times(service, name, image, args.requests))
            card = zoo.card(name)
            label = card.label_names[0]
            endpoint_args = {"predict": (name, card.operating_points[0]),
                             "explain": (name, label, "default", "", 0.5, 0.0)}
            lat: dict[str, list[float]] = {}
            phases: dict[str, dict[str, float]] = {}
            for endpoint, a in endpoint_args.items():
                lat[endpoint] = latencies(lambda: client.predict(handle_file(str(image)), *a, api_name=f"/{endpoint}"),
                                          args.requests, after_warm=lambda: _profiling(url, "clear"))
                phases[endpoint] = server_phases(_profiling(url, "summary"))
            for endpoint, a in endpoint_args.items():
                lat[f"http_{endpoint}"] = latencies(lambda: http_call(http, url, endpoint, image, *a), args.requests)
            results["models"][name] = {
                "server_phases_ms": phases,
                **floor,
                **{f"{e}_median_s": statistics.median(v) for e, v in lat.items()},
                **{f"{e}_p95_s": _pct(v, 95) for e, v in lat.items()},
                "predict_ratio": statistics.median(lat["predict"]) / floor["forward_s"],
                "explain_ratio": statistics.median(lat["explain"]) / floor["forward_backward_s"],
                "http_predict_ratio": statistics.median(lat["http_predict"]) / floor["forward_s"],
                "http_explain_ratio": statistics.median(lat["http_explain"]) / floor["forward_backward_s"],
            }

        errors: list[str] = []
        conc: dict[str, list[float]] = {"predict": [], "explain": []}
        lock = threading.Lock()

        spread = names[: args.concurrency_models or zoo.max_loaded]

        def worker(k: int) -> None:
            c = Client(url, verbose=False)
            name = spread[k % len(spread)]
            for i in range(args.requests_per_client):
                endpoint = "explain" if (i + k) % 4 == 0 else "predict"
                t = time.perf_counter()
                try:
                    if endpoint == "predict":
                        c.predict(handle_file(str(image)), name, zoo.card(name).operating_points[0], api_name="/predict")
                    else:
                        c.predict(handle_file(str(image)), name, "", "default", api_name="/explain")
                except Exception as e:  # counted and reported, the benchmark goes on
                    with lock:
                        errors.append(f"{endpoint}: {e}")
                    continue
                with lock:
                    conc[endpoint].append(time.perf_counter() - t)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results["concurrency"] = {
            "clients": args.concurrency, "requests_per_client": args.requests_per_client,
            "mix": "1 explain : 3 predict", "models": spread, "wall_s": time.perf_counter() - t0, "errors": len(errors),
            "error_examples": errors[:5],
            **{f"{e}_p50_s": _pct(v, 50) for e, v in conc.items() if v},
            **{f"{e}_p95_s": _pct(v, 95) for e, v in conc.items() if v},
            "server_peak_rss_mib": _peak_rss_mb(proc.pid),
        }
    finally:
        http.close()
        proc.terminate()
        proc.wait(timeout=30)

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text)
        lines.append(text)

    emit(f"Serving benchmark: `python -m bench.serving` on {results['cpu_threads']} CPU threads, image "
         f"{Path(image).name}, {args.requests} sequential requests per endpoint and model.\n")
    emit("| model | forward (ms) | fwd+bwd (ms) | in-process predict / explain (ms) | /predict median / p95 (ms) | "
          "ratio to forward | /explain median / p95 (ms) | ratio to fwd+bwd |")
    emit("|---|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        emit(f"| {name} | {r['forward_s'] * 1e3:.1f} | {r['forward_backward_s'] * 1e3:.1f} | "
              f"{r['service_predict_s'] * 1e3:.0f} / {r['service_explain_s'] * 1e3:.0f} | "
              f"{r['predict_median_s'] * 1e3:.0f} / {r['predict_p95_s'] * 1e3:.0f} | {r['predict_ratio']:.2f} | "
              f"{r['explain_median_s'] * 1e3:.0f} / {r['explain_p95_s'] * 1e3:.0f} | {r['explain_ratio']:.2f} |")
    emit("\nWhere the end-to-end time goes (medians, ms; server phases from Gradio's own profiler, "
          "GRADIO_PROFILING=1): upload = the file's POST; fn = our handler (decode, model, CAM, overlay); "
          "pre/post = Gradio's (de)serialisation; rest = client, HTTP and event stream.")
    emit("\n| model | endpoint | end to end | upload | queue wait | Gradio pre | fn | Gradio post | rest |")
    emit("|---|---|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        for e in ("predict", "explain"):
            ph = r["server_phases_ms"][e]
            e2e = r[f"{e}_median_s"] * 1e3
            rest = e2e - ph["upload"] - ph["total"]
            emit(f"| {name} | /{e} | {e2e:.0f} | {ph['upload']:.0f} | {ph['queue_wait']:.0f} | {ph['preprocess']:.0f} | "
                  f"{ph['fn_call']:.0f} | {ph['postprocess']:.0f} | {rest:.0f} |")
    emit("\nThe same requests over Gradio's plain HTTP API (upload, POST /gradio_api/call/<api>, read the event "
          "stream; what curl does), without gradio_client:\n")
    emit("| model | /predict median / p95 (ms) | ratio to forward | /explain median / p95 (ms) | ratio to fwd+bwd |")
    emit("|---|---|---|---|---|")
    for name, r in results["models"].items():
        emit(f"| {name} | {r['http_predict_median_s'] * 1e3:.0f} / {r['http_predict_p95_s'] * 1e3:.0f} | "
              f"{r['http_predict_ratio']:.2f} | {r['http_explain_median_s'] * 1e3:.0f} / "
              f"{r['http_explain_p95_s'] * 1e3:.0f} | {r['http_explain_ratio']:.2f} |")
    g = results["gradio_noop"]
    emit(f"\nGradio round trip of a no-op endpoint taking the same upload (the transport's own cost): "
          f"median {g['median_s'] * 1e3:.0f} ms, p95 {g['p95_s'] * 1e3:.0f} ms (server: upload "
          f"{g['server_phases_ms']['upload']:.0f} ms, handler total {g['server_phases_ms'].get('total', 0):.0f} ms); "
          f"over plain HTTP median {g['http_median_s'] * 1e3:.0f} ms, p95 {g['http_p95_s'] * 1e3:.0f} ms")
    c = results["concurrency"]
    emit(f"Concurrency: {c['clients']} clients x {c['requests_per_client']} requests ({c['mix']}) over "
          f"{', '.join(c['models'])}: "
          f"{c['errors']} errors, /predict p95 {c.get('predict_p95_s', float('nan')):.2f} s, "
          f"/explain p95 {c.get('explain_p95_s', float('nan')):.2f} s, server peak RSS {c['server_peak_rss_mib']:.0f} MiB, "
          f"wall {c['wall_s']:.0f} s")
    within = c["server_peak_rss_mib"] <= args.rss_bound_mib
    from cxr_demo.uploads import RECENT_UPLOAD_BYTES  # imports gradio: only where the table needs it
    emit(f"Peak RSS bound {args.rss_bound_mib:.0f} MiB (at most {results['max_loaded_models']} models loaded, "
         f"CXR_DEMO_MAX_LOADED_MODELS; {RECENT_UPLOAD_BYTES // 2**20} MiB of recently decoded uploads): {'kept' if within else 'EXCEEDED'}.")
    for e in c["error_examples"]:
        emit(f"  error: {e[:300]}")
    cs = results["cold_start"]
    emit(f"Cold start: server answering after {cs['server_ready_s']:.1f} s, first /predict answered after "
          f"{cs['total_s']:.1f} s")
    results["concurrency"]["rss_bound_mib"] = args.rss_bound_mib
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0 if within and c["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
