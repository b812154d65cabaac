"""What the benchmark scripts share: the MNIST models they compare on, and where their results go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoModelForImageClassification, ResNetConfig

from hf_epr.models import LeNetConfig, LeNetForImageClassification
from hf_epr.results import write_results

RESULTS = Path(__file__).parent / "results"
MNIST_MODELS = ("lenet300-100", "lenet5", "resnet")


def build_mnist_model(name: str):
    """LeNet-300-100, LeNet5-Caffe, or a small transformers ResNet for 28 x 28 grayscale images (10 labels)."""
    if name == "resnet":
        return AutoModelForImageClassification.from_config(ResNetConfig(
            num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic",
            num_labels=10))
    return LeNetForImageClassification(LeNetConfig(variant=name))


def save_results(name: str, text: str, data: dict[str, Any], quick: bool = False) -> None:
    """Print the tables and write ``benchmarks/results/<name>[_quick].{md,json}``."""
    print(text)
    write_results(RESULTS, f"{name}_quick" if quick else name, text, data)
