"""EPRTrainer: one fine-tuning run that minimizes task loss + lambda * bits while keeping the reference's labels."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from .format.container import atomic_write
from .format.errors import EPRError
from .metrics import label_agreement
from .modeling import EPRModel

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
    label_preservation: str = field(default="auto", metadata={
        "help": "'off', 'fixed' (kd_weight, label_weight as given) or 'auto' (SoftAdapt: coefficients from the "
                "loss terms' recent rates of change). Needs a reference_model unless 'off'."})
    kd_temperature: float = field(default=2.0, metadata={"help": "Softening temperature of the KL term."})
    kd_weight: float = field(default=1.0, metadata={
        "help": "Coefficient of KL(teacher || student) on softened outputs (x T^2); the starting value under 'auto'."})
    label_weight: float = field(default=1.0, metadata={
        "help": "Coefficient of the cross-entropy to the teacher's argmax label; the starting value under 'auto'."})
    softadapt_beta: float = field(default=0.1, metadata={"help": "SoftAdapt temperature beta (auto policy)."})
    softadapt_interval: int = field(default=10, metadata={
        "help": "Loss evaluations (micro-batches) between SoftAdapt updates; the slopes compare the means of the last "
                "two intervals."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Kept False: EPRModel.forward passes its inputs through to the base model."})

    def __post_init__(self):
        super().__post_init__()
        if self.label_preservation not in ("off", "fixed", "auto"):
            raise EPRTrainingError(f"label_preservation must be off, fixed or auto, not {self.label_preservation!r}")
        if self.kd_temperature <= 0 or self.softadapt_interval < 1:
            raise EPRTrainingError("kd_temperature must be > 0 and softadapt_interval >= 1")


def _floats(values: list[Any]) -> list[float]:
    """Python floats of a list of floats and 0-dim tensors, with one device sync for all the tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    host = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist())
    return [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]


