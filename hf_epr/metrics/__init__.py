"""Our own ``evaluate`` modules, loadable offline by path."""

from pathlib import Path

from .label_agreement.label_agreement import label_agreement

LABEL_AGREEMENT_PATH = str(Path(__file__).parent / "label_agreement")


def load_label_agreement():
    """The label-agreement metric through ``evaluate.load`` (a local path: no network)."""
    import evaluate

    return evaluate.load(LABEL_AGREEMENT_PATH)


__all__ = ["LABEL_AGREEMENT_PATH", "label_agreement", "load_label_agreement"]
