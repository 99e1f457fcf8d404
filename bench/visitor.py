"""What a visitor waits for: seconds from each action in the browser to its result on screen.

    python -m bench.visitor --rounds 5 --markdown docs/bench/visitor-cpu2.md

Starts ``python app.py`` on a free port (the committed checkpoints and the shipped examples), opens it in
headless Chromium (Debian's, through Playwright) at 1400x1000 and times, per round, from the action to the
moment its result is visible: the page becoming usable, an upload until its findings table (the analysis
starts by itself), an example click until its findings, "Show heatmap" until the overlay and its IoU line,
"Run every model of this task" until the compare table, and a changed operating point + "Predict" until the
new table. Round 1 includes loading the model and the CAM library; it is reported apart. Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.serving import start_app
from cxr_demo.groundtruth import default_examples
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, free_port  # the browser the tests drive

ACTIONS = ["page usable", "upload -> findings", "example click -> findings", "Show heatmap -> overlay + IoU",
           "Compare -> table", "operating point + Predict -> table"]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def one_round(browser, url: str, film: Path) -> dict[str, float]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    page.goto(url, wait_until="load")
    page.get_by_text("findings appear here", exact=False).first.wait_for(timeout=120_000)
    out["page usable"] = time.perf_counter() - t0
    rows = page.locator(".cxr-findings tbody tr")
    out["upload -> findings"] = _timed(lambda: (page.locator("input[type=file]").first.set_input_files(str(film)),
                                                rows.first.wait_for(timeout=120_000)))
    def click_example():
        page.locator("#examples img").nth(1).click()
        page.get_by_text("Radiologist boxes available for: Cardiomegaly", exact=False).first.wait_for(timeout=120_000)
        rows.first.wait_for(timeout=120_000)
    out["example click -> findings"] = _timed(click_example)
    page.get_by_role("tab", name="Heatmap").click()
    def heatmap():
        page.get_by_role("button", name="Show heatmap").click()
        page.locator("#overlay img").first.wait_for(timeout=120_000)
        page.get_by_text("IoU", exact=False).first.wait_for(timeout=120_000)
    out["Show heatmap -> overlay + IoU"] = _timed(heatmap)
    page.get_by_role("tab", name="Compare").click()
    def compare():
        page.get_by_role("button", name="Run every model of this task on this film").click()
        page.locator(".cxr-compare table").wait_for(timeout=300_000)
    out["Compare -> table"] = _timed(compare)
    page.get_by_role("tab", name="Findings").click()
    def op_predict():
        before = page.locator(".cxr-findings").inner_text()
        page.get_by_label("Operating point").first.click()
        page.get_by_role("option", name="screening").click()
        page.get_by_role("button", name="Predict findings").click()
        page.wait_for_function("b => document.querySelector('.cxr-findings').innerText !== b", arg=before,
                               timeout=120_000)
    out["operating point + Predict -> table"] = _timed(op_predict)
    page.close()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    work = Path(os.environ.get("TMPDIR", "/tmp")) / "cxr-visitor-bench"
    work.mkdir(exist_ok=True)
    server, _, url = start_app(free_port(), profiling=False)
    rounds = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for i in range(args.rounds):
                film = work / f"visitor-film-{i}.png"
                src = np.asarray(Image.open(default_examples()[0]))
                Image.fromarray(np.clip(src.astype(int) + i, 0, 255).astype(np.uint8)).save(film)  # a new file each round
                rounds.append(one_round(browser, url, film))
                print(f"round {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in rounds[-1].items()), flush=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    warm = rounds[1:] or rounds
    result = {"rounds": rounds, "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
              "summary": {a: {"first": rounds[0][a], "median": statistics.median(r[a] for r in warm),
                              "max": max(r[a] for r in warm)} for a in ACTIONS}}
    lines = [f"# What a visitor waits for ({result['date']}, {os.cpu_count()} CPU cores, 1400x1000 Chromium)", "",
             f"`python -m bench.visitor --rounds {args.rounds}`; seconds from the action to its result on screen, "
             "default model, 384 px NIH films. The first round includes loading the model and the CAM library; "
             f"median and max over the other {len(warm)}.", "",
             "| action | first round | median | max |", "|---|---|---|---|"]
    for a in ACTIONS:
        s = result["summary"][a]
        lines.append(f"| {a} | {s['first']:.2f} | {s['median']:.2f} | {s['max']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
