"""EPRTrainer: one fine-tuning run that minimizes task loss + lambda * bits while keeping the reference's labels."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from .format.container import atomic_write
from .format.errors import EPRError
from .label_preservation import SoftAdapt
from .metrics import label_agreement
from .modeling import EPRModel, host_floats
from .target_size import SizeController, TargetSizeCallback, trim_to_target

TRAINING_STATE = "epr_training_state.safetensors"
POLICY_STATE = "epr_label_preservation.json"
TRAINING_ARGS = "training_args.json"


class EPRTrainingError(EPRError, ValueError):
    """EPRTrainer was set up with arguments that cannot work together."""


@dataclass
class EPRTrainingArguments(TrainingArguments):
    """TrainingArguments plus the EPR rate term and label preservation."""

    rate_lambda: float | None = field(default=None, metadata={
        "help": "Weight of the rate term: loss = task + rate_lambda * bits / N, N = number of compressed parameters "
                "(so the term is bits per parameter). Default: the model's EPRConfig.rate_lambda."})
    latent_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the latent tensors (weight units). Default: learning_rate."})
    decoder_learning_rate: float = field(default=2e-2, metadata={
        "help": "Learning rate of the decoders' log step sizes and shifts (no weight decay)."})
    density_learning_rate: float = field(default=1e-2, metadata={
        "help": "Learning rate of the learned density (no weight decay)."})
    label_preservation: str = field(default="fixed", metadata={
        "help": "'off', 'fixed' (task_weight, kd_weight, label_weight as given; the default) or 'auto' (SoftAdapt: "
                "coefficients from the loss terms' recent rates of change). Needs a reference_model unless 'off'. "
                "With the teacher terms also on an augmented copy (kd_affine, kd_mixup; on by default), 'fixed' had "
                "the fewest label mismatches at equal size in benchmarks/paper_mnist.py."})
    task_weight: float = field(default=1.0, metadata={
        "help": "Coefficient of the task loss (the model's own loss on the dataset's labels) when label preservation "
                "is on; the starting value under 'auto'. 0: learn from the teacher only."})
    kd_temperature: float = field(default=2.0, metadata={"help": "Softening temperature of the KL term."})
    kd_weight: float = field(default=1.0, metadata={
        "help": "Coefficient of KL(teacher || student) on softened outputs (x T^2); the starting value under 'auto'."})
    label_weight: float = field(default=1.0, metadata={
        "help": "Coefficient of the cross-entropy to the teacher's argmax label; the starting value under 'auto'."})
    kd_mixup: float = field(default=1.0, metadata={
        "help": "> 0: the teacher terms also see a mixup copy of every training batch (pairs of inputs mixed with "
                "weights from Beta(kd_mixup, kd_mixup)), so that the student matches the teacher between the "
                "training images too (floating inputs and classification labels; the step's forward is twice as "
                "large). 0: off."})
    kd_affine: float = field(default=1.0, metadata={
        "help": "> 0: the teacher terms also see a randomly warped copy of every training image batch (rotation, "
                "scale, shift; strength 1 = up to 15 degrees, 10%, 5% of the size), combined with kd_mixup if both "
                "are set. Applies to floating 4-D inputs (images); others get no warp. 0: off."})
    softadapt_beta: float = field(default=0.1, metadata={"help": "SoftAdapt temperature beta (auto policy)."})
    softadapt_interval: int = field(default=10, metadata={
        "help": "Loss evaluations (micro-batches) between SoftAdapt updates; the slopes compare the means of the last "
                "two intervals."})
    target_ratio: float | None = field(default=None, metadata={
        "help": "Target-size mode: the coded file should be fp32 bytes / target_ratio; rate_lambda is then only the "
                "starting value of a controller that adjusts it during training (see SizeController)."})
    target_bytes: int | None = field(default=None, metadata={
        "help": "Target-size mode with the target given in bytes of the coded weights file (not with target_ratio)."})
    target_tolerance: float = field(default=0.03, metadata={
        "help": "Target-size mode: the accepted |file / target - 1|. At the end of training a file further off than "
                "a third of it is brought in by scaling all quantization steps by one factor (see "
                "EPRTrainer.trim_to_target)."})
    target_interval: int = field(default=10, metadata={
        "help": "Optimizer steps between two updates of rate_lambda in target-size mode."})
    target_gain: float = field(default=0.3, metadata={
        "help": "Target-size mode, integral gain: the controller's integral moves by target_gain * log(estimated size "
                "/ target) per update (clipped to +-target_max_change)."})
    target_proportional: float = field(default=0.5, metadata={
        "help": "Target-size mode, proportional gain: log(rate_lambda) = integral + target_proportional * "
                "log(estimated size / target)."})
    target_horizon: float = field(default=10.0, metadata={
        "help": "Target-size mode: the controller acts on the error predicted target_horizon updates ahead from its "
                "recent trend (e + horizon * trend), so that it eases off while the size is already "
                "falling fast towards the target (0: the current error)."})
    target_max_change: float = field(default=0.1, metadata={
        "help": "Target-size mode: largest change of the controller's integral per update."})
    target_ramp: float = field(default=0.5, metadata={
        "help": "Target-size mode: fraction of the training steps over which the size target descends from the "
                "starting size to the final target (log size along 1 - (1 - s)^2) (the rest of the schedule holds it there)."})
    target_max_lambda: float = field(default=10.0, metadata={
        "help": "Target-size mode: the largest rate_lambda the controller sets (the integral stops there). A target "
                "that needs more is out of reach of the schedule and the run ends above it."})
    target_glide: float = field(default=0.06, metadata={
        "help": "Target-size mode: the size target ends the ramp this fraction above the final target and glides "
                "down to it at the last step (see SizeController.path)."})
    target_calibration_interval: int = field(default=10, metadata={
        "help": "Target-size mode: updates between two measurements of the real coded size (which calibrate the "
                "cheap estimate bits / 8 + overhead); every update in the last tenth of the schedule."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Kept False: EPRModel.forward passes its inputs through to the base model."})

    def __post_init__(self):
        super().__post_init__()
        if self.label_preservation not in ("off", "fixed", "auto"):
            raise EPRTrainingError(f"label_preservation must be off, fixed or auto, not {self.label_preservation!r}")
        if (self.kd_temperature <= 0 or self.softadapt_interval < 1 or self.kd_mixup < 0 or self.kd_affine < 0 or self.task_weight < 0
                or self.kd_weight < 0 or self.label_weight < 0):
            raise EPRTrainingError("kd_temperature must be > 0, softadapt_interval >= 1, kd_mixup, kd_affine and the "
                                   "weights >= 0")
        if self.target_ratio is not None and self.target_bytes is not None:
            raise EPRTrainingError("give target_ratio or target_bytes, not both")
        if self.target_ratio is not None and not (self.target_ratio > 1):
            raise EPRTrainingError(f"target_ratio must be > 1 (fp32 bytes / coded bytes), not {self.target_ratio}")
        if self.target_bytes is not None and not (self.target_bytes > 0):
            raise EPRTrainingError(f"target_bytes must be > 0, not {self.target_bytes}")
        if self.rate_lambda is not None and self.rate_lambda < 0:
            raise EPRTrainingError(f"rate_lambda must be >= 0, not {self.rate_lambda}")
        if (self.target_interval < 1 or self.target_calibration_interval < 1 or not self.target_gain > 0
                or not 0 < self.target_tolerance < 1
                or not self.target_proportional >= 0 or not self.target_horizon >= 0 or not self.target_glide >= 0
                or not self.target_max_lambda > 0
                or not self.target_max_change > 0 or not 0 <= self.target_ramp <= 1):
            raise EPRTrainingError("target_interval and target_calibration_interval must be >= 1, target_tolerance in (0, 1), "
                                   "target_gain and "
                                   "target_max_change > 0, target_proportional, target_horizon and target_glide >= 0, target_max_lambda > 0, target_ramp in [0, 1]")

    @property
    def target_mode(self) -> bool:
        return self.target_ratio is not None or self.target_bytes is not None


def _label_status(labels: torch.Tensor) -> str:
    """"all" labels known, "some" unknown (-1) or "none" known."""
    unknown = labels < 0
    return "none" if bool(unknown.all()) else "some" if bool(unknown.any()) else "all"


LABEL_STATUS_KEY = "epr_label_status"


class LabelStatusCollator:
    """A data collator whose batches also say whether their labels are all known, partly unknown (-1) or all unknown
    (under ``LABEL_STATUS_KEY``), found where the labels are made, on the host: accelerate moves each batch to the
    device before the Trainer sees it, where finding out would stall every step twice."""

    def __init__(self, collator: Callable):
        self.collator = collator

    def __getattr__(self, name: str) -> Any:
        """The wrapped collator's attributes (the Trainer saves a collator's ``tokenizer``, for one)."""
        if name == "collator":  # not set yet (while unpickling in a data loader's worker)
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, features: list) -> Any:
        batch = self.collator(features)
        labels = batch.get("labels") if isinstance(batch, MutableMapping) else None
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu":
            batch[LABEL_STATUS_KEY] = _label_status(labels)
        return batch


class EPRTrainer(Trainer):
    """Trainer for an :class:`EPRModel`: rate term, label preservation, real coded size at evaluation.

    ``compute_loss`` = c_task * task + c_kd * T^2 * KL(teacher_T || student_T) + c_label * CE(student, teacher
    argmax) + rate_lambda * bits / N, with N the number of compressed parameters. The task term is skipped
    for batches without labels (pure teacher signal); the teacher terms need ``reference_model``.
    ``save_model`` writes the compressed repo; checkpoints also hold the full training state.

    Label preservation (Joseph et al.): "off"; "fixed" (c_task = task_weight, c_kd = kd_weight, c_label =
    label_weight; the default); "auto" = :class:`~hf_epr.label_preservation.SoftAdapt` (loss-weighted, every
    ``softadapt_interval`` loss evaluations, scaled by the fixed values). With ``kd_affine`` / ``kd_mixup`` (on by
    default) the teacher terms also see a warped and mixed copy of each batch, so the student matches the teacher
    around and between the training images, not only on them. Under distributed training the SoftAdapt inputs and
    the logged terms are means over the processes.
    """

    def __init__(self, *args: Any, reference_model: torch.nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.data_collator = LabelStatusCollator(self.data_collator)
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, EPRModel):
            raise EPRTrainingError(f"EPRTrainer needs an EPRModel (EPRModel.from_base(...)), got {type(model).__name__}")
        args = self.args
        if args.label_preservation != "off" and reference_model is None:
            raise EPRTrainingError(f"label_preservation={args.label_preservation!r} needs a reference_model "
                                   "(the uncompressed model), or set label_preservation='off'")
        self.reference_model = None
        if reference_model is not None:
            # frozen by use: eval mode and torch.no_grad only (requires_grad is left alone, so copies of the
            # reference made later, e.g. to wrap another EPRModel, stay trainable)
            self.reference_model = reference_model.to(self.args.device).eval()
        self.rate_lambda = model.epr_config.rate_lambda if args.rate_lambda is None else args.rate_lambda
        names = ["task"] + (["kd", "label"] if args.label_preservation != "off" else [])
        self.policy = SoftAdapt(names, args.softadapt_beta, args.softadapt_interval, reduce=self._global_mean)
        self.base_weights = {"task": args.task_weight if args.label_preservation != "off" else 1.0, "kd": args.kd_weight, "label": args.label_weight}
        self._acc: dict[str, list[float]] = {}  # logged statistic -> [sum, count] since the last training log
        self.fp32_bytes = 4 * sum(p.numel() for p in model.model.parameters())
        self.size_controller: SizeController | None = None
        if args.target_mode:
            target = args.target_bytes if args.target_bytes is not None else self.fp32_bytes / args.target_ratio
            start = self.rate_lambda if self.rate_lambda > 0 else 0.5
            self.size_controller = SizeController(float(target), math.log(start), args.target_gain,
                                                  args.target_max_change, args.target_ramp,
                                                  args.target_calibration_interval, args.target_proportional,
                                                  args.target_horizon, args.target_glide, args.target_max_lambda)
            self.rate_lambda = start
            self.add_callback(TargetSizeCallback(self))

    def _epr(self, model: torch.nn.Module) -> EPRModel:
        """The EPRModel inside ``model`` (which accelerate may have wrapped), looked up once per wrapper: accelerate's
        ``unwrap_model`` walks every module, a cost paid on every step otherwise."""
        if isinstance(model, EPRModel):
            return model
        cached = self.__dict__.get("_unwrapped")
        if cached is None or cached[0] is not model:
            cached = self.__dict__["_unwrapped"] = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    def _global_mean(self, values: list[float]) -> list[float]:
        """Mean of each value over the processes (identity in a single process); every rank must call it."""
        return self._reduce(values, "mean")

    def _reduce(self, values: list[float], reduction: str) -> list[float]:
        if self.accelerator.num_processes == 1 or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.args.device)
        return self.accelerator.reduce(t, reduction=reduction).tolist()

    @torch.no_grad()
    def update_rate_lambda(self, step: int, max_steps: int) -> None:
        """Target-size mode: one update of the size controller (every process computes the same values)."""
        ctl = self.size_controller
        if ctl is None:
            return
        epr = self.accelerator.unwrap_model(self.model)
        real = None
        if ctl.needs_real_size(step, max_steps):
            with epr.full_parameters():
                real = float(epr.size_report()["total_bytes"])
        self.rate_lambda = ctl.update(step, max_steps, epr.empirical_bits(), real)

    def trim_to_target(self, iterations: int = 24) -> float:
        """Target-size mode, at the end of training: :func:`~hf_epr.target_size.trim_to_target` on this run's model;
        logs the applied shift of log(step) and the size error before and after. Returns the shift (0: none)."""
        if self.size_controller is None:
            return 0.0
        epr = self.accelerator.unwrap_model(self.model)
        shift, before, after = trim_to_target(epr, self.size_controller, self.args.target_tolerance / 3, iterations)
        self.log({"trim_log_step": shift, "size_error_before_trim": before, "size_error_after_trim": after})
        return shift

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate (6 x input elements x parameters), with the parameters counted once: counting
        walks every module, and the Trainer asks every step."""
        key = getattr(self.model, "main_input_name", "input_ids")
        if key not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if "_flops_parameters" not in self.__dict__:
            self._flops_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[key].numel() * self._flops_parameters

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = self.accelerator.unwrap_model(self.model).parameter_groups()
            a = self.args
            cls, kwargs = self.get_optimizer_cls_and_kwargs(a, self.model)
            kwargs = {k: v for k, v in kwargs.items() if k not in ("lr", "weight_decay")}
            param_groups = [
                {"params": groups["latents"], "lr": a.latent_learning_rate or a.learning_rate, "weight_decay": 0.0},
                {"params": groups["decoders"], "lr": a.decoder_learning_rate, "weight_decay": 0.0},
                {"params": groups["density"], "lr": a.density_learning_rate, "weight_decay": 0.0},
                {"params": groups["raw"], "lr": a.learning_rate, "weight_decay": a.weight_decay},
            ]
            self.optimizer = cls([g for g in param_groups if g["params"]], **kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ loss
    def coefficients(self) -> dict[str, float]:
        """Current coefficient of each non-rate term."""
        if self.args.label_preservation == "auto":
            return {n: self.base_weights[n] * w for n, w in self.policy.weights.items()}
        return {n: self.base_weights[n] for n in self.policy.names}

    def _prepare_inputs(self, inputs):
        """Notes whether the batch's labels are all known, partly unknown (-1) or all unknown, as the collator
        found on the host (:class:`LabelStatusCollator`; looked at here only for batches made otherwise), so that
        ``compute_loss`` needs no device sync."""
        status = inputs.pop(LABEL_STATUS_KEY, None) if isinstance(inputs, MutableMapping) else None
        labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
        self._label_status = None if labels is None else status or _label_status(labels)
        return super()._prepare_inputs(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        epr = self._epr(model)
        inputs = dict(inputs)
        labels = inputs.get("labels")
        status = None if labels is None else (getattr(self, "_label_status", None) or _label_status(labels))
        if status == "none":  # -1: no label (e.g. an unlabeled dataset)
            inputs.pop("labels")
            labels = None
        elif status == "some":
            inputs["labels"] = labels.masked_fill(labels < 0, -100)  # cross-entropy's ignore_index
        key = getattr(epr, "main_input_name", "pixel_values")
        n = inputs[key].shape[0]
        if (self.args.kd_mixup > 0 or self.args.kd_affine > 0) and self.args.label_preservation != "off" \
                and model.training and inputs[key].is_floating_point():
            inputs = self._with_mixed_copy(inputs, key)
        outputs, bits = model(**inputs, return_bits=True)
        logits = outputs.logits[:n]  # the batch's own rows (a mixed copy, if any, follows)
        terms: dict[str, torch.Tensor] = {}
        if labels is not None:
            terms["task"] = outputs.loss
        if self.args.label_preservation != "off":
            with torch.no_grad():
                teacher_all = self.reference_model(**{key: inputs[key]}).logits
            teacher = teacher_all[:n]
            t = self.args.kd_temperature
            terms["kd"] = F.kl_div(F.log_softmax(outputs.logits / t, -1), F.log_softmax(teacher_all / t, -1),
                                   log_target=True, reduction="batchmean") * t * t
            terms["label"] = F.cross_entropy(outputs.logits, teacher_all.argmax(-1))
        if not terms:
            raise EPRTrainingError("a batch has no labels and label_preservation is off: nothing to learn from")
        coefs = self.coefficients()
        loss = sum(coefs[n] * v for n, v in terms.items()) + self.rate_lambda * bits / epr.num_compressed_parameters
        if model.training:  # statistics stay on the device until the next log (no sync per step)
            values = {n: terms[n].detach().float() if n in terms else 0.0 for n in self.policy.names}
            self.policy.update(values)
            stats = {**{f"{n}_loss": (v, 1) for n, v in values.items()},
                     **{f"coef_{n}": (c, 1) for n, c in coefs.items()}, "relaxed_bits": (bits.detach(), 1)}
            pred = logits.detach().argmax(-1)
            if labels is not None:
                known = labels >= 0
                stats["train_accuracy"] = (((pred == labels) & known).sum(), known.sum())
            if self.args.label_preservation != "off":
                stats["teacher_agreement"] = ((pred == teacher.argmax(-1)).sum(), pred.numel())
            self._record(stats)
        return (loss, outputs) if return_outputs else loss

    def _with_mixed_copy(self, inputs: dict[str, Any], key: str) -> dict[str, Any]:
        """The batch followed by a perturbed copy of its (floating) inputs for the teacher terms only (the copy's labels
        are cross-entropy's ignore_index, so the task loss is the batch's own): with ``kd_affine`` and image inputs
        (batch, channels, height, width) a random affine warp of each image (rotation up to 15 degrees x kd_affine, scale 1 +- 0.1 x kd_affine, shift up to 5% of the size x
        kd_affine; the border value fills in), then with ``kd_mixup`` a mixup of pairs (m x_i + (1 - m) x_j,
        m ~ Beta(a, a), j a permutation). Draws from the global RNG (seeded by the Trainer, restored on resume)."""
        x = inputs[key]
        n = x.shape[0]
        copy = x
        if self.args.kd_affine > 0 and x.ndim == 4:
            a = self.args.kd_affine
            u = torch.rand(n, 4) * 2 - 1
            angle, scale, shift = u[:, 0] * math.radians(15) * a, 1 + 0.1 * a * u[:, 1], 0.1 * a * u[:, 2:]
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
            grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
            copy = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        if self.args.kd_mixup > 0:
            a = self.args.kd_mixup
            m = torch.distributions.Beta(a, a, validate_args=False).sample((n,)).to(x.device, x.dtype)
            m = m.view(n, *[1] * (x.ndim - 1))
            perm = torch.randperm(n).to(x.device)
            copy = m * copy + (1 - m) * copy[perm]
        out = {**inputs, key: torch.cat([x, copy])}
        labels = inputs.get("labels")
        if labels is not None:
            out["labels"] = torch.cat([labels, torch.full_like(labels, -100)])
        return out

    def _record(self, stats: dict[str, tuple[Any, Any]]) -> None:
        """Add (sum, count) pairs (floats or device tensors); the log shows sum / count since the last log."""
        for k, (total, count) in stats.items():
            acc = self._acc.setdefault(k, [0.0, 0.0])
            acc[0] = acc[0] + total
            acc[1] = acc[1] + count

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds, at every logging step: each term and its coefficient (means since the last log), the bits of
        the current rounded latents under the density (``bits``; ``relaxed_bits`` is the training surrogate's
        mean), the estimated coded KB and ratio vs fp32 (latents only; ``evaluate`` reports real bytes), and the
        training batches' accuracy and agreement with the teacher. All are global over the processes."""
        if self._acc and "loss" in logs:  # a training log: every process gets here (after a gather)
            keys = sorted(self._acc)
            sums = self._reduce(host_floats([v for k in keys for v in self._acc[k]]), "sum")
            logs.update({k: sums[2 * i] / sums[2 * i + 1] for i, k in enumerate(keys) if sums[2 * i + 1] > 0})
            bits = self.accelerator.unwrap_model(self.model).exact_bits()  # of the rounded latents, now
            logs["bits"] = bits
            logs["est_kb"] = bits / 8 / 1024
            logs["est_ratio"] = self.fp32_bytes / max(bits / 8, 1.0)
            logs["rate_lambda"] = self.rate_lambda
            if self.size_controller is not None and self.size_controller.estimate is not None:
                logs["target_bytes"] = self.size_controller.target
                logs["est_bytes"] = self.size_controller.estimate
                logs["size_error"] = self.size_controller.size_error()
            self._acc = {}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer metrics + REAL coded size (entropy-coded bytes), ratio, accuracy and label agreement."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        epr = self.accelerator.unwrap_model(self.model)
        report = epr.size_report()
        extra = {"coded_bytes": report["total_bytes"], "ratio": report["ratio"], "ideal_bytes": report["ideal_bytes"]}
        if self.size_controller is not None:
            extra["target_bytes"] = self.size_controller.target
            extra["size_error"] = report["total_bytes"] / self.size_controller.target - 1
        extra.update(self.label_metrics(eval_dataset))
        extra = {f"{metric_key_prefix}_{k}": v for k, v in extra.items() if v is not None}
        metrics.update(extra)
        self.log(extra)
        return metrics

    @torch.no_grad()
    def label_metrics(self, eval_dataset=None) -> dict[str, float]:
        """Accuracy and mismatches of the compressed model vs ground truth and vs the reference model."""
        epr = self.accelerator.unwrap_model(self.model)
        loader = self.get_eval_dataloader(eval_dataset)
        key = getattr(epr, "main_input_name", "pixel_values")
        was_training = epr.training
        epr.eval()
        preds, refs, labels = [], [], []
        gather = self.accelerator.gather_for_metrics  # all ranks' predictions, padding dropped
        for batch in loader:
            x = batch[key].to(self.args.device)
            p = epr(**{key: x}).logits.argmax(-1)
            y = batch.get("labels")
            labels.append(gather(y if y is not None else torch.full_like(p, -1)).cpu())
            preds.append(gather(p).cpu())
            if self.reference_model is not None:
                refs.append(gather(self.reference_model(**{key: x}).logits.argmax(-1)).cpu())
        epr.train(was_training)
        if not preds:
            return {}
        p, y = torch.cat(preds), torch.cat(labels)
        r = torch.cat(refs) if refs else p
        out = label_agreement(p.numpy(), y.numpy(), r.numpy())
        return out if refs else {"accuracy": out["accuracy"]}

    # ------------------------------------------------------------------ saving and resuming
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the compressed repo (and the processor) instead of fp32 weights."""
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS), "w") as f:  # JSON: no pickle in a model repo
            f.write(self.args.to_json_string())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the compressed repo (every process takes part: under FSDP2 the parameters are gathered first)."""
        with self.accelerator.unwrap_model(self.model).full_parameters():
            if self.args.should_save:
                self._save(output_dir)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        epr = self.accelerator.unwrap_model(self.model)
        state = epr.host_state_dict()  # every process (a collective under FSDP2); the main one writes
        log_sums = {k: host_floats(v) for k, v in self._acc.items()}
        if self.args.should_save:
            from safetensors.torch import save_file

            folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
            save_file(state, os.path.join(folder, TRAINING_STATE))
            policy = {"policy": self.policy.state_dict(), "log_sums": log_sums, "rate_lambda": self.rate_lambda,
                      "rate_grid": epr.rate_workspace.state_dict()}
            if self.size_controller is not None:
                policy["size_controller"] = self.size_controller.state_dict()
            atomic_write(os.path.join(folder, POLICY_STATE), json.dumps(policy).encode())

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, **kwargs: Any):
        """Save the compressed repo and upload it in one commit, with a model card of the last evaluation."""
        from .hub import push_to_hub

        out = self.args.output_dir
        self.save_model(out)
        if not self.is_world_process_zero():
            return None
        evals = [h for h in self.state.log_history if "eval_coded_bytes" in h]
        plot = os.path.join(out, "rate_accuracy.png")
        return push_to_hub(out, self.args.hub_model_id or os.path.basename(os.path.abspath(out)),
                           commit_message=commit_message, token=token or self.args.hub_token,
                           private=self.args.hub_private_repo, eval_results=evals[-1] if evals else None,
                           plot_path=plot if os.path.isfile(plot) else None,
                           label_preservation=self.args.label_preservation, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints are training state: only ``push_to_hub`` uploads (the compressed repo)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, TRAINING_STATE)
        if not os.path.isfile(path):
            raise EPRTrainingError(f"{resume_from_checkpoint} has no {TRAINING_STATE}: not an EPRTrainer checkpoint")
        epr = self.accelerator.unwrap_model(model if model is not None else self.model)
        epr.load_state_dict(load_file(path), strict=True)
        policy = os.path.join(resume_from_checkpoint, POLICY_STATE)
        if os.path.isfile(policy):
            with open(policy) as f:
                state = json.load(f)
            self.policy.load_state_dict(state["policy"])
            self._acc = state["log_sums"]
            self.rate_lambda = state.get("rate_lambda", self.rate_lambda)
            epr.rate_workspace.load_state_dict(state.get("rate_grid", {}), epr.device)
            if self.size_controller is not None and "size_controller" in state:
                self.size_controller.load_state_dict(state["size_controller"])
