"""Training step time: EPRTrainer vs a plain transformers Trainer on the same model, data and batch.

    python benchmarks/step_time.py            # LeNet-300-100, LeNet5 and a small ResNet; 300 steps, batch 64
    python benchmarks/step_time.py --quick    # 40 steps

The runs alternate in one process (plain, EPR without label preservation, EPR with the default label preservation
— 'fixed' with the teacher terms also on a warped and mixed copy of each batch — and EPR without label preservation
on torch operations alone, as without the compiled training loops; repeated) so machine noise hits all of them;
the table reports the median of the repeats and the ratios. The data are in-memory tensors (an Arrow-backed
dataset's row formatting would add the same constant to every trainer and hide the ratio). A second table splits
the EPR overhead: the rate term alone (``bits()`` forward and backward) per step, against the plain step; a third
measures the rate term's throughput on larger models (a 5 M-parameter ResNet and ResNet-50), with its sums from a
strided subset of the latents (the default above 4 M latents) and from all of them, with and without the compiled
training loops, and the spread of its value and gradients over the calls.
Writes ``benchmarks/results/step_time.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from transformers import AutoModelForImageClassification, ResNetConfig, Trainer, TrainingArguments

from hf_epr import EPRConfig, EPRModel, EPRTrainer, EPRTrainingArguments, entropy
from hf_epr.data import TensorRows, load_mnist, mnist_pixel_values
from hf_epr.format import decoders
from hf_epr.results import markdown_table

from common import MNIST_MODELS, build_mnist_model, save_results



def seconds_per_step(kind: str, base, data, steps: int, out: str) -> float:
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=64, report_to="none",
                  save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, use_cpu=True, seed=0,
                  dataloader_num_workers=0)
    model = copy.deepcopy(base)
    if kind == "plain":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data)
        return trainer.train().metrics["train_runtime"] / steps
    lp = EPRTrainingArguments.label_preservation if kind == DEFAULT else "off"  # the package default, or off
    epr = EPRModel.from_base(model, EPRConfig(rate_lambda=0.5, init_step_ratio=1 / 64))
    trainer = EPRTrainer(model=epr, reference_model=base if lp != "off" else None, train_dataset=data,
                         args=EPRTrainingArguments(label_preservation=lp, **common))
    with training_loops(compiled=kind != UNCOMPILED):
        return trainer.train().metrics["train_runtime"] / steps


@contextlib.contextmanager
def training_loops(compiled: bool):
    """hf_epr's compiled training loops as installed, or ruled out as ``HF_EPR_NATIVE=0`` (or an install without a C
    compiler) rules them out, for the duration."""
    installed = decoders._native_train
    decoders._native_train = installed if compiled else None
    try:
        yield
    finally:
        decoders._native_train = installed


OFF, DEFAULT = "epr (label preservation off)", "epr (default label preservation)"
UNCOMPILED = "epr (label preservation off), torch operations only"
THROUGHPUT_MODELS = {
    "resnet-5M": lambda: ResNetConfig(num_labels=10, layer_type="basic", embedding_size=64,
                                      hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1]),
    "resnet50-25M": lambda: ResNetConfig(num_labels=1000),
}


def rate_term_seconds(base, calls: int) -> tuple[float, float, float]:
    """Median time of the rate term alone (``bits()`` forward and backward, as in a training step), and the relative
    standard deviation over the calls of its value and of its gradient to the step sizes."""
    epr = EPRModel.from_base(copy.deepcopy(base), EPRConfig(rate_lambda=0.5, init_step_ratio=1 / 64)).train()
    times, values, grads = [], [], []
    for _ in range(calls):
        t = time.perf_counter()
        bits = epr.bits()
        (bits / epr.num_compressed_parameters).backward()
        times.append(time.perf_counter() - t)
        values.append(float(bits.detach()))
        grads.append(torch.cat([p.grad.reshape(-1) for p in epr.parameter_groups()["decoders"]]))
        epr.zero_grad(set_to_none=True)  # as the Trainer does between steps
    g = torch.stack(grads)
    return (statistics.median(times), statistics.stdev(values) / statistics.mean(values),
            float((g - g.mean(0)).pow(2).sum(1).mean().sqrt() / g.mean(0).norm()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, repeats = (40, 1) if args.quick else (300, 3)
    x, y = load_mnist("train")
    data = TensorRows({"pixel_values": mnist_pixel_values(x), "labels": torch.from_numpy(y)})
    kinds = ["plain", OFF, DEFAULT] + ([UNCOMPILED] if decoders._native_train is not None else [])
    rows, parts = [], []
    for variant in MNIST_MODELS:
        torch.manual_seed(0)
        base = build_mnist_model(variant).eval()
        times = {k: [] for k in kinds}
        for _ in range(repeats):
            for k in kinds:
                times[k].append(seconds_per_step(k, base, data, steps, "/tmp/hf_epr_step_time"))
        plain = statistics.median(times["plain"])
        for k in kinds:
            t = statistics.median(times[k])
            rows.append({"model": variant, "method": k, "ms_per_step": round(1000 * t, 2),
                         "ratio_vs_plain": round(t / plain, 2)})
        rate = rate_term_seconds(base, 20 if args.quick else 100)[0]
        parts.append({"model": variant, "parameters": sum(p.numel() for p in base.parameters()),
                      "plain_ms": round(1000 * plain, 2), "rate_term_ms": round(1000 * rate, 2),
                      "rate_over_plain": round(rate / plain, 2)})
    throughput = []
    for name, config in THROUGHPUT_MODELS.items():
        torch.manual_seed(0)
        base = AutoModelForImageClassification.from_config(config()).eval()
        n = EPRModel.from_base(copy.deepcopy(base)).num_compressed_parameters
        default = entropy.SAMPLED_LATENTS
        # sums from a strided subset above SAMPLED_LATENTS (the default), from all; and on torch operations alone
        runs = [(default, True), (n, True)] + ([(default, False)] if decoders._native_train is not None else [])
        for sample, compiled in runs:
            entropy.SAMPLED_LATENTS = sample
            try:
                with training_loops(compiled):
                    used = decoders._native_train is not None  # not where they were not built
                    rate, value_spread, grad_spread = rate_term_seconds(base, 4 if args.quick else 12)
            finally:
                entropy.SAMPLED_LATENTS = default
            throughput.append({"model": name, "latents_M": round(n / 1e6, 2),
                               "sums_from": f"1/{-(-n // sample)}" if sample < n else "all",
                               "compiled_loops": used,
                               "rate_term_ms": round(1000 * rate, 1), "M_latents_per_s": round(n / rate / 1e6, 1),
                               "value_rel_std": float(f"{value_spread:.2g}"),
                               "step_size_grad_rel_std": float(f"{grad_spread:.2g}")})
    text = (f"Batch 64, {steps} steps, median of {repeats}; torch threads: {torch.get_num_threads()}\n\n"
            + markdown_table(rows, {"model": "model", "trainer": "method", "ms / step": "ms_per_step",
                                    "ratio vs plain Trainer": "ratio_vs_plain"}) + "\n\n"
            + markdown_table(parts, {"model": "model", "parameters": "parameters", "plain step ms": "plain_ms",
                                     "rate term ms (bits() fwd+bwd)": "rate_term_ms",
                                     "rate / plain step": "rate_over_plain"})
            + "\n\nRate term throughput (bits() forward and backward, training mode). Above 4 M latents the sums that "
              "give the density's and the step sizes' gradients come from a strided subset of the latents; the "
              "spreads over the calls (noise draws, and the subset) are shown beside those of sums from all "
              "latents.\n\n" + markdown_table(throughput))
    save_results("step_time", text, {"rows": rows, "rate_term": parts, "throughput": throughput}, quick=args.quick)


if __name__ == "__main__":
    main()
