"""Training with the sampled uniform-noise rate (what EPRTrainer uses) against its deterministic expectation.

    python benchmarks/rate_relaxation.py            # LeNet-300-100 and LeNet5 at lambda 4, 2,000 steps each
    python benchmarks/rate_relaxation.py --quick    # 100 steps

Both estimators have the same value and the same mean gradient (tests/test_entropy.py); they differ in the
gradient's noise. A third run takes the sampled rate's sums (the density's and the step sizes' gradients) from an
eighth of the latents, as the rate does above ``SAMPLED_LATENTS`` (4 M) latents: its effect on the final size. Same reference, seed, lambda and schedule as ``paper_mnist.py``'s fixed-lambda runs (label
preservation auto). Writes ``benchmarks/results/rate_relaxation.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from datasets import Dataset

from hf_epr import EPRConfig, EPRModel, EPRTrainer, EPRTrainingArguments
from hf_epr.data import load_mnist, mnist_pixel_values
from hf_epr import entropy
from hf_epr.entropy import grid_rate
from hf_epr.format import WEIGHTS_NAME
from hf_epr.metrics import label_agreement
from hf_epr.results import markdown_table

from common import save_results
from paper_mnist import common_args, predict, train_reference


def expected_noise_bits(self) -> torch.Tensor:
    """EPRModel.bits with the deterministic expectation of the noise relaxation in training."""
    smooth = self.training
    return grid_rate(self.density, self.latent_tensors(), resolution=4 if smooth else 1, smooth=smooth)


SAMPLED, SUBSET, EXPECTED = ("sampled (training default)", "sampled, sums from 1/8 of the latents",
                             "expected (deterministic)")


def run(name: str, estimator: str, reference, data, x, y, ref_preds, steps: int, lam: float) -> dict:
    torch.manual_seed(0)
    model = EPRModel.from_base(copy.deepcopy(reference), EPRConfig(rate_lambda=lam, init_step_ratio=1 / 64))
    if estimator == EXPECTED:
        model.bits = expected_noise_bits.__get__(model)
    default_sample = entropy.SAMPLED_LATENTS
    if estimator == SUBSET:  # the sums from every 8th block of latents, as the rate does for models over 4 M latents
        entropy.SAMPLED_LATENTS = -(-model.num_compressed_parameters // 8)
    with tempfile.TemporaryDirectory() as tmp:
        args = EPRTrainingArguments(label_preservation="auto", kd_affine=0.0, kd_mixup=0.0, decoder_learning_rate=0.02,
                                    **common_args(tmp, steps))
        try:
            EPRTrainer(model=model, reference_model=reference, train_dataset=data, args=args).train()
        finally:
            entropy.SAMPLED_LATENTS = default_sample
        model.save_pretrained(tmp)
        nbytes = os.path.getsize(os.path.join(tmp, WEIGHTS_NAME))
    m = label_agreement(predict(model, x), y, ref_preds)
    return {"model": name, "rate estimator": estimator, "lambda": lam, "steps": steps, "bytes": nbytes,
            "test_error": 1 - m["accuracy"], "reference_error": float((ref_preds != y).mean()),
            "mismatches": m["mismatches"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    quick = parser.parse_args().quick
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    data = Dataset.from_dict({"pixel_values": mnist_pixel_values(xtr).numpy(), "labels": ytr}).with_format("torch")
    x = mnist_pixel_values(xte)
    rows = []
    for name in ("lenet300-100", "lenet5"):
        reference = train_reference(name, data, 1 if quick else 8)
        ref_preds = predict(reference, x)
        for estimator in (SAMPLED, SUBSET, EXPECTED):
            rows.append(run(name, estimator, reference, data, x, yte, ref_preds, 100 if quick else 2000, 4.0))
            print(rows[-1], flush=True)
    text = ("## Rate relaxation: sampled noise vs its expectation (lambda 4, label preservation auto)\n\n"
            + markdown_table(rows) + "\n")
    save_results("rate_relaxation", text, {"rows": rows}, quick=quick)


if __name__ == "__main__":
    main()
