"""The serving benchmark's cold-start and batch-floor modes run end to end (timings reported, not asserted)."""

import re

import pytest

from bench.serving import DEFAULT_IMAGE, main

pytestmark = pytest.mark.skipif(not DEFAULT_IMAGE.is_file(), reason=f"{DEFAULT_IMAGE} is not present (shared data)")


def test_cold_start_mode_starts_the_app_and_answers_a_predict(capsys):
    assert main(["--cold-start-only", "1"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"page answering after ([\d.]+) s, first /predict \((\S+)\) answered after ([\d.]+) s", out)
    assert m, out
    assert 0 < float(m.group(1)) <= float(m.group(3))


def test_batch_floor_mode_prints_one_row_per_model(capsys):
    assert main(["--batch-floor", "1", "2", "--models", "nih14-small-cnn", "--requests", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| nih14-small-cnn |")]
    assert len(rows) == 1 and rows[0].endswith("x |"), rows
