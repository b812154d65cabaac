"""Sharing: one-commit push of exactly the compressed repo, and model cards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from hf_epr import EPRConfig, EPRModel
from hf_epr.format import WEIGHTS_NAME
from hf_epr.hub import build_model_card, push_to_hub
from hf_epr.modeling import DENSITY_NAME
from hf_epr.remote_code import BUNDLED_FILES
from hf_epr.testing import mnist_reference, tiny_inputs


EVAL = {"eval_accuracy": 0.97, "eval_reference_accuracy": 0.975, "eval_mismatch_rate": 0.012, "eval_mismatches": 12}



@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Intercept the upload boundary: write what create_commit received into a folder."""
    sent = {"dir": tmp_path / "uploaded", "calls": []}

    def create_commit(self, repo_id, operations, commit_message, **kw):
        sent["calls"].append((repo_id, commit_message))
        sent["dir"].mkdir(exist_ok=True)
        for op in operations:
            shutil.copy(op.path_or_fileobj, sent["dir"] / op.path_in_repo)
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return sent


def test_push_uploads_exactly_the_compressed_repo(compressed, hub, tmp_path, no_hf_epr_runner):
    model, folder, processor = compressed
    (folder / "model.safetensors").write_bytes(b"fp32 weights must stay home")
    (folder / "optimizer.pt").write_bytes(b"training state")
    push_to_hub(folder, "me/tiny-epr", eval_results=EVAL)
    assert len(hub["calls"]) == 1 and "EPR-compressed" in hub["calls"][0][1]
    files = sorted(p.name for p in hub["dir"].iterdir())
    assert files == sorted(["README.md", "config.json", WEIGHTS_NAME, DENSITY_NAME, "preprocessor_config.json", *BUNDLED_FILES])
    x = tiny_inputs("resnet")
    np.save(tmp_path / "x.npy", x.numpy())
    proc = no_hf_epr_runner(f"""
        import numpy as np, torch
        from transformers import AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained({str(hub['dir'])!r}, trust_remote_code=True)
        with torch.no_grad():
            np.save({str(tmp_path / 'out.npy')!r}, m(pixel_values=torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).logits.numpy())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        assert np.abs(np.load(tmp_path / "out.npy") - model(pixel_values=x).logits.numpy()).max() <= 1e-5


def test_model_push_to_hub_method(compressed, hub):
    model, _, _ = compressed
    model.push_to_hub("me/tiny-epr-2", commit_message="hello")
    assert hub["calls"] == [("me/tiny-epr-2", "hello")]
    assert (hub["dir"] / WEIGHTS_NAME).is_file() and not (hub["dir"] / "model.safetensors").exists()


def test_model_card_roundtrip(compressed, tmp_path):
    _, folder, _ = compressed
    card = build_model_card(folder, repo_id="me/tiny-epr", base_model="microsoft/resnet-18", datasets=["mnist"],
                            eval_results=EVAL, label_preservation="auto")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers" and "hf-epr" in loaded.data.tags
    values = {r.metric_type: r.metric_value for r in loaded.data.eval_results}
    assert values["accuracy"] == EVAL["eval_accuracy"] and values["mismatch_rate"] == EVAL["eval_mismatch_rate"]
    assert values["compressed_bytes"] == (folder / WEIGHTS_NAME).stat().st_size
    assert "trust_remote_code=True" in loaded.text and "| `resnet.embedder" in loaded.text


def test_trainer_push_to_hub(hub, tmp_path):
    from hf_epr.trainer import EPRTrainer, EPRTrainingArguments
    from hf_epr.testing import mnist_subset

    teacher = mnist_reference(steps=20)
    model = EPRModel.from_base(mnist_reference(steps=20), EPRConfig(rate_lambda=1.0, init_step_ratio=1 / 64))
    args = EPRTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, report_to=[], save_strategy="no",
                                disable_tqdm=True, use_cpu=True)
    trainer = EPRTrainer(model=model, reference_model=teacher, args=args, train_dataset=mnist_subset(512),
                         eval_dataset=mnist_subset(500, "test"))
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub(commit_message="end of training")
    files = sorted(p.name for p in hub["dir"].iterdir())
    assert files == sorted(["README.md", "config.json", WEIGHTS_NAME, DENSITY_NAME, "lenet.py", *BUNDLED_FILES])  # LeNet travels
    card = ModelCard.load(hub["dir"] / "README.md")
    evals = [h for h in trainer.state.log_history if "eval_coded_bytes" in h][-1]
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["accuracy"] == evals["eval_accuracy"] and values["compressed_bytes"] == evals["eval_coded_bytes"]


def test_card_template_is_package_data():
    """The template ships inside the package (an installed wheel has no model_cards/ folder)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import hf_epr
    from hf_epr.hub import TEMPLATE

    package = Path(hf_epr.__file__).parent
    assert TEMPLATE.is_file() and TEMPLATE.is_relative_to(package)
    patterns = tomllib.loads((package.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = TEMPLATE.relative_to(package).as_posix()
    assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns["hf_epr"])
