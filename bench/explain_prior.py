"""What the anatomical prior costs in ``/explain``: the service's explain with and without it, against one
forward+backward of the classifier, and the lung model alone.

    python -m bench.explain_prior                # the app's default model, the shipped example films
    python -m bench.explain_prior --model nih14-efficientnet-lite0

Runs in-process through :class:`cxr_demo.service.DemoService` (what ``/explain`` calls), so HTTP and
encoding are left out; writes ``docs/bench/explain-prior-cpu2.{md,json}``. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.serving import latencies
from cxr_demo.groundtruth import EXAMPLES_DIR
from cxr_demo.images import read_xray
from cxr_demo.inference import preprocess
from cxr_demo.paths import PROJECT_ROOT as ROOT
from cxr_demo.service import DemoService
from cxr_demo.zoo import Zoo


def _median_seconds(fn, repeats: int) -> float:
    return statistics.median(latencies(fn, repeats))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="zoo model (default: the app's default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "explain-prior-cpu2")
    args = p.parse_args(argv)
    zoo = Zoo()
    service = DemoService(zoo)
    name = args.model or zoo.names[0]
    card = zoo.card(name)
    model = zoo.model(name)
    films = sorted(EXAMPLES_DIR.glob("*.png"))
    rows = []
    for film in films:
        xray = read_xray(film)
        x = preprocess(xray.pixels, card)

        def fwd_bwd(x=x):
            model.zero_grad(set_to_none=True)
            model(x.clone().requires_grad_(False))[0, 0].backward()

        r = {"film": film.name,
             "forward_backward_s": _median_seconds(fwd_bwd, args.repeats),
             "lung_model_s": _median_seconds(lambda xray=xray: service.lungs.segment(xray.pixels), args.repeats),
             "explain_prior_off_s": _median_seconds(lambda xray=xray: service.explain(xray, name, None, "default",
                                                                                      prior="off"), args.repeats),
             "explain_default_s": _median_seconds(lambda xray=xray: service.explain(xray, name, None, "default"),
                                                  args.repeats)}
        model.zero_grad(set_to_none=True)
        rows.append(r)
    keys = ["forward_backward_s", "lung_model_s", "explain_prior_off_s", "explain_default_s"]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    prior = card.explain_defaults.prior if card.explain_defaults else None
    result = {"model": name, "prior_of_defaults": prior, "films": len(rows), "torch_threads": torch.get_num_threads(),
              "median": med, "explain_default_vs_forward_backward": med["explain_default_s"] / med["forward_backward_s"],
              "prior_added_vs_forward_backward": (med["explain_default_s"] - med["explain_prior_off_s"]) / med["forward_backward_s"],
              "per_film": rows, "command": "python -m bench.explain_prior" + (f" --model {name}" if args.model else "")}
    lines = [f"# /explain with the anatomical prior: {name}", "",
             f"`{result['command']}`, in-process service calls (no HTTP, no PNG encoding), median over "
             f"{len(rows)} example films x {args.repeats} repeats, {result['torch_threads']} torch threads.", "",
             "| step | median ms |", "|---|---|"]
    lines += [f"| {k.removesuffix('_s').replace('_', ' ')} | {1000 * v:.0f} |" for k, v in med.items()]
    lines += ["", f"The default explain (prior `{prior}`) costs **{result['explain_default_vs_forward_backward']:.2f}x** one "
              f"forward+backward of the classifier. Both explain rows run the lung model (every explain looks for the "
              f"lungs, to say when the heatmap's peak lies outside the chest); restricting the heatmap adds "
              f"{result['prior_added_vs_forward_backward']:.2f}x."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
