"""The label-agreement metric: exact numbers by hand, offline load by path."""

import pytest

from hf_epr.metrics import LABEL_AGREEMENT_PATH, label_agreement, load_label_agreement

# truth:     0 1 2 3 4 5
# reference: 0 1 2 0 0 5   -> right on 0,1,2,5 (4 of 6), wrong on 3,4
# student:   0 1 0 0 4 1   -> right on 0,1,4 (3 of 6); differs from the reference on 2,4,5
EXAMPLE = dict(predictions=[0, 1, 0, 0, 4, 1], references=[0, 1, 2, 3, 4, 5], reference_predictions=[0, 1, 2, 0, 0, 5])
EXPECTED = {"accuracy": 0.5, "reference_accuracy": 4 / 6, "mismatches": 3, "mismatch_rate": 0.5,
            "mismatches_ref_correct": 2,  # examples 2 and 5
            "mismatches_ref_wrong": 1,  # example 4
            "mismatch_rate_ref_correct": 0.5, "mismatch_rate_ref_wrong": 0.5, "num_examples": 6}


def test_hand_made_example():
    assert label_agreement(**EXAMPLE) == pytest.approx(EXPECTED)


def test_loads_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = load_label_agreement()
    assert metric.compute(**EXAMPLE) == pytest.approx(EXPECTED)
    assert LABEL_AGREEMENT_PATH.endswith("label_agreement")


def test_without_ground_truth():
    out = label_agreement(predictions=[1, 2, 3], references=[-1, -1, -1], reference_predictions=[1, 0, 3])
    assert out["accuracy"] is None and out["reference_accuracy"] is None
    assert out["mismatches"] == 1 and out["mismatch_rate"] == pytest.approx(1 / 3)


def test_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        label_agreement(predictions=[1, 2], references=[1], reference_predictions=[1, 2])
