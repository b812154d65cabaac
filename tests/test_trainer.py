"""EPRTrainer on tiny models: the rate falls, sizes are real, label preservation adapts, resume is exact."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from transformers import TrainerCallback, default_data_collator

from hf_epr import EPRConfig, EPRModel
from hf_epr.format import WEIGHTS_NAME
from hf_epr.testing import mnist_reference, mnist_subset
from hf_epr import EPRError
from hf_epr.trainer import (LABEL_STATUS_KEY, POLICY_STATE, TRAINING_STATE, EPRTrainer, EPRTrainingArguments,
                             EPRTrainingError, LabelStatusCollator)

TARGET_RATIO, TARGET_STEPS, RAMP, START = 25.0, 300, 0.5, 0.05  # lambda starts low and rises to the target


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, 2 threads per process oversubscribe and run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    return mnist_reference()


def make_trainer(teacher, tmp_path, lam=1.0, steps=60, lp="auto", train=None, **kw):
    model = EPRModel.from_base(copy.deepcopy(teacher), EPRConfig(rate_lambda=lam, init_step_ratio=1 / 64))
    kw = {"save_strategy": "no", "logging_steps": 10, **kw}
    args = EPRTrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=64,
                                learning_rate=1e-3, report_to=[], label_preservation=lp, seed=0,
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
    assert logged and {"task_loss", "kd_loss", "label_loss", "coef_kd", "coef_label", "est_ratio", "train_accuracy",
                       "teacher_agreement"} <= set(logged[-1])
    assert all(0.5 < h["train_accuracy"] <= 1 and 0.5 < h["teacher_agreement"] <= 1 for h in logged)


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
    logged = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert logged and all(h["task_loss"] == 0 and h["kd_loss"] > 0 and h["label_loss"] > 0 for h in logged)
    with pytest.raises(EPRTrainingError):
        make_trainer(teacher, tmp_path / "x", steps=5, lp="off", train=mnist_subset(100, with_labels=False)).train()


def test_partly_labeled_batches(teacher, tmp_path):
    """Label -1 means "no label": those rows only get the teacher terms, the others also the task loss."""
    data = mnist_subset(256)
    data.columns["labels"] = data.columns["labels"].masked_fill(torch.arange(256) % 2 == 0, -1)
    trainer = make_trainer(teacher, tmp_path, steps=10, lp="fixed", train=data, logging_steps=5)
    trainer.train()
    task = [h["task_loss"] for h in trainer.state.log_history if "task_loss" in h]
    assert len(task) == 2 and all(math.isfinite(t) and t > 0 for t in task)


@pytest.mark.parametrize("lp", ["off", "fixed"])
def test_training_steps_on_the_accelerator_path_read_nothing_from_the_device(lp, teacher, tmp_path, accelerator_path,
                                                                           hf_epr_tensor_reads):
    """EPRTrainer steps on the accelerator path read no tensor on the host but the rate's finiteness flag of the step
    before: whether the labels are known is found by the collator, which sees them on the host before accelerate
    moves the batch to the device (here half of them unknown)."""
    data = mnist_subset(256)
    data.columns["labels"] = data.columns["labels"].masked_fill(torch.arange(256) % 2 == 0, -1)
    trainer = make_trainer(teacher, tmp_path, steps=4, lp=lp, train=data, logging_steps=100)
    hf_epr_tensor_reads.clear()
    trainer.train()
    in_steps = [r for r in hf_epr_tensor_reads if "compute_loss" in r or "_prepare_inputs" in r]
    assert in_steps == ["trainer.py:compute_loss > modeling.py:forward > modeling.py:_bits > entropy.py:noise_rate > "
                        "entropy.py:device_grid > entropy.py:read"] * 3, in_steps  # steps 2-4
    assert sum(r.endswith("trainer.py:__call__ > trainer.py:_label_status") for r in hf_epr_tensor_reads) >= 4


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_trains_like_the_uncompiled_model(backend, teacher, tmp_path):
    """``torch_compile=True`` (TorchDynamo traces the model with fake tensors, which the compiled training loops
    cannot read: torch operations stand in) trains as the uncompiled model does and saves a repo that loads."""
    runs = {}
    for compiled in (False, True):
        kw = {"torch_compile": True, "torch_compile_backend": backend} if compiled else {}
        trainer = make_trainer(teacher, tmp_path / str(compiled), steps=12, lp="fixed", logging_steps=1, **kw)
        trainer.train()
        runs[compiled] = trainer
    logs = {c: list(zip(*[(h["loss"], h["bits"]) for h in t.state.log_history if "bits" in h]))
            for c, t in runs.items()}
    (loss, bits), (loss_c, bits_c) = logs[False], logs[True]  # per step
    assert len(loss_c) == 12
    assert loss_c[0] == pytest.approx(loss[0], rel=1e-5)  # from the same weights: the same step
    assert loss_c == pytest.approx(loss, rel=1e-2)  # then its rounding differences grow a little under Adam
    assert bits_c[0] - bits_c[-1] == pytest.approx(bits[0] - bits[-1], rel=0.05)  # the rate's gradient is there
    trainer = runs[True]
    trainer.save_model(str(tmp_path / "saved"))
    loaded = EPRModel.from_pretrained(str(tmp_path / "saved"))
    expected = trainer.accelerator.unwrap_model(trainer.model).integer_latents()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.integer_latents().items())


def test_label_status_collator_wraps_the_collator():
    """The wrapper adds each batch's label status and otherwise stands for the collator it wraps: its attributes (the
    Trainer saves a collator's tokenizer) and pickling (data loader workers that spawn)."""
    class Collator:
        tokenizer = "the tokenizer"

        def __call__(self, features):
            return {"labels": torch.tensor(features)}

    wrapped = LabelStatusCollator(Collator())
    assert wrapped.tokenizer == "the tokenizer"
    assert [wrapped(f)[LABEL_STATUS_KEY] for f in ([1, 2], [1, -1], [-1, -1])] == ["all", "some", "none"]
    again = pickle.loads(pickle.dumps(LabelStatusCollator(default_data_collator)))
    assert again([{"labels": 3, "x": 1.0}])[LABEL_STATUS_KEY] == "all"


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


