"""EPRTrainer on tiny models: the rate falls, sizes are real, label preservation adapts, resume is exact."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_epr import EPRConfig, EPRModel
from hf_epr.data import load_mnist, mnist_pixel_values
from hf_epr.loader import WEIGHTS_NAME
from hf_epr.models import LeNetConfig, LeNetForImageClassification
from hf_epr.trainer import EPRTrainer, EPRTrainingArguments, EPRTrainingError


def mnist_subset(n: int, split: str = "train", with_labels: bool = True) -> Dataset:
    x, y = load_mnist(split)
    data = {"pixel_values": mnist_pixel_values(x[:n]).numpy()}
    if with_labels:
        data["labels"] = y[:n]
    return Dataset.from_dict(data).with_format("torch")


def reference(variant: str = "lenet300-100", steps: int = 150) -> LeNetForImageClassification:
    torch.manual_seed(0)
    model = LeNetForImageClassification(LeNetConfig(variant=variant))
    x, y = load_mnist("train")
    xs, ys = mnist_pixel_values(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (64,), generator=g)
        opt.zero_grad()
        model(pixel_values=xs[idx], labels=ys[idx]).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def teacher():
    return reference()


def make_trainer(teacher, tmp_path, lam=1.0, steps=60, lp="auto", train=None, **kw):
    model = EPRModel.from_base(copy.deepcopy(teacher), EPRConfig(rate_lambda=lam, init_step_ratio=1 / 64))
    kw = {"save_strategy": "no", **kw}
    args = EPRTrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=64,
                                learning_rate=1e-3, logging_steps=10, report_to=[], label_preservation=lp, seed=0,
                                disable_tqdm=True, softadapt_interval=5, use_cpu=True, **kw)
    return EPRTrainer(model=model, reference_model=teacher if lp != "off" else None, args=args,
                      train_dataset=train if train is not None else mnist_subset(2000),
                      eval_dataset=mnist_subset(500, "test"))


def test_bits_fall_with_lambda_and_eval_reports_real_size(teacher, tmp_path):
    runs = {}
    for lam in (0.0, 5.0):
        trainer = make_trainer(teacher, tmp_path / str(lam), lam=lam, decoder_learning_rate=0.05,
                               lr_scheduler_type="constant")
        trainer.train()
        logged = [h["bits"] for h in trainer.state.log_history if "bits" in h]
        runs[lam] = (logged, trainer)
    with_rate, without = runs[5.0][0], runs[0.0][0]
    assert with_rate[-1] < 0.7 * with_rate[0]
    assert with_rate[-1] < 0.8 * without[-1]
    trainer = runs[5.0][1]
    metrics = trainer.evaluate()
    trainer.save_model(str(tmp_path / "saved"))
    assert metrics["eval_coded_bytes"] == (tmp_path / "saved" / WEIGHTS_NAME).stat().st_size
    assert {"eval_accuracy", "eval_mismatches", "eval_mismatches_ref_correct"} <= set(metrics)
    logged = [h for h in trainer.state.log_history if "est_kb" in h]
    assert logged and {"task_loss", "kd_loss", "label_loss", "coef_kd", "coef_label", "est_ratio"} <= set(logged[-1])


def test_auto_coefficients_change_and_stay_finite(teacher, tmp_path):
    trainer = make_trainer(teacher, tmp_path, steps=40)
    trainer.train()
    coefs = [(h["coef_kd"], h["coef_label"], h["coef_task"]) for h in trainer.state.log_history if "coef_kd" in h]
    assert len(set(coefs)) > 1
    assert all(math.isfinite(c) and c > 0 for row in coefs for c in row)


def test_trains_without_labels(teacher, tmp_path):
    trainer = make_trainer(teacher, tmp_path, steps=20, train=mnist_subset(500, with_labels=False))
    trainer.train()
    assert trainer.state.global_step == 20
    with pytest.raises(EPRTrainingError):
        make_trainer(teacher, tmp_path / "x", steps=5, lp="off", train=mnist_subset(100, with_labels=False)).train()


def test_bad_arguments(teacher, tmp_path):
    with pytest.raises(EPRTrainingError):
        EPRTrainingArguments(output_dir=str(tmp_path), label_preservation="sometimes")
    args = EPRTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(EPRTrainingError):
        EPRTrainer(model=EPRModel.from_base(copy.deepcopy(teacher)), args=args)  # auto needs a reference
    with pytest.raises(EPRTrainingError):
        EPRTrainer(model=copy.deepcopy(teacher), reference_model=teacher, args=args)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_equals_uninterrupted(teacher, tmp_path):
    kw = dict(steps=12, save_strategy="steps", save_steps=6)
    full = make_trainer(teacher, tmp_path / "full", **kw)
    full.train()
    part = make_trainer(teacher, tmp_path / "part", **kw)
    part.add_callback(StopAt(6))
    part.train()
    resumed = make_trainer(teacher, tmp_path / "part", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    a, b = full.model.integer_latents(), resumed.model.integer_latents()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.policy.state_dict()["weights"] == full.policy.state_dict()["weights"]
