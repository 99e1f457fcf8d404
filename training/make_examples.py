"""Write the demo's example films into ``examples/`` (at most 8 NIH official-test images, with their
attribution, labels and radiologist boxes), so the hosted Space and the Docker image have examples and box
IoU without the shared data folder.

    python -m training.make_examples            # rewrites examples/ from ../shared/data/nih14

The picks are deterministic: for each of six boxed findings the first official-test image (by name) whose
radiologist boxes include it, starting from ``00013118_008.png`` (Atelectasis, the film the tests and
benchmarks use), then two official-test images without boxes. NIH released the images for use without
restriction; they are already 384 x 384 (downsampled from 1024) in the shared data and are copied as is.
Test images are shown, never trained or tuned on; the same rule holds for these copies.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

from cxr_demo.groundtruth import EXAMPLES_DIR, NIH_BOX_FILE, nih_folder, read_box_list

FIRST = "00013118_008.png"
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Pneumothorax", "Mass", "Nodule"]
N_UNBOXED = 2

ATTRIBUTION = """# Example films

{n} chest radiographs from the official **test** list of the NIH ChestX-ray14 dataset, copied from the
shared data (8-bit PNG, 384 x 384, downsampled from the released 1024 x 1024) by
`python -m training.make_examples`. They are shown by the demo and never used for training or tuning.

Source: NIH Clinical Center, https://nihcc.app.box.com/v/ChestXray-NIHCC — the dataset may be used without
restriction. Please cite: Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. *ChestX-ray8: Hospital-scale
Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax
Diseases.* IEEE CVPR 2017.

`{box_file}` holds the official radiologist boxes of these images, in the official format and in the
official 1024 x 1024 frame (the app scales them to the image); `labels.csv` their official labels.

| file | official labels | radiologist boxes | patient, age, sex, view |
|---|---|---|---|
{rows}
"""


def pick(images: Path, boxes: dict, test: list[str]) -> tuple[list[str], list[str]]:
    def boxes_of(name: str, finding: str) -> bool:
        return any(f == finding for f, _ in boxes.get(name, []))

    boxed = [FIRST] if FIRST in boxes and (images / FIRST).is_file() else []
    for finding in FINDINGS:
        if any(boxes_of(name, finding) for name in boxed):
            continue
        boxed += [n for n in sorted(boxes) if n not in boxed and (images / n).is_file() and boxes_of(n, finding)][:1]
    unboxed = [n for n in sorted(test) if n not in boxes and (images / n).is_file()][:N_UNBOXED]
    return boxed[: 8 - len(unboxed)], unboxed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    args = p.parse_args(argv)
    nih = nih_folder()
    boxes = read_box_list(nih / NIH_BOX_FILE)
    test = (nih / "test_list.txt").read_text().split()
    boxed, unboxed = pick(nih / "images", boxes, test)
    names = boxed + unboxed
    assert len(names) <= 8 and set(names) <= set(test)
    entries = {}
    with open(nih / "Data_Entry_2017_v2020.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["Image Index"] in names:
                entries[row["Image Index"]] = row
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for name in names:
        shutil.copyfile(nih / "images" / name, args.out / name)
    with open(nih / NIH_BOX_FILE, newline="") as f, open(args.out / NIH_BOX_FILE, "w", newline="") as out:
        reader, writer = csv.reader(f), csv.writer(out)
        writer.writerow(next(reader))
        for row in reader:
            if row and row[0] in names:
                writer.writerow(row)
    with open(args.out / "labels.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"])
        for name in names:
            e = entries[name]
            writer.writerow([name, e["Finding Labels"], e["Patient ID"], e["Patient Age"], e["Patient Gender"], e["View Position"]])
    rows = []
    for name in names:
        e = entries[name]
        found = ", ".join(sorted({f for f, _ in boxes.get(name, [])})) or "none"
        rows.append(f"| `{name}` | {e['Finding Labels'].replace('|', ', ')} | {found} | "
                    f"{e['Patient ID']}, {e['Patient Age']}, {e['Patient Gender']}, {e['View Position']} |")
    (args.out / "README.md").write_text(ATTRIBUTION.format(n=len(names), box_file=NIH_BOX_FILE, rows="\n".join(rows)))
    print(f"wrote {len(names)} examples to {args.out}: {', '.join(names)}")


if __name__ == "__main__":
    main()
