"""Label agreement between a compressed model and its reference (an ``evaluate`` metric, loadable by path).

Self-contained (``evaluate`` copies this file into its cache): it imports nothing from hf_epr. The plain function
``label_agreement`` needs numpy only (hf_epr's trainer uses it); the ``evaluate`` metric class is defined where
``datasets`` and ``evaluate`` are installed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

try:
    import datasets
    import evaluate
except ImportError:  # the plain function still works
    datasets = evaluate = None

_DESCRIPTION = """Accuracy of a compressed model and of its reference (uncompressed) model, and how often their
predicted labels differ: overall, where the reference is right, and where it is wrong (Joseph et al.).
Ground-truth labels may be -1 (any negative label: unknown); accuracies then cover only the labelled examples
and are None when no example has a label."""
_CITATION = """@article{joseph2020reliable,
  title={Reliable Model Compression via Label-Preservation-Aware Loss Functions},
  author={Joseph, Vinu and Siddiqui, Shoaib Ahmed and Bhaskara, Aditya and Gopalakrishnan, Ganesh and
          Muralidharan, Saurav and Garland, Michael and Ahmed, Sheraz and Dengel, Andreas},
  journal={arXiv preprint arXiv:2012.01604}, year={2020}}"""
_KWARGS = """Args:
    predictions: labels predicted by the compressed model (int).
    references: ground-truth labels (int, negative such as -1 = unknown).
    reference_predictions: labels predicted by the reference model (int).
Returns: accuracy, reference_accuracy (None without labels), mismatches, mismatch_rate, mismatches_ref_correct,
    mismatches_ref_wrong, mismatch_rate_ref_correct, mismatch_rate_ref_wrong (None where undefined), num_examples."""


def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def label_agreement(predictions: ArrayLike, references: ArrayLike,
                    reference_predictions: ArrayLike) -> dict[str, float | int | None]:
    """The metric's numbers as a plain dict; rates with an empty denominator are None (never NaN)."""
    pred, ref_label, teacher = (np.asarray(a, np.int64).reshape(-1)
                                for a in (predictions, references, reference_predictions))
    if not len(pred) == len(ref_label) == len(teacher):
        raise ValueError(f"predictions ({len(pred)}), references ({len(ref_label)}) and reference_predictions "
                         f"({len(teacher)}) must have the same length")
    labelled = ref_label >= 0
    mismatch = pred != teacher
    teacher_right = labelled & (teacher == ref_label)
    teacher_wrong = labelled & (teacher != ref_label)
    n_lab = int(labelled.sum())
    return {
        "accuracy": _rate(int((labelled & (pred == ref_label)).sum()), n_lab),
        "reference_accuracy": _rate(int(teacher_right.sum()), n_lab),
        "mismatches": int(mismatch.sum()),
        "mismatch_rate": _rate(int(mismatch.sum()), len(pred)),
        "mismatches_ref_correct": int((mismatch & teacher_right).sum()),
        "mismatches_ref_wrong": int((mismatch & teacher_wrong).sum()),
        "mismatch_rate_ref_correct": _rate(int((mismatch & teacher_right).sum()), int(teacher_right.sum())),
        "mismatch_rate_ref_wrong": _rate(int((mismatch & teacher_wrong).sum()), int(teacher_wrong.sum())),
        "num_examples": int(len(pred)),
    }


if evaluate is not None:
    @evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
    class LabelAgreement(evaluate.Metric):
        """Label agreement between a compressed model and its reference model."""

        def _info(self) -> evaluate.MetricInfo:
            return evaluate.MetricInfo(
                description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS,
                reference_urls=["https://arxiv.org/abs/2012.01604"],
                features=datasets.Features({"predictions": datasets.Value("int64"),
                                            "references": datasets.Value("int64"),
                                            "reference_predictions": datasets.Value("int64")}))

        def _compute(self, predictions, references, reference_predictions) -> dict[str, float | int | None]:
            return label_agreement(predictions, references, reference_predictions)
