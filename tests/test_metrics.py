"""Bootstrap by patient, and paired comparisons of two models on the same images."""

from __future__ import annotations

import numpy as np

from training.metrics import bootstrap_auroc, paired_bootstrap_difference, resample_indices


def test_patient_resampling_takes_whole_patients():
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    idx = resample_indices(6, groups, np.random.default_rng(1))
    for patient in set(groups[idx]):
        rows = np.nonzero(groups == patient)[0]
        taken = idx[np.isin(idx, rows)]
        assert len(taken) % len(rows) == 0 and set(taken) == set(rows)


def test_copies_of_one_patients_film_do_not_narrow_the_patient_interval():
    """Three copies of each film as the same patient: resampling images pretends there is three times the
    evidence (a narrower interval); resampling patients gives the interval of the films themselves."""
    rng = np.random.default_rng(0)
    y = (rng.random((150, 1)) < 0.4).astype(float)
    p = y * 0.3 + rng.random((150, 1))
    Y, P, groups = np.repeat(y, 3, 0), np.repeat(p, 3, 0), np.repeat(np.arange(150), 3)
    (single,), _ = bootstrap_auroc(y, p, n_boot=300)
    (images,), _ = bootstrap_auroc(Y, P, n_boot=300)
    (patients,), _ = bootstrap_auroc(Y, P, n_boot=300, groups=groups)
    width = {k: v[1] - v[0] for k, v in {"single": single, "images": images, "patients": patients}.items()}
    assert width["images"] < 0.75 * width["patients"]
    assert abs(width["patients"] - width["single"]) < 0.25 * width["single"]


def test_paired_difference_is_zero_for_the_same_model_and_positive_for_a_better_one():
    rng = np.random.default_rng(0)
    Y = (rng.random((300, 3)) < 0.3).astype(float)
    weak = rng.random((300, 3))
    strong = Y * 0.8 + rng.random((300, 3)) * 0.5
    groups = np.arange(300) // 2
    same = paired_bootstrap_difference(Y, weak, weak, groups, n_boot=200)
    assert same["difference"] == 0 and same["ci95"] == (0.0, 0.0)
    better = paired_bootstrap_difference(Y, strong, weak, groups, n_boot=200)
    assert better["ci95"][0] > 0 and better["unit"] == "patient" and len(better["per_label"]) == 3