class SoftAdapt:
    """Loss-weighted SoftAdapt (Heydari et al. 2019) over the non-rate loss terms.

    Every ``interval`` calls, with m_i the mean of term i over the last interval and p_i over the one before:
    slopes s_i = m_i / p_i - 1 (relative rates of change), normalized by max|s|; weights
    w_i = n * softmax(beta * s)_i * m_i / sum_j softmax(beta * s)_j * m_j (n terms, so sum w = n). A term that
    stops falling (or rises) and a term that is large both get more weight. Before the second interval all
    weights are 1. ``reduce`` maps each interval's local means to global ones (mean over processes), so every
    rank of a distributed run holds the same weights.
    """

    def __init__(self, names: list[str], beta: float, interval: int,
                 reduce: Callable[[list[float]], list[float]] | None = None):
        self.names, self.beta, self.interval = names, beta, interval
        self.reduce = reduce or (lambda values: values)
        self.weights = {n: 1.0 for n in names}
        self.sums: dict[str, Any] = {n: 0.0 for n in names}
        self.count = 0
        self.previous: dict[str, float] | None = None

    def update(self, values: dict[str, Any]) -> None:
        """Add one step's term values (floats or 0-dim tensors, summed where they are: no device sync); recompute
        the weights at the end of each interval (one sync)."""
        for n in self.names:
            self.sums[n] = self.sums[n] + values[n]
        self.count += 1
        if self.count < self.interval:
            return
        local = [v / self.count for v in _floats([self.sums[n] for n in self.names])]
        means = dict(zip(self.names, self.reduce(local)))
        if self.previous is not None:
            slopes = np.array([means[n] / max(self.previous[n], 1e-12) - 1.0 for n in self.names])
            slopes = slopes / max(np.abs(slopes).max(), 1e-12)
            soft = np.exp(self.beta * (slopes - slopes.max()))
            w = soft * np.array([means[n] for n in self.names])
            w = len(self.names) * w / max(w.sum(), 1e-12)
            if np.all(np.isfinite(w)):
                self.weights = {n: float(v) for n, v in zip(self.names, w)}
        self.previous, self.sums, self.count = means, {n: 0.0 for n in self.names}, 0

    def state_dict(self) -> dict[str, Any]:
        sums = dict(zip(self.names, _floats([self.sums[n] for n in self.names])))
        return {"weights": self.weights, "sums": sums, "count": self.count, "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights, self.sums = state["weights"], state["sums"]
        self.count, self.previous = state["count"], state["previous"]


def _label_status(labels: torch.Tensor) -> str:
    """"all" labels known, "some" unknown (-1) or "none" known."""
    unknown = labels < 0
    return "none" if bool(unknown.all()) else "some" if bool(unknown.any()) else "all"


class EPRTrainer(Trainer):
    """Trainer for an :class:`EPRModel`: rate term, label preservation, real coded size at evaluation.

    ``compute_loss`` = c_task * task + c_kd * T^2 * KL(teacher_T || student_T) + c_label * CE(student, teacher
    argmax) + rate_lambda * bits / N, with N the number of compressed parameters. The task term is skipped
    for batches without labels (pure teacher signal); the teacher terms need ``reference_model``.
    ``save_model`` writes the compressed repo; checkpoints also hold the full training state.

    Label preservation (Joseph et al.): "off"; "fixed" (c_task = 1, c_kd = kd_weight, c_label = label_weight);
    "auto" = :class:`SoftAdapt` (loss-weighted, every ``softadapt_interval`` loss evaluations, scaled by the
    fixed values), the adaptive weighting Joseph et al. build on; it needs no per-model tuning of the coefficients.
    Under distributed training the SoftAdapt inputs and the logged terms are means over the processes.
    """

    def __init__(self, *args: Any, reference_model: torch.nn.Module | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
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
        self.base_weights = {"task": 1.0, "kd": args.kd_weight, "label": args.label_weight}
        self._acc: dict[str, list[float]] = {}  # logged statistic -> [sum, count] since the last training log
        self.fp32_bytes = 4 * sum(p.numel() for p in model.model.parameters())

    def _global_mean(self, values: list[float]) -> list[float]:
        """Mean of each value over the processes (identity in a single process); every rank must call it."""
        return self._reduce(values, "mean")

    def _reduce(self, values: list[float], reduction: str) -> list[float]:
        if self.accelerator.num_processes == 1 or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.args.device)
        return self.accelerator.reduce(t, reduction=reduction).tolist()

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
        """Notes whether the batch's labels are all known, partly unknown (-1) or all unknown, while they are
        still on the host (so that ``compute_loss`` needs no device sync)."""
        labels = inputs.get("labels") if hasattr(inputs, "get") else None
        self._label_status = None if labels is None else _label_status(labels)
        return super()._prepare_inputs(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        epr = self.accelerator.unwrap_model(model)
        inputs = dict(inputs)
        labels = inputs.get("labels")
        status = None if labels is None else (getattr(self, "_label_status", None) or _label_status(labels))
        if status == "none":  # -1: no label (e.g. an unlabeled dataset)
            inputs.pop("labels")
            labels = None
        elif status == "some":
            inputs["labels"] = labels.masked_fill(labels < 0, -100)  # cross-entropy's ignore_index
        outputs, bits = model(**inputs, return_bits=True)
        terms: dict[str, torch.Tensor] = {}
        if labels is not None:
            terms["task"] = outputs.loss
        if self.args.label_preservation != "off":
            with torch.no_grad():
                key = getattr(epr, "main_input_name", "pixel_values")
                teacher = self.reference_model(**{key: inputs[key]}).logits
            t = self.args.kd_temperature
            terms["kd"] = F.kl_div(F.log_softmax(outputs.logits / t, -1), F.log_softmax(teacher / t, -1),
                                   log_target=True, reduction="batchmean") * t * t
            terms["label"] = F.cross_entropy(outputs.logits, teacher.argmax(-1))
        if not terms:
            raise EPRTrainingError("a batch has no labels and label_preservation is off: nothing to learn from")
        coefs = self.coefficients()
        loss = sum(coefs[n] * v for n, v in terms.items()) + self.rate_lambda * bits / epr.num_compressed_parameters
        if model.training:  # statistics stay on the device until the next log (no sync per step)
            values = {n: terms[n].detach().float() if n in terms else 0.0 for n in self.policy.names}
            self.policy.update(values)
            stats = {**{f"{n}_loss": (v, 1) for n, v in values.items()},
                     **{f"coef_{n}": (c, 1) for n, c in coefs.items()}, "relaxed_bits": (bits.detach(), 1)}
            pred = outputs.logits.detach().argmax(-1)
            if labels is not None:
                known = labels >= 0
                stats["train_accuracy"] = (((pred == labels) & known).sum(), known.sum())
            if self.args.label_preservation != "off":
                stats["teacher_agreement"] = ((pred == teacher.argmax(-1)).sum(), pred.numel())
            self._record(stats)
        return (loss, outputs) if return_outputs else loss

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
            sums = self._reduce(_floats([v for k in keys for v in self._acc[k]]), "sum")
            logs.update({k: sums[2 * i] / sums[2 * i + 1] for i, k in enumerate(keys) if sums[2 * i + 1] > 0})
            bits = self.accelerator.unwrap_model(self.model).exact_bits()  # of the rounded latents, now
            logs["bits"] = bits
            logs["est_kb"] = bits / 8 / 1024
            logs["est_ratio"] = self.fp32_bytes / max(bits / 8, 1.0)
            self._acc = {}
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer metrics + REAL coded size (entropy-coded bytes), ratio, accuracy and label agreement."""
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        epr = self.accelerator.unwrap_model(self.model)
        report = epr.size_report()
        extra = {"coded_bytes": report["total_bytes"], "ratio": report["ratio"]}
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
        log_sums = {k: _floats(v) for k, v in self._acc.items()}
        if self.args.should_save:
            from safetensors.torch import save_file

            folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
            save_file(state, os.path.join(folder, TRAINING_STATE))
            policy = {"policy": self.policy.state_dict(), "log_sums": log_sums}
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
