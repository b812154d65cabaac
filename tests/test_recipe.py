"""The compress recipe end to end (tiny budget), a user's own model and imagefolder (splits, labels matched by
name, a new head, one-line errors), and label preservation's effect on real MNIST (slow)."""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_epr import EPRModel
from hf_epr.format import WEIGHTS_NAME

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "compress.py"
TINY = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "True", "--logging_steps", "1",
        "--compare_without_label_preservation", "False"]


@functools.cache
def recipe():
    """The recipe as a module (loaded once)."""
    spec = importlib.util.spec_from_file_location("compress_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the recipe's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_recipe(args):
    return recipe().main(args)


def run_cli(args, cwd) -> subprocess.CompletedProcess:
    """``python recipes/compress.py args`` in a fresh process, offline, with this checkout's package first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(RECIPE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def imagefolder(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """PNG files root/<split>/<class>/i.png (a split named "" writes root/<class>/i.png): class "a" dark, every
    other class bright, 32x32 RGB."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = 40 if name == "a" else 210
            for i in range(count):
                pixels = np.clip(base + rng.integers(-30, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def user_model(folder: Path, labels: list[str], always: int | None = None) -> Path:
    """A tiny ResNet classifier with id2label ``labels`` and a PIL image processor, saved to ``folder``; with
    ``always``, its head predicts that id for every image."""
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    model = ResNetForImageClassification(config)
    if always is not None:
        with torch.no_grad():
            head = model.classifier[1]
            head.weight.zero_()
            head.bias.fill_(-5.0)
            head.bias[always] = 5.0
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def base_labels(folder: Path) -> dict[str, str]:
    """id2label of the base model inside a compressed repo."""
    return json.loads((folder / "config.json").read_text())["base_config"]["id2label"]


def test_recipe_tiny_budget(tmp_path, capsys):
    run_recipe(["--output_dir", str(tmp_path), "--max_steps", "15", "--reference_epochs", "0.2",
                      "--max_train_samples", "640", "--max_eval_samples", "300", "--disable_tqdm", "True",
                      "--logging_steps", "5"])
    printed = capsys.readouterr().out
    assert "| run | fp32 KB | compressed KB | ratio |" in printed
    assert (tmp_path / "rate_accuracy.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["label_preservation"] for r in rows] == ["fixed", "off"]
    assert rows[0]["bytes"] == (tmp_path / WEIGHTS_NAME).stat().st_size
    assert all(r["mismatches"] is not None and 0 <= r["accuracy"] <= 1 for r in rows)
    digits = {str(i): str(i) for i in range(10)}  # the reference's labels are the dataset's ClassLabel names
    assert base_labels(tmp_path) == digits
    assert json.loads((tmp_path / "reference" / "config.json").read_text())["id2label"] == digits
    EPRModel.from_pretrained(tmp_path)  # the repo loads back


def test_the_default_run_asks_for_a_size():
    """The embedded default run is in target-size mode; a lambda, a target or the user's own model or data leave
    the size to the user."""
    target = lambda *argv: recipe().parse_args(list(argv))[2].target_ratio  # noqa: E731
    assert target() == recipe().DEFAULT_RUN_TARGET_RATIO
    assert target("--max_steps", "10") == recipe().DEFAULT_RUN_TARGET_RATIO
    assert target("--rate_lambda", "1.5") is None
    assert target("--target_ratio=50") == 50
    assert target("--dataset_name", "somewhere") is None
    assert recipe().parse_args(["--target_bytes", "9000"])[2].target_ratio is None


def test_default_output_dir_is_named_after_the_model(tmp_path):
    parse = lambda *argv: recipe().parse_args(list(argv))[2].output_dir  # noqa: E731
    assert parse() == os.path.join("outputs", "lenet5-mnist-epr")
    assert parse("--model_name_or_path", str(tmp_path / "my-resnet") + "/") == os.path.join("outputs", "my-resnet-epr")
    assert parse("--model_name_or_path", "org/vit-tiny") == os.path.join("outputs", "vit-tiny-epr")
    assert parse("--dataset_name", str(tmp_path / "flowers")) == os.path.join("outputs", "lenet5-flowers-epr")
    assert parse("--model_name_or_path", "org/vit-tiny", "--output_dir", "elsewhere") == "elsewhere"


def test_imagefolder_splits(tmp_path):
    compress = recipe()
    flat = imagefolder(tmp_path / "flat", {"": {"a": 10, "b": 10}})
    args = compress.DataArguments(dataset_name=str(flat), train_val_split=0.25)
    train, held_out = compress.load_splits(args, seed=0)
    assert (len(train), len(held_out)) == (15, 5)
    assert held_out["label"] == compress.load_splits(args, seed=0)[1]["label"]  # seeded
    assert train.features["label"].names == ["a", "b"]
    with_validation = imagefolder(tmp_path / "split", {"train": {"a": 4, "b": 4}, "validation": {"a": 1, "b": 2}})
    train, held_out = compress.load_splits(compress.DataArguments(dataset_name=str(with_validation)))
    assert (len(train), len(held_out)) == (8, 3)  # the existing split, nothing held out
    with pytest.raises(compress.RecipeError, match="--eval_split 'dev' is not a split"):
        compress.load_splits(compress.DataArguments(dataset_name=str(with_validation), eval_split="dev"))
    with pytest.raises(compress.RecipeError, match="--train_val_split must be between 0 and 1"):
        compress.load_splits(compress.DataArguments(dataset_name=str(flat), train_val_split=0))


def test_same_labels_in_another_order_are_translated_by_name(tmp_path, monkeypatch):
    """The model says id 0 = "b" for every image; the imagefolder's ClassLabel says 0 = "a". Its test split holds
    3 "b" images and 1 "a" image: translated by name the reference is right 3 times in 4 (untranslated, once)."""
    data = imagefolder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "test": {"a": 1, "b": 3}})
    model = user_model(tmp_path / "user-model", ["b", "a"], always=0)
    monkeypatch.chdir(tmp_path)
    rows = run_recipe(["--model_name_or_path", str(model), "--dataset_name", str(data), *TINY])["rows"]
    assert rows[0]["reference_accuracy"] == pytest.approx(0.75)
    out = tmp_path / "outputs" / "user-model-epr"  # the default output folder, named after the model
    assert base_labels(out) == {"0": "b", "1": "a"}  # the model's own labels, head unchanged
    assert not (out / "reference").exists()  # nothing to retrain


def test_label_count_mismatch_needs_the_flag(tmp_path):
    data = imagefolder(tmp_path / "data", {"": {"a": 6, "b": 6}})
    model = user_model(tmp_path / "three", ["x", "y", "z"])
    argv = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"),
            *TINY]
    proc = run_cli(argv, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]  # after the log lines of what was done (the held-out split)
    assert error.startswith("compress.py: error: the model has 3 labels (x, y, z) but the dataset 2 labels (a, b)")
    assert "--ignore_mismatched_sizes True" in error
    rows = run_recipe([*argv, "--ignore_mismatched_sizes", "True", "--reference_epochs", "1"])["rows"]
    assert len(rows) == 1 and rows[0]["accuracy"] is not None
    assert base_labels(tmp_path / "out") == {"0": "a", "1": "b"}
    reference = json.loads((tmp_path / "out" / "reference" / "config.json").read_text())
    assert reference["id2label"] == {"0": "a", "1": "b"}  # the fine-tuned reference, with its new 2-label head


def test_unlabeled_images_with_a_model(tmp_path, capsys):
    data = imagefolder(tmp_path / "data", {"": {"a": 6, "b": 6}})
    model = user_model(tmp_path / "model", ["a", "b"])
    rows = run_recipe(["--model_name_or_path", str(model), "--dataset_name", str(data), "--label_column", "",
                       "--output_dir", str(tmp_path / "out"), *TINY])["rows"]
    assert rows[0]["accuracy"] is None and rows[0]["mismatches"] is not None  # agreement with the model only
    assert "| EPR, label preservation fixed |" in capsys.readouterr().out


def test_missing_local_path_is_one_line(tmp_path):
    proc = run_cli(["--model_name_or_path", str(tmp_path / "no-such-model")], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"compress.py: error: --model_name_or_path {str(tmp_path / 'no-such-model')!r}: no such local folder"]


@pytest.mark.parametrize("argv, message", [
    (["--dataset_name", "someone/no-such-dataset"], "--dataset_name 'someone/no-such-dataset' is neither a local "
                                                    "folder nor a reachable Hub id"),
    (["--model_name_or_path", "someone/no-such-model"], "--model_name_or_path 'someone/no-such-model' is neither a "
                                                        "local folder nor a reachable Hub id"),
    (["--label_column", "class"], "--label_column 'class' is not a column"),
    (["--train_split", "training"], "--train_split 'training' is not a split"),
])
def test_user_errors(tmp_path, argv, message):
    data = imagefolder(tmp_path / "data", {"": {"a": 3, "b": 3}})
    with pytest.raises(recipe().RecipeError, match=message):
        run_recipe(["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), *TINY, *argv])


@pytest.mark.slow
def test_label_preservation_reduces_mismatches(tmp_path):
    rows = run_recipe(["--output_dir", str(tmp_path), "--max_steps", "400", "--reference_epochs", "3", "--rate_lambda", "0.5",
                       "--max_eval_samples", "5000", "--disable_tqdm", "True", "--logging_steps", "50"])["rows"]
    with_lp, without = rows
    assert with_lp["label_preservation"] == "fixed" and without["label_preservation"] == "off"
    assert with_lp["mismatches"] <= without["mismatches"]
