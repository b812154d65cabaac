"""What the benchmark scripts share: the MNIST models they compare on, timed loads in fresh processes, and where
their results go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

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


def run_fresh(code: str, *argv: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter with ``argv`` (and ``env`` added to this one's); the JSON object its last
    line of output prints."""
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of_interleaved(load: Callable[[str, str], dict], loads: dict[str, tuple[str, str]],
                        repeats: int) -> dict[str, dict]:
    """Per name, the run with the least ``load_s`` of ``repeats`` rounds of ``load(kind, folder)`` for each
    (kind, folder) of ``loads``, the rounds interleaved: a slow spell of a shared machine slows every kind alike
    instead of one."""
    runs: dict[str, list[dict]] = {name: [] for name in loads}
    for _ in range(repeats):
        for name, (kind, folder) in loads.items():
            runs[name].append(load(kind, folder))
    return {name: min(r, key=lambda run: run["load_s"]) for name, r in runs.items()}


def save_results(name: str, text: str, data: dict[str, Any], quick: bool = False) -> None:
    """Print the tables and write ``benchmarks/results/<name>[_quick].{md,json}``."""
    print(text)
    write_results(RESULTS, f"{name}_quick" if quick else name, text, data)
