"""Run one model over a folder of films and keep the answers: one row per image.

    python -m cxr_demo.batch FOLDER --model nih14-ensemble --operating-point f1 --out results.csv
    python -m cxr_demo.batch FOLDER --json --out results.json      # the /predict documents, one per image

Every image file in FOLDER (recursively with ``--recursive``) is decoded and predicted exactly as ``/predict``
does it (same decoding, preprocessing, model, thresholds and out-of-distribution check), so the numbers are
the app's. A file that cannot be read gets a row with its reason in ``error`` and the run goes on. CSV
columns: ``file``, ``error``, ``warnings``, then per finding ``<finding>_probability`` and ``_threshold``
(calibrated, as the app shows them), ``_positive`` and ``_raw_probability`` (the model's uncalibrated output). The model defaults to the app's default (the zoo's first, chosen on validation).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from cxr_demo.images import IMAGE_SUFFIXES, read_xray
from cxr_demo.service import USER_ERRORS, DemoService
from cxr_demo.zoo import Zoo

log = logging.getLogger(__name__)


def films(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` by suffix (DICOM included), sorted."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def run(paths: list[Path], service: DemoService, model: str, operating_point: str, progress: bool = True) -> list[dict]:
    """``{"file", "error", "document"}`` per path; a user error (unreadable file, bad choice) is recorded, not
    raised."""
    from tqdm import tqdm

    out = []
    for path in tqdm(paths, desc=f"{model} ({operating_point})", unit="film", disable=not progress, file=sys.stderr):
        try:
            doc = service.predict(read_xray(path), model, operating_point).document
            out.append({"file": str(path), "error": None, "document": doc})
        except USER_ERRORS as e:
            out.append({"file": str(path), "error": str(e), "document": None})
    return out


def write_csv(rows: list[dict], out, labels: list[str]) -> None:
    writer = csv.writer(out)
    writer.writerow(["file", "error", "warnings"]
                    + [f"{lab}_{k}" for lab in labels for k in ("probability", "threshold", "positive", "raw_probability")])
    for row in rows:
        doc = row["document"]
        cells = [row["file"], row["error"] or "", " | ".join(doc["warnings"]) if doc else ""]
        by_name = {f["name"]: f for f in doc["findings"]} if doc else {}
        for lab in labels:
            f = by_name.get(lab)
            cells += ["", "", "", ""] if f is None else [
                f"{f['probability']:.6f}", "" if f["threshold"] is None else f"{f['threshold']:.6f}", int(f["positive"]),
                f"{f['raw_probability']:.6f}"]
        writer.writerow(cells)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--model", default=None, help="zoo model name (default: the app's default model)")
    p.add_argument("--operating-point", default=None, help="f1, youden or screening (default: the card's first)")
    p.add_argument("--out", type=Path, default=None, help="output file (default: standard output)")
    p.add_argument("--json", action="store_true", help="write the /predict documents as JSON instead of CSV")
    p.add_argument("--recursive", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.folder.is_dir():
        p.error(f"{args.folder} is not a folder")
    service = DemoService(Zoo())
    model = args.model or (service.zoo.names[0] if service.zoo.names else None)
    try:
        card = service.zoo.card(model)
    except USER_ERRORS as e:
        p.error(str(e))
    op = args.operating_point or card.operating_points[0]
    rows = run(films(args.folder, args.recursive), service, card.name, op, progress=not args.quiet)
    out = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115 - stdout or a file
    try:
        if args.json:
            json.dump({"model": card.name, "operating_point": op, "results": rows}, out, indent=1)
            out.write("\n")
        else:
            write_csv(rows, out, card.label_names)
    finally:
        if args.out:
            out.close()
    failed = sum(r["error"] is not None for r in rows)
    print(f"{len(rows)} films, {failed} could not be read", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
