"""A folder of films (#13): one row per image, errors recorded without stopping, the same numbers as /predict
through the running app."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from gradio_client import handle_file

from cxr_demo.batch import main
from cxr_demo.groundtruth import default_examples


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "films"
    d.mkdir()
    for p in default_examples()[:3]:
        shutil.copy(p, d)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "empty.dcm").write_bytes(b"")
    (d / "notes.txt").write_text("not a film: skipped by suffix")
    return d


def test_batch_csv_matches_predict_and_records_broken_files(folder, tmp_path, client, model_name):
    out = tmp_path / "results.csv"
    assert main([str(folder), "--model", model_name, "--operating-point", "f1", "--out", str(out), "--quiet"]) == 0
    with open(out, newline="") as f:
        rows = {row["file"].split("/")[-1]: row for row in csv.DictReader(f)}
    assert set(rows) == {*(p.split("/")[-1] for p in default_examples()[:3]), "broken.png", "empty.dcm"}
    assert "not an image" in rows["broken.png"]["error"] and "empty" in rows["empty.dcm"]["error"]
    for name in (p.split("/")[-1] for p in default_examples()[:3]):
        doc, _ = client.predict(handle_file(str(folder / name)), model_name, "f1", api_name="/predict")
        row = rows[name]
        assert row["error"] == ""
        for f in doc["findings"]:
            assert float(row[f"{f['name']}_probability"]) == pytest.approx(f["probability"], abs=1e-6)
            assert float(row[f"{f['name']}_raw_probability"]) == pytest.approx(f["raw_probability"], abs=1e-6)
            assert int(row[f"{f['name']}_positive"]) == int(f["positive"])


def test_batch_json_and_bad_model(folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert main([str(folder), "--json", "--out", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 5 and sum(r["error"] is not None for r in doc["results"]) == 2
    with pytest.raises(SystemExit):
        main([str(folder), "--model", "../../etc/passwd"])
    assert "Unknown model" in capsys.readouterr().err
