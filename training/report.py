"""Rebuild the model-zoo table in README.md from the committed cards and evaluation files.

    python -m training.report          # rewrite the table
    python -m training.report --check  # exit 1 if README.md is stale (the tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cxr_demo.card import EVAL_FILE, read_card
from cxr_demo.zoo import DEFAULT_CHECKPOINTS

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"


def zoo_table(checkpoints: Path = DEFAULT_CHECKPOINTS) -> str:
    """A markdown table with one row per checkpoint, every number read from its eval.json."""
    lines = [
        "| model | architecture | init | trained on | macro AUROC (95% CI) | evaluation images | mean box IoU (boxes) | eval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for folder in sorted(p.parent for p in checkpoints.glob("*/config.json")):
        card = read_card(folder)
        ev_path = folder / EVAL_FILE
        if not ev_path.is_file():
            lines.append(f"| {card.name} | `{card.architecture}` | {card.init} | {card.training.get('n_train', '?')} images | not evaluated | | | |")
            continue
        ev = json.loads(ev_path.read_text())
        ci = ev.get("macro_auroc_ci95")
        auc = f"{ev['macro_auroc']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" if ci else f"{ev['macro_auroc']:.3f}"
        loc = ev.get("localisation", {}).get("overall")
        iou = f"{loc['mean_iou']:.3f} ({loc['n_boxes']})" if loc else "—"
        init = card.init.split(" (")[0]
        lines.append(
            f"| {card.name} | `{card.architecture}` {card.input_size}px | {init} | {card.training.get('n_train', '?')} "
            f"NIH train images | {auc} | {ev['n_images']} NIH test | {iou} | [eval.json](checkpoints/{folder.name}/{EVAL_FILE}) |"
        )
    return "\n".join(lines)


def render(readme: str, table: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{table}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    path = ROOT / "README.md"
    text = path.read_text()
    new = render(text, zoo_table())
    if args.check:
        if new != text:
            print("README.md's zoo table is stale: run python -m training.report", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
