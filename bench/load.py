"""Sustained load with a slow heatmap running: latency, errors, memory and leftover files, round after round.

    python -m bench.load                                   # 5 rounds of 8 clients x 100 mixed requests
    python -m bench.load --rounds 5 --markdown docs/bench/load-cpu2.md --json docs/bench/load-cpu2.json

Starts ``python app.py`` (``CXR_DEMO_SLOW_CAM=1`` so that a minutes-long Score-CAM can be asked for, and its own
``GRADIO_TEMP_DIR`` so that the files it leaves can be counted). Each round, ``--clients`` gradio_client clients
send ``--requests-per-client`` requests each (3 ``/predict`` : 1 ``/explain``, over the first
``--models`` zoo models, the default model first; each request a film of its own, drawn in turn from ``--films``
NIH train/validation films, so that no answer kept for a film is reused, or ``--films 1``: one film for every
request, as a user comparing models on one film) while one more client keeps a slow heatmap running
(``--slow-method`` on ``--slow-model``, one after the other, through all rounds). After each round: ``/predict``
and ``/explain`` p50/p95, errors, the server's resident memory (VmRSS now and its peak VmHWM), and the files left in the temp
folder right after the round, and again ``DELIVERED_GRACE_S`` + 2 s later without the example films' kept copies (a
result is deleted that long after it has been fetched; the app's ResultCleaner deletes unfetched ones after
``CACHE_CLEANING``).
Exit status 1 when a round has an error or ``/predict``'s p95 exceeds ``--p95-bound-s``. Run it on an otherwise
idle machine: timings on 2 shared cores are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.serving import DEFAULT_IMAGE, _peak_rss_mb, _status_mib, start_app
from cxr_demo.groundtruth import default_examples
from cxr_demo.ui import DELIVERED_GRACE_S
from cxr_demo.zoo import Zoo
from tests.helpers import free_port


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of a process now, in MiB."""
    return _status_mib(pid, "VmRSS")


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _stat(path: Path) -> os.stat_result | None:
    """``path.stat()``, or None when the file went between listing and looking (the app deletes as it goes)."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def nih_films(n: int, first: Path = DEFAULT_IMAGE) -> list[Path]:
    """``first`` and then n - 1 other NIH films of the official train/validation list (never a test film),
    in a fixed order."""
    folder = first.parent.parent
    names = sorted(set((folder / "train_val_list.txt").read_text().split()) - {first.name})
    names = [names[i] for i in np.random.default_rng(0).permutation(len(names))]
    films = [first] + [folder / "images" / m for m in names if (folder / "images" / m).is_file()]
    if len(films) < n:
        raise SystemExit(f"only {len(films)} NIH train/validation films in {folder / 'images'}; asked for {n}")
    return films[:n]


class Calls:
    """Latencies and errors of calls to the running app, by key; each call takes the next film in turn."""

    def __init__(self, images: list[Path], operating_points: dict[str, str], downloads: str) -> None:
        # downloads: where the clients put the overlays they fetch; not the server's temp folder, whose files are
        # counted (a first run counted the clients' copies, which nothing deletes, as files the server left)
        self.images, self.ops, self.downloads = images, operating_points, downloads
        self._next = 0
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = {}
        self.errors: list[str] = []

    def call(self, c, endpoint: str, name: str, method: str, key: str) -> None:
        from gradio_client import handle_file

        with self.lock:
            image = self.images[self._next % len(self.images)]
            self._next += 1
        t = time.perf_counter()
        try:
            if endpoint == "predict":
                c.predict(handle_file(str(image)), name, self.ops[name], api_name="/predict")
            else:
                c.predict(handle_file(str(image)), name, "", method, api_name="/explain")
        except Exception as e:  # counted and reported, the benchmark goes on
            with self.lock:
                self.errors.append(f"{key} {name} {method}: {type(e).__name__}: {str(e)[:200]}")
            return
        with self.lock:
            self.lat.setdefault(key, []).append(time.perf_counter() - t)

    def take(self) -> tuple[dict[str, list[float]], list[str]]:
        with self.lock:
            out = (self.lat, self.errors)
            self.lat, self.errors = {}, []
            return out


def one_round(url: str, calls: Calls, models: list[str], clients: int, per_client: int) -> dict:
    from gradio_client import Client

    def worker(k: int) -> None:
        c = Client(url, verbose=False, download_files=calls.downloads)
        for i in range(per_client):
            endpoint = "explain" if (i + k) % 4 == 0 else "predict"
            calls.call(c, endpoint, models[(i + k) % len(models)], "default", endpoint)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat, errors = calls.take()
    out = {"wall_s": wall, "errors": len(errors), "error_examples": errors[:5],
           "slow_heatmaps_finished_during_round": len(lat.get("slow", [])),
           "slow_heatmap_s": [round(v, 1) for v in lat.get("slow", [])]}
    for e in ("predict", "explain"):
        if lat.get(e):
            out.update({f"{e}_n": len(lat[e]), f"{e}_p50_s": float(np.percentile(lat[e], 50)),
                        f"{e}_p95_s": float(np.percentile(lat[e], 95)), f"{e}_max_s": float(max(lat[e]))})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="the first film (with --films 1: the only one)")
    p.add_argument("--films", type=int, default=800, help="how many different films the requests go through")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=100)
    p.add_argument("--models", type=int, default=3, help="the first N zoo models (the default model first)")
    p.add_argument("--slow-model", default="nih14-efficientnet-lite0")
    p.add_argument("--slow-method", default="scorecam", help="'none': no slow heatmap")
    p.add_argument("--p95-bound-s", type=float, default=2.0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)

    zoo = Zoo()
    models = zoo.names[: args.models]
    slow = None if args.slow_method == "none" else (args.slow_model, args.slow_method)
    ops = {n: zoo.card(n).operating_points[0] for n in models}
    examples = {Path(p).name for p in default_examples()}
    temp = Path(tempfile.mkdtemp(prefix="cxr-load-"))
    os.environ.update(CXR_DEMO_SLOW_CAM="1", GRADIO_TEMP_DIR=str(temp))
    proc, ready_s, url = start_app(free_port(), profiling=False)
    calls = Calls(nih_films(args.films, args.image), ops, tempfile.mkdtemp(prefix="cxr-load-client-"))
    done = threading.Event()

    def slow_worker() -> None:
        from gradio_client import Client

        c = Client(url, verbose=False, download_files=calls.downloads)
        while not done.is_set():
            calls.call(c, "explain", slow[0], slow[1], "slow")

    rounds = []
    try:
        slow_thread = threading.Thread(target=slow_worker, daemon=True) if slow else None
        if slow_thread:
            slow_thread.start()
            time.sleep(3.0)  # the slow heatmap is running before the clients start
        for r in range(args.rounds):
            res = one_round(url, calls, models, args.clients, args.requests_per_client)
            res.update(round=r + 1, rss_now_mib=rss_mb(proc.pid), rss_peak_mib=_peak_rss_mb(proc.pid))
            files = temp_files(temp)
            res["temp_files_after_round"] = len(files)
            res["temp_file_kinds"] = sorted({f.suffix or f.name[:3] for f in files})
            # A result goes DELIVERED_GRACE_S after it has been fetched: what is left after that, besides the
            # example films' kept copies, is a result of a finished request (or the slow heatmap's, under way).
            time.sleep(DELIVERED_GRACE_S + 2)
            results = [f for f in temp_files(temp) if f.name not in examples]
            res["result_files_after_grace"] = len(results)
            res["result_file_kinds_after_grace"] = sorted({f.suffix or f.name[:3] for f in results})
            now = time.time()  # what each one is: its folder depth, size and age (no names: they are hashes)
            res["result_files_after_grace_detail"] = [
                {"depth": len(f.relative_to(temp).parts), "suffix": f.suffix, "bytes": st.st_size,
                 "age_s": round(now - st.st_mtime, 1)} for f in results if (st := _stat(f)) is not None]
            rounds.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "slow_heatmap_s"}), flush=True)
        done.set()
        if slow_thread:  # the slow heatmap under way finishes before the final count
            slow_thread.join(timeout=1200)
        tail_lat, tail_errors = calls.take()
        time.sleep(5)
        final_rss = rss_mb(proc.pid)
        left = temp_files(temp)
        left_detail = [{"example_copy": f.name in examples, "suffix": f.suffix, "bytes": st.st_size}
                       for f in left if (st := _stat(f)) is not None]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(calls.downloads, ignore_errors=True)
    result = {"image": str(args.image), "films": args.films, "models": models, "clients": args.clients,
              "requests_per_client": args.requests_per_client, "mix": "3 /predict : 1 /explain (default settings)",
              "slow_heatmap": None if slow is None else {"model": slow[0], "method": slow[1]},
              "server_ready_s": ready_s, "rounds": rounds, "rss_after_all_mib": final_rss,
              "temp_files_after_all": len(left), "temp_files_after_all_detail": left_detail, "cpu_count": os.cpu_count(),
              "after_last_round": {"slow_heatmap_s": [round(v, 1) for v in tail_lat.get("slow", [])],
                                   "errors": tail_errors},
              "command": "python -m bench.load " + " ".join(argv or [])}
    lines = [f"Load: {args.clients} clients x {args.requests_per_client} requests per round "
             f"(3 /predict : 1 /explain over {', '.join(models)}; "
             + ("one film for every request" if args.films == 1 else f"{args.films} different NIH films in turn") + ")"
             + (f", while {slow[1]} on {slow[0]} runs back to back" if slow else "") + f"; {os.cpu_count()} CPUs.", "",
             "| round | wall s | errors | /predict p50 / p95 / max s | /explain p50 / p95 s | slow heatmaps finished (s) "
             f"| RSS now / peak MiB | temp files | result files {DELIVERED_GRACE_S + 2:.0f} s later |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(f"| {r['round']} | {r['wall_s']:.0f} | {r['errors']} | {r.get('predict_p50_s', float('nan')):.2f} / "
                     f"{r.get('predict_p95_s', float('nan')):.2f} / {r.get('predict_max_s', float('nan')):.2f} | "
                     f"{r.get('explain_p50_s', float('nan')):.2f} / {r.get('explain_p95_s', float('nan')):.2f} | "
                     f"{r['slow_heatmaps_finished_during_round']} ({', '.join(map(str, r['slow_heatmap_s'])) or '-'}) | "
                     f"{r['rss_now_mib']:.0f} / {r['rss_peak_mib']:.0f} | {r['temp_files_after_round']} | "
                     f"{r['result_files_after_grace']} |")
    lines += ["", f"After the last round and the last slow heatmap: RSS {final_rss:.0f} MiB, {len(left)} files in the "
              "temp folder."]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    ok = not tail_errors and all(r["errors"] == 0 and r.get("predict_p95_s", 0) <= args.p95_bound_s for r in rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
