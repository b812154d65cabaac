"""Sharing compressed repos: Auto-class registration, model cards, and a one-commit push to the Hub."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import transformers

from .format.configuration_epr import CONFIG_MODEL_TYPE, EPRCompressedConfig
from .format.container import WEIGHTS_NAME, file_size_report
from .format.errors import EPRError
from .format.modeling_epr import LOADERS
from .modeling import DENSITY_NAME

TEMPLATE = Path(__file__).parent / "resources" / "model_card_template.md"  # package data
SHARED = ("config.json", WEIGHTS_NAME, DENSITY_NAME, "preprocessor_config.json", "README.md", "rate_accuracy.png")
CODE_SUFFIX = ".py"  # the decoder modules and any base-architecture source the repo carries


class EPRHubError(EPRError, ValueError):
    """A push or model card could not be made from what was given."""


def register_auto_classes() -> None:
    """Let ``AutoConfig`` and every Auto model class read compressed repos with no remote code. (Chosen over
    transformers' quantizer registry: an unknown ``quant_method`` is silently ignored by transformers, which would
    return random weights where hf_epr is missing; an unknown model type with an ``auto_map`` instead fails
    loudly, asking for ``trust_remote_code=True``.)"""
    transformers.AutoConfig.register(CONFIG_MODEL_TYPE, EPRCompressedConfig, exist_ok=True)
    for auto_class, loader in LOADERS.items():
        auto = getattr(transformers, auto_class, None)
        if auto is not None:
            auto.register(EPRCompressedConfig, loader, exist_ok=True)


def _is_shared(name: str) -> bool:
    return name in SHARED or name.endswith(CODE_SUFFIX)


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if pct else f"{value}"


def build_model_card(folder: str | os.PathLike, *, repo_id: str = "", base_model: str | None = None,
                     datasets: list[str] | None = None, eval_results: dict[str, Any] | None = None,
                     label_preservation: str | None = None):
    """A model card for a compressed repo folder, from ``hf_epr/resources/model_card_template.md``.

    ``eval_results`` uses the EPRTrainer's evaluation keys (``eval_accuracy``, ``eval_reference_accuracy``,
    ``eval_mismatch_rate``, ``eval_mismatches``; the ``eval_`` prefix is optional).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    config = EPRCompressedConfig.from_pretrained(folder)
    report = file_size_report(folder)
    results = {k.removeprefix("eval_"): v for k, v in (eval_results or {}).items()}
    rate_lambda = (config.epr or {}).get("rate_lambda")
    architecture = (config.base_config.get("architectures") or ["?"])[0]
    name = repo_id.split("/")[-1] or folder.name
    metrics = [("accuracy", "accuracy", results.get("accuracy")),
               ("reference_accuracy", "reference accuracy", results.get("reference_accuracy")),
               ("mismatch_rate", "label mismatch rate vs reference", results.get("mismatch_rate")),
               ("compressed_bytes", "compressed size (bytes)", report["total_bytes"]),
               ("compression_ratio", "compression ratio vs fp32", round(report["ratio"], 2)),
               ("rate_lambda", "rate lambda", rate_lambda)]
    dataset = (datasets or ["unknown"])[0]
    eval_entries = [EvalResult(task_type="image-classification", dataset_type=dataset, dataset_name=dataset,
                               metric_type=kind, metric_name=label, metric_value=value)
                    for kind, label, value in metrics if value is not None]
    data = ModelCardData(library_name="transformers", base_model=base_model, datasets=datasets,
                         tags=["hf-epr", "compressed", "entropy-coding", "image-classification"],
                         pipeline_tag="image-classification", model_name=name, eval_results=eval_entries)
    return ModelCard.from_template(
        data, template_path=str(TEMPLATE), model_name=name, repo_id=repo_id or "<repo id>", base_model=base_model,
        architecture=architecture, compressed_kb=f"{report['total_bytes'] / 1024:.2f}",
        fp32_kb=f"{report['fp32_bytes'] / 1024:.1f}", ratio=f"{report['ratio']:.1f}",
        accuracy=_fmt(results.get("accuracy"), True), reference_accuracy=_fmt(results.get("reference_accuracy"), True),
        mismatches=_fmt(results.get("mismatches")), mismatch_rate=_fmt(results.get("mismatch_rate"), True),
        rate_lambda=rate_lambda, label_preservation=label_preservation or "n/a", size_rows=report["tensors"])


def push_to_hub(model_or_folder, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                token: str | None = None, processor=None, plot_path: str | None = None,
                eval_results: dict[str, Any] | None = None, base_model: str | None = None,
                datasets: list[str] | None = None, label_preservation: str | None = None):
    """Upload a compressed repo (an EPRModel, or a folder it was saved to) in one commit.

    Only the compressed repo's files are uploaded (``SHARED`` and its code): never fp32 weights or training state.
    A README model card is written unless the folder has one.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        if hasattr(model_or_folder, "save_pretrained") and hasattr(model_or_folder, "bits"):
            model_or_folder.save_pretrained(stage)
        elif os.path.isdir(model_or_folder):
            for path in Path(model_or_folder).iterdir():
                if path.is_file() and _is_shared(path.name):
                    shutil.copy(path, stage / path.name)
        else:
            raise EPRHubError(f"push_to_hub needs an EPRModel or a compressed repo folder, got {model_or_folder!r}")
        if not (stage / WEIGHTS_NAME).is_file():
            raise EPRHubError(f"{model_or_folder} holds no {WEIGHTS_NAME}: save the compressed model first")
        if processor is not None:
            processor.save_pretrained(stage)
        if plot_path:
            shutil.copy(plot_path, stage / "rate_accuracy.png")
        if not (stage / "README.md").is_file():
            build_model_card(stage, repo_id=repo_id, base_model=base_model, datasets=datasets,
                             eval_results=eval_results, label_preservation=label_preservation).save(stage / "README.md")
        files = sorted(p.name for p in stage.iterdir() if _is_shared(p.name))
        report = file_size_report(stage)
        arch = (EPRCompressedConfig.from_pretrained(stage).base_config.get("architectures") or ["model"])[0]
        message = commit_message or (f"Upload EPR-compressed {arch} ({report['total_bytes'] / 1024:.1f} KB, "
                                     f"{report['ratio']:.1f}x smaller than fp32)")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(stage / name)) for name in files]
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=message, token=token)
