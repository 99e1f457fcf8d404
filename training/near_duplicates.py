"""Near-duplicate films in a task without patient ids, and whether any straddle its train/test split.

The COVID-19 Radiography Database names its films ``COVID-123.jpg`` / ``Normal-456.jpg``: no patient id, so
``covid3`` splits film by film. Two copies of one film, or two films of one patient, on both sides of the split
would let the test AUROC reward memory. This measures how often that can happen: every film is reduced to a
32 x 32 thumbnail (the app's own preprocessing), centred and scaled to unit length, and pairs whose cosine
similarity passes a threshold are listed with their splits.

    python -m training.near_duplicates --task covid3   # writes docs/analysis/covid3-near-duplicates.json

Read by eye on the films here: pairs at >= 0.97 were the same film (several byte-different copies) or the
same patient's films with a marker moved; between 0.95 and 0.97 they were a mix of one patient's follow-up films
and different people; below that, different people. The threshold is an aid, not a patient id.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from cxr_demo.card import read_card
from cxr_demo.images import read_xray
from cxr_demo.inference import prepare_pixels
from cxr_demo.paths import PROJECT_ROOT
from training.data import Record, add_data_root_argument
from training.metrics import macro_auroc
from training.tasks import load_task

log = logging.getLogger(__name__)

THUMB = 32
SAME_FILM = 0.97  # by eye on covid19: the same film or the same patient's films at or above this
REPORTED = (0.99, 0.97, 0.95)
OUT = PROJECT_ROOT / "docs" / "analysis"


def thumbnails(records: list[Record], size: int = THUMB) -> np.ndarray:
    """(N, size*size) centred, unit-length thumbnails."""
    x = np.stack([prepare_pixels(read_xray(r.path).pixels, size).astype(np.float32).ravel() for r in records])
    x -= x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def near_duplicate_pairs(x: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs (i < j) whose thumbnails' cosine similarity is at least ``threshold``, most similar first."""
    s = x @ x.T
    i, j = np.nonzero(np.triu(s, 1) >= threshold)
    return sorted(((int(a), int(b), float(s[a, b])) for a, b in zip(i, j)), key=lambda t: -t[2])


def study(records: list[Record], thresholds: tuple[float, ...] = REPORTED) -> dict:
    """Counts per threshold (pairs, pairs across the split, test films with a copy in train_val) and the pairs
    at the lowest threshold."""
    x = thumbnails(records)
    lowest = near_duplicate_pairs(x, min(thresholds))
    split = [r.split for r in records]
    counts = {}
    for t in thresholds:
        pairs = [p for p in lowest if p[2] >= t]
        across = [p for p in pairs if split[p[0]] != split[p[1]]]
        counts[f"{t:.2f}"] = {
            "pairs": len(pairs), "films_in_a_pair": len({k for p in pairs for k in p[:2]}),
            "pairs_across_train_test": len(across),
            "test_films_with_a_train_val_pair": len({p[0] if split[p[0]] == "test" else p[1] for p in across}),
        }
    return {
        "method": f"{THUMB} x {THUMB} thumbnails (cxr_demo preprocessing), centred, cosine similarity",
        "films": len(records), "test_films": split.count("test"), "by_threshold": counts,
        "pairs": [{"a": records[a].path.name, "b": records[b].path.name, "similarity": round(s, 4),
                   "splits": [split[a], split[b]]} for a, b, s in lowest],
    }


def auroc_without(checkpoint: Path, result: dict) -> dict:
    """The checkpoint's committed test macro AUROC, and again without the test films that have a ``train_val``
    partner at each threshold (from its ``test_predictions.npz``; the weights must be the ones it records)."""
    card = read_card(checkpoint)
    saved = np.load(Path(checkpoint) / "test_predictions.npz", allow_pickle=False)
    if str(saved["weights_sha256"]) != card.sha256:
        raise SystemExit(f"{checkpoint}/test_predictions.npz is not of the weights in its card")
    names, y, p = saved["images"], saved["labels"].astype(float), saved["probabilities"]
    out = {"checkpoint": card.name, "test_films": int(len(names)), "macro_auroc_all": macro_auroc(y, p)}
    for t in result["by_threshold"]:
        partnered = {x for pair in result["pairs"] if pair["similarity"] >= float(t) and pair["splits"][0] != pair["splits"][1]
                     for x, s in zip((pair["a"], pair["b"]), pair["splits"]) if s == "test"}
        keep = ~np.isin(names, sorted(partnered))
        out[f"macro_auroc_without_partnered_{t}"] = macro_auroc(y[keep], p[keep])
        out[f"films_left_out_{t}"] = int((~keep).sum())
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="covid3", choices=["covid3"])
    p.add_argument("--checkpoint", type=Path, default=PROJECT_ROOT / "checkpoints" / "covid3-efficientnet-lite0",
                   help="its committed test AUROC is recomputed without the test films that have a partner")
    p.add_argument("--out", type=Path, default=OUT)
    add_data_root_argument(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    task = load_task(args.task, args.data_root)
    # The films without patient ids (the Kermany viral films keep Kermany's patient split).
    records = [r for r in task.records if r.patient.startswith("covid:")]
    result = {"task": args.task, "command": "python -m training.near_duplicates " + " ".join(argv or []),
              **study(records)}
    result["test_auroc"] = auroc_without(args.checkpoint, result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.task}-near-duplicates.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for t, c in result["by_threshold"].items():
        print(f"similarity >= {t}: {c['pairs']} pairs ({c['films_in_a_pair']} films), {c['pairs_across_train_test']} "
              f"across train/test, {c['test_films_with_a_train_val_pair']} of {result['test_films']} test films with a "
              "train_val partner")
    print(json.dumps(result["test_auroc"]))
    return path


if __name__ == "__main__":
    main()
