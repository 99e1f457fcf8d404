"""Serving benchmark: each model's own cost (the floor) against end-to-end latency through the app.

    python -m cxr_demo.bench                      # every zoo model, 30 requests per endpoint
    python -m cxr_demo.bench --concurrency 8 --requests-per-client 100

Starts ``python app.py`` in a subprocess on a free port (so cold start is measured as a user sees
it), then drives it with ``gradio_client``. Prints markdown tables; ``--json`` also writes the raw
numbers. Run it on an otherwise idle machine: timings on 2 shared cores are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cxr_demo.images import read_xray
from cxr_demo.inference import preprocess
from cxr_demo.zoo import Zoo

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "nih14" / "images" / "00013118_008.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def floor_times(zoo: Zoo, name: str, image: Path, repeats: int) -> dict[str, float]:
    """Median forward and forward+backward seconds of one preprocessed image (no decoding, no UI)."""
    card = zoo.card(name)
    model = zoo.model(name)
    x = preprocess(read_xray(image).pixels, card)
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


def _peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_app(port: int) -> tuple[subprocess.Popen, float, str]:
    """Start ``python app.py`` and wait until it answers; returns (process, seconds to ready, url)."""
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", CXR_DEMO_LOG_LEVEL="WARNING")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    import urllib.request

    while time.perf_counter() - t0 < 120:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, time.perf_counter() - t0, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("app.py did not answer within 120 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    p.add_argument("--requests", type=int, default=30, help="sequential requests per endpoint and model")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=100)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from gradio_client import Client, handle_file

    zoo = Zoo()
    image = args.image
    results: dict = {"image": str(image), "cpu_threads": torch.get_num_threads(), "models": {}}

    proc, ready_s, url = start_app(_free_port())
    try:
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        client.predict(handle_file(str(image)), zoo.names[0], "f1", api_name="/predict")
        first_predict = time.perf_counter() - t0
        results["cold_start"] = {"server_ready_s": ready_s, "first_predict_s": first_predict,
                                 "total_s": ready_s + first_predict}
        for name in zoo.names:
            floor = floor_times(zoo, name, image, args.requests)
            lat: dict[str, list[float]] = {"predict": [], "explain": []}
            label = zoo.card(name).label_names[0]
            for endpoint, call in (
                ("predict", lambda: client.predict(handle_file(str(image)), name, zoo.card(name).operating_points[0], api_name="/predict")),
                ("explain", lambda: client.predict(handle_file(str(image)), name, label, "default", api_name="/explain")),
            ):
                call()  # warm
                for _ in range(args.requests):
                    t = time.perf_counter()
                    call()
                    lat[endpoint].append(time.perf_counter() - t)
            results["models"][name] = {
                **floor,
                **{f"{e}_median_s": statistics.median(v) for e, v in lat.items()},
                **{f"{e}_p95_s": _pct(v, 95) for e, v in lat.items()},
                "predict_ratio": statistics.median(lat["predict"]) / floor["forward_s"],
                "explain_ratio": statistics.median(lat["explain"]) / floor["forward_backward_s"],
            }

        errors: list[str] = []
        conc: dict[str, list[float]] = {"predict": [], "explain": []}
        lock = threading.Lock()

        def worker(k: int) -> None:
            c = Client(url, verbose=False)
            name = zoo.names[k % len(zoo.names)]
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
            "mix": "1 explain : 3 predict", "wall_s": time.perf_counter() - t0, "errors": len(errors),
            "error_examples": errors[:5],
            **{f"{e}_p50_s": _pct(v, 50) for e, v in conc.items() if v},
            **{f"{e}_p95_s": _pct(v, 95) for e, v in conc.items() if v},
            "server_peak_rss_mib": _peak_rss_mb(proc.pid),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print("| model | forward (ms) | fwd+bwd (ms) | /predict median / p95 (ms) | ratio to forward | /explain median / p95 (ms) | ratio to fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        print(f"| {name} | {r['forward_s'] * 1e3:.1f} | {r['forward_backward_s'] * 1e3:.1f} | "
              f"{r['predict_median_s'] * 1e3:.0f} / {r['predict_p95_s'] * 1e3:.0f} | {r['predict_ratio']:.2f} | "
              f"{r['explain_median_s'] * 1e3:.0f} / {r['explain_p95_s'] * 1e3:.0f} | {r['explain_ratio']:.2f} |")
    c = results["concurrency"]
    print(f"\nConcurrency: {c['clients']} clients x {c['requests_per_client']} requests ({c['mix']}): "
          f"{c['errors']} errors, /predict p95 {c.get('predict_p95_s', float('nan')):.2f} s, "
          f"/explain p95 {c.get('explain_p95_s', float('nan')):.2f} s, server peak RSS {c['server_peak_rss_mib']:.0f} MiB, "
          f"wall {c['wall_s']:.0f} s")
    cs = results["cold_start"]
    print(f"Cold start: server answering after {cs['server_ready_s']:.1f} s, first /predict answered after "
          f"{cs['total_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
