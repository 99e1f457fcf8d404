"""Paired comparison of two evaluated checkpoints on the same test images.

    python -m training.compare checkpoints/nih14-ensemble checkpoints/nih14-efficientnet-lite1

Reads each folder's ``test_predictions.npz`` (written by ``training.evaluate``), checks that both
scored the same images with the same labels, and reports the macro AUROC difference (A minus B) with a
paired patient-level bootstrap 95% interval, per finding too. Writes ``docs/compare/<A>--<B>.json``.
This describes a choice already made on validation; it is not a way to make one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cxr_demo.paths import PROJECT_ROOT
from training.evaluate import PREDICTIONS_FILE
from training.metrics import paired_bootstrap_difference


def compare(a: Path, b: Path, n_boot: int = 1000) -> dict:
    pa, pb = np.load(Path(a) / PREDICTIONS_FILE), np.load(Path(b) / PREDICTIONS_FILE)
    for key in ("images", "labels", "label_names"):
        if not np.array_equal(pa[key], pb[key]):
            raise ValueError(f"{a} and {b} were not evaluated on the same images and labels ({key} differ)")
    labels = [str(n) for n in pa["label_names"]]
    d = paired_bootstrap_difference(pa["labels"].astype(float), pa["probabilities"], pb["probabilities"],
                                    groups=pa["patients"], n_boot=n_boot)
    d["per_label"] = dict(zip(labels, d["per_label"], strict=True))
    return {"a": Path(a).name, "b": Path(b).name, "weights_sha256": {"a": str(pa["weights_sha256"]),
                                                                      "b": str(pb["weights_sha256"])},
            "n_images": int(len(pa["images"])), "n_patients": int(len(set(pa["patients"].tolist()))),
            "macro_auroc_difference": d, "command": f"python -m training.compare {a} {b}"}


def markdown(result: dict, a: Path, b: Path) -> str:
    """A per-finding before/after table: each model's test AUROC (patient-level CI) and the paired difference."""
    ev_a, ev_b = (json.loads((Path(f) / "eval.json").read_text()) for f in (a, b))
    d = result["macro_auroc_difference"]

    def auc(ev: dict, lab: str | None = None) -> str:
        v = ev["per_label"][lab] if lab else {"auroc": ev["macro_auroc"], "auroc_ci95": ev["macro_auroc_ci95"]}
        ci = v.get("auroc_ci95")
        return "n/a" if v["auroc"] is None else f"{v['auroc']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")

    lines = [f"# {result['b']} (before) vs {result['a']} (after), NIH official-test images", "",
             f"`{result['command']}`; {result['n_images']} images of {result['n_patients']} patients; AUROC with "
             "patient-level bootstrap 95% CI, difference after minus before with a paired patient-level bootstrap "
             "95% CI. The choice between them was made on validation; this table only describes it.", "",
             "| finding | positives | before | after | difference (paired 95% CI) |", "|---|---|---|---|---|",
             f"| **macro** | | {auc(ev_b)} | {auc(ev_a)} | {d['difference']:+.3f} ({d['ci95'][0]:+.3f} to "
             f"{d['ci95'][1]:+.3f}) |"]
    for lab, diff in d["per_label"].items():
        ci = diff["ci95"]
        lines.append(f"| {lab} | {ev_a['per_label'][lab]['positives']} | {auc(ev_b, lab)} | {auc(ev_a, lab)} | "
                     f"{diff['difference']:+.3f} ({ci[0]:+.3f} to {ci[1]:+.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "compare")
    args = p.parse_args(argv)
    result = compare(args.a, args.b, args.bootstrap)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{result['a']}--{result['b']}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{result['a']}--{result['b']}.md").write_text(markdown(result, args.a, args.b))
    d = result["macro_auroc_difference"]
    ci = d["ci95"]
    print(f"{result['a']} minus {result['b']}: macro AUROC {d['difference']:+.3f} "
          f"(paired patient bootstrap 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}; {result['n_images']} images, "
          f"{result['n_patients']} patients)")
    return result


if __name__ == "__main__":
    main()
