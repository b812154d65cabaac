"""The compress recipe end to end (tiny budget), and label preservation's effect on real MNIST (slow)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from hf_epr import EPRModel
from hf_epr.format import WEIGHTS_NAME

RECIPE = Path(__file__).parents[1] / "recipes" / "compress.py"


def run_recipe(args):
    spec = importlib.util.spec_from_file_location("compress_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the recipe's annotations through sys.modules
    spec.loader.exec_module(module)
    return module.main(args)


def test_recipe_tiny_budget(tmp_path, capsys):
    run_recipe(["--output_dir", str(tmp_path), "--max_steps", "15", "--reference_epochs", "0.2",
                      "--max_train_samples", "640", "--max_eval_samples", "300", "--disable_tqdm", "True",
                      "--logging_steps", "5"])
    printed = capsys.readouterr().out
    assert "| run | fp32 KB | compressed KB | ratio |" in printed
    assert (tmp_path / "rate_accuracy.png").stat().st_size > 1000
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["label_preservation"] for r in rows] == ["auto", "off"]
    assert rows[0]["bytes"] == (tmp_path / WEIGHTS_NAME).stat().st_size
    assert all(r["mismatches"] is not None and 0 <= r["accuracy"] <= 1 for r in rows)
    EPRModel.from_pretrained(tmp_path)  # the repo loads back


@pytest.mark.slow
def test_label_preservation_reduces_mismatches(tmp_path):
    rows = run_recipe(["--output_dir", str(tmp_path), "--max_steps", "400", "--reference_epochs", "3",
                       "--max_eval_samples", "5000", "--disable_tqdm", "True", "--logging_steps", "50"])["rows"]
    with_lp, without = rows
    assert with_lp["label_preservation"] == "auto" and without["label_preservation"] == "off"
    assert with_lp["mismatches"] <= without["mismatches"]