@pytest.mark.parametrize("extra", [{}, {"target_ratio": 20.0, "target_interval": 2, "kd_affine": 1.0, "kd_mixup": 1.0}],
                         ids=["plain", "target_size_augmented"])
def test_resume_equals_uninterrupted(teacher, tmp_path, extra):
    """Also in target-size mode with the augmented teacher copy: the controller's state and the RNG are restored."""
    kw = dict(steps=12, save_strategy="steps", save_steps=6, logging_steps=4, **extra)  # a log window spans the resume
    full = make_trainer(teacher, tmp_path / "full", **kw)
    full.train()
    part = make_trainer(teacher, tmp_path / "part", **kw)
    part.add_callback(StopAt(6))
    part.train()
    resumed = make_trainer(teacher, tmp_path / "part", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    checkpoint = tmp_path / "part" / "checkpoint-6"
    assert (checkpoint / TRAINING_STATE).is_file()
    assert set(json.loads((checkpoint / POLICY_STATE).read_text())["policy"]["weights"]) == {"task", "kd", "label"}
    a, b = full.model.integer_latents(), resumed.model.integer_latents()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.policy.state_dict() == full.policy.state_dict()
    last = lambda t: [h for h in t.state.log_history if "bits" in h][-1]  # noqa: E731
    assert last(resumed)["step"] == last(full)["step"] == 12
    for key in ("bits", "task_loss", "kd_loss", "coef_label", "rate_lambda"):
        assert last(resumed)[key] == pytest.approx(last(full)[key], rel=1e-6)
    if extra:
        assert "size_controller" in json.loads((checkpoint / POLICY_STATE).read_text())
        assert resumed.size_controller.state_dict() == pytest.approx(full.size_controller.state_dict())
        assert resumed.rate_lambda == full.rate_lambda != 0.5


# ---------------------------------------------------------------------------------------------- target-size mode
def test_target_size_mode_lands_within_tolerance(teacher, tmp_path):
    """A short run with target_ratio: the controller moves lambda and the real file lands within 3% of the target."""
    trainer = make_trainer(teacher, tmp_path, lam=START, steps=TARGET_STEPS, lp="off", target_ratio=TARGET_RATIO,
                           logging_steps=50, decoder_learning_rate=0.02, lr_scheduler_type="linear", target_interval=5,
                           target_ramp=RAMP)
    trainer.train()
    metrics = trainer.evaluate()
    target = trainer.fp32_bytes / TARGET_RATIO
    assert metrics["eval_target_bytes"] == pytest.approx(target)
    assert abs(metrics["eval_coded_bytes"] / target - 1) <= 0.03
    assert metrics["eval_size_error"] == pytest.approx(metrics["eval_coded_bytes"] / target - 1)
    logged = [h for h in trainer.state.log_history if "size_error" in h]
    assert logged and len({h["rate_lambda"] for h in logged}) > 1
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / WEIGHTS_NAME).stat().st_size == metrics["eval_coded_bytes"]


def test_target_size_bad_arguments(tmp_path):
    for bad in ({"target_ratio": 10, "target_bytes": 1000}, {"target_ratio": -5}, {"target_ratio": 0.5},
                {"target_bytes": -1}, {"target_bytes": 0}, {"rate_lambda": -1.0}, {"target_gain": 0},
                {"target_ramp": 1.5}, {"target_interval": 0}, {"kd_mixup": -1}):
        with pytest.raises(EPRTrainingError):
            EPRTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **bad)
    assert issubclass(EPRTrainingError, EPRError)
