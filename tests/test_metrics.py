"""The label-agreement metric: exact numbers by hand, offline load by path, no ground truth, bad lengths."""

import ast
from pathlib import Path

import pytest

from hf_epr.metrics import LABEL_AGREEMENT_PATH, label_agreement, load_label_agreement

# truth:     0 1 2 3 4 5
# reference: 0 1 2 0 0 5   -> right on 0,1,2,5 (4 of 6), wrong on 3,4
# student:   0 1 0 0 4 1   -> right on 0,1,4 (3 of 6); differs from the reference on 2,4,5 (3 of 6)
# among reference-right {0,1,2,5}: mismatches on 2,5 -> 2 of 4; among reference-wrong {3,4}: on 4 -> 1 of 2
EXAMPLE = dict(predictions=[0, 1, 0, 0, 4, 1], references=[0, 1, 2, 3, 4, 5], reference_predictions=[0, 1, 2, 0, 0, 5])
EXPECTED = {"accuracy": 0.5, "reference_accuracy": 4 / 6, "mismatches": 3, "mismatch_rate": 0.5,
            "mismatches_ref_correct": 2, "mismatches_ref_wrong": 1,
            "mismatch_rate_ref_correct": 0.5, "mismatch_rate_ref_wrong": 0.5, "num_examples": 6}

# no ground truth: only the mismatch fields are defined; student differs from the reference on example 1 (1 of 3)
UNLABELLED = dict(predictions=[1, 2, 3], references=[-1, -1, -1], reference_predictions=[1, 0, 3])
UNLABELLED_EXPECTED = {"accuracy": None, "reference_accuracy": None, "mismatches": 1, "mismatch_rate": 1 / 3,
                       "mismatches_ref_correct": 0, "mismatches_ref_wrong": 0, "mismatch_rate_ref_correct": None,
                       "mismatch_rate_ref_wrong": None, "num_examples": 3}


@pytest.fixture
def metric(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return load_label_agreement()


def test_hand_made_example():
    assert label_agreement(**EXAMPLE) == pytest.approx(EXPECTED)


def test_loads_by_path_offline(metric):
    assert Path(LABEL_AGREEMENT_PATH).is_absolute() and LABEL_AGREEMENT_PATH.endswith("label_agreement")
    assert "2012.01604" in metric.citation and metric.description and metric.inputs_description
    assert metric.compute(**EXAMPLE) == pytest.approx(EXPECTED)


def test_without_ground_truth(metric):
    assert label_agreement(**UNLABELLED) == pytest.approx(UNLABELLED_EXPECTED)
    assert metric.compute(**UNLABELLED) == pytest.approx(UNLABELLED_EXPECTED)  # None, not NaN, through evaluate too


def test_length_mismatch(metric):
    with pytest.raises(ValueError, match="same length"):
        label_agreement(predictions=[1, 2], references=[1], reference_predictions=[1, 2])
    with pytest.raises(ValueError):
        metric.compute(predictions=[1, 2], references=[1], reference_predictions=[1, 2])


def test_script_is_self_contained():
    """evaluate copies the script alone into its cache: it must not import hf_epr (or anything relative)."""
    tree = ast.parse((Path(LABEL_AGREEMENT_PATH) / "label_agreement.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("hf_epr")
        elif isinstance(node, ast.Import):
            assert not any(alias.name.startswith("hf_epr") for alias in node.names)
