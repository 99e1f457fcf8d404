"""Training options beyond the default run: losses, sampling, schedules, freezing, resuming, other tasks,
CheXpert CSVs, init from a checkpoint, and 2-process DDP on the CPU (all offline, tiny, synthetic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchvision.ops import sigmoid_focal_loss

from cxr_demo.card import read_card
from cxr_demo.images import read_xray
from cxr_demo.service import DemoService
from cxr_demo.zoo import Zoo, ZooSource
from tests.helpers import make_fake_kermany_covid, make_fake_nih, train_tiny
from training.data import chexpert_records, covid_records, kermany_class, kermany_patient, kermany_records
from training.losses import multiclass_loss, multilabel_loss, sample_weights

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def train_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # training state goes to ./runs
    return tmp_path


# --- losses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bce", "wbce", "cabce", "focal"])
def test_multilabel_losses_split_across_ranks_add_up(kind):
    """What makes DDP exact: the shares of a batch, computed separately, sum to the whole batch's loss."""
    torch.manual_seed(0)
    logits = torch.randn(10, 4)
    y = (torch.rand(10, 4) < 0.3).float()
    y[0, 1] = float("nan")
    pw = torch.tensor([1.0, 2.0, 3.0, 1.5])
    whole = multilabel_loss(kind, logits, y, y, pw)
    parts = sum(multilabel_loss(kind, logits[i], y[i], y, pw) for i in torch.tensor_split(torch.arange(10), 3))
    assert torch.isclose(whole, parts, atol=1e-6)
    assert torch.isfinite(whole) and whole > 0


def test_bce_focal_match_references_and_nan_is_masked():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, requires_grad=True)
    y = (torch.rand(6, 3) < 0.5).float()
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    assert torch.isclose(multilabel_loss("bce", logits, y, y), ref)
    assert torch.isclose(multilabel_loss("focal", logits, y, y), sigmoid_focal_loss(logits, y, reduction="mean"))
    y[2, 1] = float("nan")
    multilabel_loss("bce", logits, y, y).backward()
    assert logits.grad[2, 1] == 0 and logits.grad[2, 0] != 0


def test_class_averaged_bce_gives_rare_positives_half_the_weight():
    logits = torch.zeros(10, 1, requires_grad=True)
    y = torch.zeros(10, 1)
    y[0] = 1  # one positive among ten
    multilabel_loss("cabce", logits, y, y).backward()
    g = logits.grad[:, 0]
    assert torch.isclose(g[0].abs(), g[1:].abs().sum(), rtol=1e-5)  # the one positive == all negatives together


def test_multiclass_losses():
    torch.manual_seed(0)
    logits = torch.randn(8, 3)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 0, 1, 2, 0]), 3).float()
    ref = torch.nn.functional.cross_entropy(logits, y.argmax(1))
    assert torch.isclose(multiclass_loss("ce", logits, y, y), ref)
    w = torch.tensor([0.5, 1.0, 2.0])
    assert torch.isclose(multiclass_loss("wce", logits, y, y, w), torch.nn.functional.cross_entropy(logits, y.argmax(1), weight=w))
    assert multiclass_loss("focal", logits, y, y) < ref  # down-weights easy examples
    with pytest.raises(ValueError, match="unknown"):
        multiclass_loss("bce", logits, y, y)


