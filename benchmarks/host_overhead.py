"""Host work of a training step on the accelerator path, measured on the CPU: what a GPU step waits for when its
kernels are quick (see the README's On a GPU).

    python benchmarks/host_overhead.py           # ResNet-50, ViT-B/16 and ConvNeXt-T tensor layouts
    python benchmarks/host_overhead.py --quick   # one model, fewer rounds

Each model keeps its full configuration's layers and tensor count at tiny widths (batch 2 of 32 x 32 images), so that
compute is negligible and what is left is the per-operation cost: dispatch, autograd bookkeeping, Python. EPR runs
on the path an accelerator takes (torch operations, no host reads, every tensor up to the accelerator's limit decoded
and placed together), forced on the CPU, with its rate computed inside the forward as EPRTrainer does. Per model:
the operations that launch work in one forward and backward (aten operations less views and allocations; on a GPU
each is a kernel launch or more) and the parameter tensors, for the plain model and the EPR model; the host time of
each phase of an AdamW step (fused, as the Trainer's default), median over interleaved rounds. Writes
``benchmarks/results/host_overhead.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForImageClassification, ConvNextConfig, ResNetConfig, ViTConfig

from hf_epr import EPRConfig, EPRModel
from hf_epr.format import decoders
from hf_epr.results import markdown_table
from hf_epr.testing import take_accelerator_path, working_operations

from common import save_results

MODELS = {  # the full configurations' depths at tiny widths
    "resnet50": lambda: ResNetConfig(num_labels=10, embedding_size=8, hidden_sizes=[16, 32, 64, 128]),
    "vit-b16": lambda: ViTConfig(num_labels=10, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                 image_size=32, patch_size=8),
    "convnext-t": lambda: ConvNextConfig(num_labels=10, hidden_sizes=[8, 16, 32, 64]),
}
PHASES = ("forward", "backward", "optimizer")  # EPR's forward includes its rate


def measure(name: str, rounds: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    base = AutoModelForImageClassification.from_config(MODELS[name]()).train()
    epr = EPRModel.from_base(copy.deepcopy(base), EPRConfig(rate_lambda=0.5)).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    n = epr.num_compressed_parameters
    models = {"plain": base, "EPR": epr}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for k, m in models.items()}

    def loss(kind: str) -> torch.Tensor:
        """The step's loss; EPR's with its rate computed inside the forward, as EPRTrainer asks for it."""
        if kind == "plain":
            return base(pixel_values=x, labels=y).loss
        out, bits = epr(pixel_values=x, labels=y, return_bits=True)
        return out.loss + 0.5 * bits / n

    def step(kind: str) -> tuple[float, ...]:
        t = [time.perf_counter()]
        value = loss(kind)
        t.append(time.perf_counter())
        value.backward()
        t.append(time.perf_counter())
        optimizers[kind].step()
        optimizers[kind].zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        return tuple(1000 * (b - a) for a, b in zip(t, t[1:]))

    def forward_backward(kind: str) -> None:
        loss(kind).backward()
        models[kind].zero_grad(set_to_none=True)

    for _ in range(20):  # warm up (the rate's first steps build its layout and buffers)
        for kind in models:
            step(kind)
    times: dict[str, list[tuple[float, ...]]] = {kind: [] for kind in models}
    for _ in range(rounds):  # interleaved, so that a slow spell of the machine hits both
        for kind in models:
            times[kind] += [step(kind) for _ in range(steps)]
    rows = []
    for kind, model in models.items():
        phases = [statistics.median(t[i] for t in times[kind]) for i in range(len(PHASES))]
        rows.append({"model": name, "step": kind, "parameter_tensors": len(list(model.parameters())),
                     "working_operations": working_operations(lambda: forward_backward(kind)),
                     **{f"{p}_ms": round(v, 3) for p, v in zip(PHASES, phases)},
                     "step_ms": round(sum(phases), 3)})
    plain, ours = rows
    ours["extra_operations"] = ours["working_operations"] - plain["working_operations"]
    ours["step_over_plain"] = round(ours["step_ms"] / plain["step_ms"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    take_accelerator_path()
    decoders.SMALL_TENSOR = decoders.SMALL_TENSOR_ACCELERATOR  # and the accelerator's batching
    names, rounds, steps = (["resnet50"], 2, 3) if args.quick else (list(MODELS), 5, 10)
    rows = [row for name in names for row in measure(name, rounds, steps)]
    text = ("Host work per training step on the accelerator path (forced on the CPU, 1 thread; tiny widths, batch 2):"
            " operations that launch work in one forward and backward, parameter tensors, and the host time of each"
            f" phase of a fused-AdamW step (median of {rounds} x {steps} interleaved steps).\n\n"
            + markdown_table(rows) + "\n")
    save_results("host_overhead", text, {"rows": rows, "rounds": rounds, "steps": steps}, quick=args.quick)


if __name__ == "__main__":
    main()