def test_weighted_sampling_balances_classes():
    y = np.eye(3, dtype=np.float32)[[0] * 90 + [1] * 9 + [2] * 1]
    w = torch.tensor(sample_weights(y, "multiclass"))
    drawn = torch.multinomial(w, 30000, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = np.bincount(y[drawn.numpy()].argmax(1), minlength=3) / 30000
    assert np.allclose(counts, 1 / 3, atol=0.02)
    ml = np.zeros((100, 2), dtype=np.float32)
    ml[:5, 0] = 1  # rare finding; 95 images with none
    w = sample_weights(ml, "multilabel")
    assert w[:5].sum() == pytest.approx(w[5:].sum())


# --- other data sets ------------------------------------------------------------------------------


def test_kermany_names_and_records(tmp_path):
    assert kermany_patient("person1001_bacteria_2932.jpeg") == "person1001"
    assert kermany_patient("IM-0115-0001.jpeg") == "IM-0115"
    assert kermany_patient("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert kermany_class("person1_virus_6.jpeg", "PNEUMONIA") == "Viral pneumonia"
    with pytest.raises(ValueError, match="neither"):
        kermany_class("x.jpeg", "PNEUMONIA")
    root = make_fake_kermany_covid(tmp_path)
    three = kermany_records(root / "kermany", "kermany3")
    assert len(three) == 36 and sum(r.split == "test" for r in three) == 12
    assert np.stack([r.labels for r in three if r.split == "train_val"]).sum(0).tolist() == [8, 8, 8]
    two = kermany_records(root / "kermany", "kermany2")
    assert np.stack([r.labels for r in two]).sum(0).tolist() == [12, 24]
    covid = covid_records(root / "covid19", root / "kermany")
    assert np.stack([r.labels for r in covid]).sum(0).tolist() == [8, 8, 12]  # viral from Kermany
    assert [r.split for r in covid] == [r.split for r in covid_records(root / "covid19", root / "kermany")]


def test_chexpert_csv_uncertainty_policies(tmp_path):
    from training.tasks import CHEXPERT_LABELS

    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    rows = [["train/patient00001/study1/view1_frontal.jpg", "F", "60", "Frontal", "AP"] + [""] * 14,
            ["train/patient00002/study1/view1_frontal.jpg", "M", "70", "Frontal", "PA"] + ["1.0", "-1.0"] + ["0.0"] * 12]
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    labels = list(CHEXPERT_LABELS)
    zeros, ones, ignore = (chexpert_records(csv_path, labels, u) for u in ("zeros", "ones", "ignore"))
    assert zeros[0].labels.sum() == 0  # blank = not mentioned
    assert zeros[1].labels[:2].tolist() == [1, 0] and ones[1].labels[:2].tolist() == [1, 1]
    assert np.isnan(ignore[1].labels[1]) and ignore[1].patient == "chexpert:patient00002"
    assert zeros[0].path == tmp_path / rows[0][0]
    with pytest.raises(ValueError, match="no column"):
        chexpert_records(csv_path, labels + ["Made Up"], "zeros")
    csv_path.write_text("\n".join(",".join(r) for r in [header, rows[1][:5] + ["2.0"] + ["0"] * 13]) + "\n")
    with pytest.raises(ValueError, match="expected 1, 0, -1"):
        chexpert_records(csv_path, labels, "zeros")


# --- training runs ---------------------------------------------------------------------------------


def test_kermany3_with_lung_crop_focal_sampling_plateau_freeze(train_env):
    data = make_fake_kermany_covid(train_env / "data")
    folder = train_tiny("--task", "kermany3", "--data-root", data, "--arch", "test_efficientnet", "--init", "random",
                         "--name", "k3", "--out", train_env / "ck", "--epochs", "3", "--crop", "lung",
                         "--loss", "focal", "--weighted-sampling", "--scheduler", "plateau", "--freeze-epochs", "1",
                         "--optimizer", "adam", "--val-fraction", "0.25")
    card = read_card(folder)
    ev = json.loads((folder / "eval.json").read_text())
    assert card.crop == (0.15, 0.90, 0.20, 0.80) and card.task_kind == "multiclass"
    assert card.label_names == ["Normal", "Bacterial pneumonia", "Viral pneumonia"]
    assert card.training["loss"] == "focal" and card.training["optimizer"] == "Adam"
    assert ev["n_images"] == 12 and ev["localisation"] is None
    assert np.array(ev["confusion_matrix"]["counts"]).sum() == 12 and 0 <= ev["accuracy"] <= 1
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [r["frozen_backbone"] for r in log] == [True, False, False]
    pred = DemoService(Zoo(ZooSource(train_env / "ck"))).predict(
        read_xray(data / "kermany" / "test" / "NORMAL" / "IM-0500-0001.jpeg"), "k3")
    assert abs(sum(f["probability"] for f in pred.document["findings"]) - 1.0) < 1e-4  # softmax over 3 classes


def test_frozen_epoch_changes_only_the_head(train_env):
    data = make_fake_nih(train_env / "data")
    runs = {}
    for name, extra in (("init", ["--epochs", "0"]), ("frozen", ["--epochs", "1", "--freeze-epochs", "1"])):
        folder = train_tiny("--data-root", data, "--arch", "test_resnet", "--init", "random", "--name", name,
                             "--out", train_env / "ck", "--no-eval", "--drop-rate", "0", *extra)
        runs[name] = load_file(str(folder / "model.safetensors"))
    changed = {k for k in runs["init"] if not torch.equal(runs["init"][k], runs["frozen"][k])}
    assert changed and all(k.startswith("fc.") or "running_" in k or "num_batches" in k for k in changed)


def test_resume_continues_where_it_stopped(train_env):
    data = make_fake_nih(train_env / "data")
    common = ["--data-root", data, "--arch", "test_efficientnet", "--init", "random", "--out", train_env / "ck",
              "--no-eval", "--patience", "9"]
    straight = train_tiny(*common, "--name", "a", "--epochs", "3")
    train_tiny(*common, "--name", "b", "--epochs", "3", "--stop-after", "2")
    resumed = train_tiny(*common, "--name", "b", "--epochs", "3", "--resume")
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    log = [json.loads(line)["epoch"] for line in (resumed / "train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3]


def test_init_from_our_checkpoint_and_arch_mismatch(train_env):
    data = make_fake_nih(train_env / "data")
    kdata = make_fake_kermany_covid(train_env / "data")
    src = train_tiny("--data-root", data, "--arch", "test_efficientnet", "--init", "random", "--name", "src",
                      "--out", train_env / "ck", "--no-eval", "--epochs", "1")
    dst = train_tiny("--task", "kermany2", "--data-root", kdata, "--arch", "test_efficientnet", "--init", "checkpoint",
                      "--init-from", src, "--name", "dst", "--out", train_env / "ck", "--no-eval", "--epochs", "0")
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert torch.equal(a["conv_stem.weight"], b["conv_stem.weight"])  # backbone copied
    assert b["classifier.weight"].shape[0] == 2 != a["classifier.weight"].shape[0]  # new head
    assert "in-domain: checkpoint src" in read_card(dst).init
    with pytest.raises(SystemExit, match="not test_resnet"):
        train_tiny("--data-root", data, "--arch", "test_resnet", "--init", "checkpoint", "--init-from", src,
                    "--name", "bad", "--out", train_env / "ck", "--no-eval")


def test_chexpert_task_trains_with_ignored_labels(train_env):
    from PIL import Image

    from training.tasks import CHEXPERT_LABELS

    rng = np.random.default_rng(0)
    header = ["Path", *CHEXPERT_LABELS]
    lines = [",".join(header)]
    for i in range(24):
        rel = f"train/patient{i // 2:05d}/study1/view{i % 2}_frontal.jpg"
        (train_env / "cx" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(train_env / "cx" / rel)
        lines.append(",".join([rel] + [str(rng.choice(["1.0", "0.0", "-1.0", ""])) for _ in CHEXPERT_LABELS]))
    (train_env / "cx" / "train.csv").write_text("\n".join(lines) + "\n")
    folder = train_tiny("--task", "chexpert", "--chexpert-csv", train_env / "cx" / "train.csv", "--uncertain", "ignore",
                         "--arch", "test_efficientnet", "--init", "random", "--name", "cx", "--out", train_env / "ck",
                         "--epochs", "1", "--val-fraction", "0.5")
    card = read_card(folder)
    assert card.label_names == list(CHEXPERT_LABELS) and "uncertain labels: ignore" in card.data_source
    assert not (folder / "eval.json").exists()  # no CheXpert test images here: nothing evaluated


def test_ddp_two_cpu_processes_match_one(train_env):
    """torchrun with 2 gloo processes, each taking half of every batch, ends where 1 process ends."""
    data = make_fake_nih(train_env / "data")
    args = ["--data-root", str(data), "--arch", "test_vit", "--init", "random", "--input-size", "32",
            "--epochs", "2", "--batch-size", "8", "--drop-rate", "0", "--no-eval", "--no-fp16", "--threads", "1",
            "--out", str(train_env / "ck")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "training.train", *args, "--name", "one"], check=True, env=env,
                   cwd=train_env, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                           "-m", "training.train", *args, "--name", "two"], env=env, cwd=train_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(str(train_env / "ck" / "one" / "model.safetensors"))
    two = load_file(str(train_env / "ck" / "two" / "model.safetensors"))
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, worst
    assert read_card(train_env / "ck" / "two").training["processes"] == 2


def test_optuna_search_records_every_trial(train_env):
    from training.search import main as search_main

    data = make_fake_nih(train_env / "data")
    record = search_main(["--study", "tiny", "--trials", "3", "--startup-trials", "2", "--record-dir", str(train_env / "search"), "--",
                          "--data-root", str(data), "--arch", "test_efficientnet", "--init", "random",
                          "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--threads", "1"])
    saved = json.loads((train_env / "search" / "tiny.json").read_text())
    assert saved == record and len(saved["trials"]) == 3
    lrs = [t["params"]["lr"] for t in saved["trials"]]
    assert len(set(lrs)) == 3 and all(1e-4 <= v <= 3e-3 for v in lrs)
    # TPE takes over after the startup trials (Optuna's default would keep sampling at random for 10)
    assert [t["sampled_by"] for t in saved["trials"]] == ["random (startup)", "random (startup)", "TPE"]
    assert "n_startup_trials=2" in saved["sampler"]
    assert saved["best"]["val_macro_auroc"] == max(t["val_macro_auroc"] for t in saved["trials"])
    assert "--lr" in saved["best"]["command"]
    with pytest.raises(SystemExit, match="set by the search"):
        search_main(["--study", "bad", "--", "--lr", "0.1"])


def test_tsne_map_and_model_zoo_page(train_env, monkeypatch):
    import training.report as report

    data = make_fake_nih(train_env / "data")
    folder = train_tiny("--data-root", data, "--arch", "test_efficientnet", "--init", "random", "--name", "tiny",
                         "--out", train_env / "ck", "--epochs", "1", "--val-fraction", "0.25")
    meta = report.compute_tsne(folder, train_env / "zoo", data_root=data)
    assert (train_env / "zoo" / "tsne-tiny.png").stat().st_size > 5000
    assert meta["n_images"] == 16 and meta["weights_sha256"] == read_card(folder).sha256
    monkeypatch.setattr(report, "TSNE_DIR", train_env / "zoo")
    page = report.model_zoo_doc(train_env / "ck")
    assert "tiny" in page and "zoo/tsne-tiny.png" in page and "| Atelectasis (" in page


def test_extra_64px_films_join_training_only(train_env):
    """--extra-64px adds the train_val films of images-64px to the training part, none of a validation patient and
    none of the test list; the validation split is the one a run without them uses."""
    import csv

    from PIL import Image

    from training.data import nih_records, patient_split

    data = make_fake_nih(train_env / "data")
    nih = data / "nih14"
    train_val = [r for r in nih_records(nih) if r.split == "train_val"]
    _, val = patient_split(train_val, 0.25, 0)
    val_patient = int(val[0].patient)
    (nih / "images-64px").mkdir()
    films = {f"{9000 + i:08d}_000.png": (9000 + i, "train_val") for i in range(5)}
    films[f"{val_patient:08d}_900.png"] = (val_patient, "train_val")  # a validation patient's film: left out
    films["00009999_000.png"] = (9999, "test")  # an official test film: left out
    with open(nih / "Data_Entry_2017_v2020.csv", "a", newline="") as f:
        for name, (patient, _) in films.items():
            Image.fromarray(np.random.default_rng(patient).integers(0, 255, (64, 64), dtype=np.uint8)).save(nih / "images-64px" / name)
            csv.writer(f).writerow([name, "Effusion", 0, patient, 50, "M", "PA", 1024, 1024, 0.14, 0.14])
    for split, listed in (("train_val", "train_val_list.txt"), ("test", "test_list.txt")):
        with open(nih / listed, "a") as f:
            f.write("".join(n + "\n" for n, (_, s) in films.items() if s == split))
    common = ["--data-root", data, "--arch", "test_efficientnet", "--init", "random", "--out", train_env / "ck",
              "--no-eval", "--epochs", "1", "--val-fraction", "0.25"]
    plain = read_card(train_tiny(*common, "--name", "plain"))
    extra = read_card(train_tiny(*common, "--name", "extra", "--extra-64px"))
    assert extra.training["n_train_64px"] == 5 and plain.training["n_train_64px"] == 0
    assert extra.training["n_train"] == plain.training["n_train"] + 5
    assert extra.training["n_val"] == plain.training["n_val"] and extra.training["val_positives"] == plain.training["val_positives"]
    assert "5 train_val films (5 patients) that exist only at 64 x 64" in extra.data_source
    assert "64 x 64" not in plain.data_source
    with pytest.raises(SystemExit, match="nih14 only"):
        train_tiny("--task", "kermany2", "--data-root", make_fake_kermany_covid(train_env / "data"), "--arch",
                    "test_efficientnet", "--init", "random", "--out", train_env / "ck", "--name", "k", "--extra-64px")


def test_ablation_records_a_run_trained_before(train_env, monkeypatch):
    """--record-only records a variant trained by its own train command, with the run's wall time; a variant not
    trained yet is skipped, not trained."""
    import training.ablation as ablation

    data = make_fake_nih(train_env / "data")
    monkeypatch.setenv("CXR_DEMO_DATA_ROOT", str(data))
    monkeypatch.setattr(ablation, "DOCS", train_env / "docs")
    args = ["--data-root", str(data), "--arch", "test_efficientnet", "--init", "random", "--epochs", "1",
            "--threads", "1", "--batch-size", "8", "--input-size", "48"]
    monkeypatch.setitem(ablation.STUDIES, "tiny", {"v-done": args, "v-not-yet": args})
    train_tiny(*args, "--name", "v-done", "--out", train_env / "runs" / "ablation", "--no-eval")
    record = ablation.run_study("tiny", train_env / "runs" / "ablation", train=False)
    assert list(record["variants"]) == ["v-done"]
    done = record["variants"]["v-done"]
    assert done["run_seconds"] == read_card(train_env / "runs" / "ablation" / "v-done").training["wall_seconds"]
    assert 0 <= done["val_macro_auroc"] <= 1 and done["val_images"] > 0
    assert done["cam_outside_thorax"]["shape"] == "hull+0.05"  # training.cam_prior's measure, with the lung model
    assert done["jpeg95"]["n_images"] == done["val_images"] and 0 <= done["jpeg95"]["mean_max_change"] <= 1
    assert not (train_env / "runs" / "ablation" / "v-not-yet").exists()
    table = (train_env / "docs" / "ABLATION.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| v-done |"))
    assert f"{done['jpeg95']['mean_max_change']:.3f} / " in row and "JPEG q95" in table


def _fake_lungseg(root: Path, n: int = 4) -> None:
    """``lungseg/images`` and a manifest (masks are not read by the semi-supervised path)."""
    import csv

    from tests.helpers import write_film

    folder = root / "lungseg"
    (folder / "images").mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "source", "original_id", "patient_id", "width", "height", "has_heart_mask", "source_repo",
                    "source_path"])
        for i in range(n):
            write_film(folder / "images" / f"mc_{i}.png", size=80, seed=100 + i)
            w.writerow([f"mc_{i}", "montgomery", f"MC{i}", f"p{i // 2}", 80, 80, 0, "x", "y"])


def test_pseudo_labels_are_the_teachers_calibrated_probabilities_on_non_nih_films(train_env):
    """--pseudo-labels adds the lungseg films and covid19/COVID (never covid19/Normal) to the training part with the
    teacher's calibrated probabilities as labels; the card says which films and which teacher; a teacher trained on
    another split is refused (it may have seen the student's validation films)."""
    from cxr_demo.calibration import calibrate
    from cxr_demo.inference import predict_array
    from cxr_demo.zoo import load_checkpoint
    from training.data import cached_pixels
    from training.pseudo import teacher_labels, unlabelled_records

    data = make_fake_nih(train_env / "data")
    make_fake_kermany_covid(data)
    _fake_lungseg(data)
    films = unlabelled_records(data, ["lungseg", "covid19"], 14)
    assert len(films) == 4 + 8 and all("Normal" not in str(r.path) for r in films)
    assert all(np.isnan(r.labels).all() and r.patient.split(":")[0] in ("lungseg", "covid19") for r in films)
    assert {r.patient for r in films[:4]} == {"lungseg:montgomery:p0", "lungseg:montgomery:p1"}

    common = ["--data-root", data, "--arch", "test_efficientnet", "--init", "random", "--out", train_env / "ck",
              "--no-eval", "--epochs", "1", "--val-fraction", "0.25"]
    teacher = train_tiny(*common, "--name", "teacher")
    soft = teacher_labels(teacher, films)
    card = read_card(teacher)
    raw = predict_array(load_checkpoint(teacher), cached_pixels(films, card.input_size), card.mean, card.std, "multilabel")
    np.testing.assert_allclose(soft, calibrate(card, raw), atol=1e-6)
    assert soft.shape == (12, 14) and ((soft >= 0) & (soft <= 1)).all()

    plain = read_card(train_tiny(*common, "--name", "plain"))
    student = read_card(train_tiny(*common, "--name", "student", "--pseudo-labels", teacher, "--unlabelled", "covid19"))
    assert student.training["n_train_pseudo"] == 8 and plain.training["n_train_pseudo"] == 0
    assert student.training["n_train"] == plain.training["n_train"] + 8
    assert student.training["n_val"] == plain.training["n_val"]
    assert student.training["pseudo_labels"] == {"teacher": "teacher", "teacher_sha256": card.sha256, "sources": ["covid19"]}
    assert "8 unlabelled adult films (covid19; no NIH film)" in student.data_source and "teacher" in student.data_source
    with pytest.raises(SystemExit, match="another train/validation split"):
        train_tiny(*common[:-1], "0.3", "--name", "other-split", "--pseudo-labels", teacher)
    with pytest.raises(SystemExit, match="another train/validation split"):
        train_tiny(*common, "--name", "other-seed", "--seed", "3", "--pseudo-labels", teacher)


def test_near_duplicates_finds_a_copied_film_across_the_split(tmp_path):
    """A film saved twice (once in train_val, once in test) is a pair at similarity ~1 counted across the split;
    different films are not paired at 0.99."""
    from PIL import Image

    from training.data import Record
    from training.near_duplicates import study

    films = []
    for i in range(4):  # smooth random films, each its own
        small = np.random.default_rng(i).integers(0, 255, (12, 12), dtype=np.uint8)
        films.append(tmp_path / f"f{i}.png")
        Image.fromarray(small).resize((96, 96), Image.BILINEAR).save(films[-1])
    copy = tmp_path / "copy.jpg"
    Image.open(films[0]).save(copy, quality=90)  # the same film, other bytes
    empty = np.zeros(3, np.float32)
    recs = [Record(p, empty, p.stem, "train_val") for p in films] + [Record(copy, empty, "copy", "test")]
    out = study(recs, thresholds=(0.99,))
    assert out["by_threshold"]["0.99"] == {"pairs": 1, "films_in_a_pair": 2, "pairs_across_train_test": 1,
                                           "test_films_with_a_train_val_pair": 1}
    assert {out["pairs"][0]["a"], out["pairs"][0]["b"]} == {"f0.png", "copy.jpg"} and out["pairs"][0]["similarity"] > 0.99
