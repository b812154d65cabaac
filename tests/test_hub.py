"""Sharing: one-commit push of exactly the compressed repo, loading with and without hf_epr, model card, pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForImageClassification, ViTImageProcessorPil, pipeline

from conftest import tiny_inputs, tiny_model
from hf_epr import EPRConfig, EPRModel
from hf_epr.hub import build_model_card, push_to_hub
from hf_epr.loader import WEIGHTS_NAME

EVAL = {"eval_accuracy": 0.97, "eval_reference_accuracy": 0.975, "eval_mismatch_rate": 0.012, "eval_mismatches": 12}


@pytest.fixture
def compressed(tmp_path):
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.05)).eval()
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return model, folder, processor


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
    assert files == sorted(["README.md", "config.json", WEIGHTS_NAME, "epr_loader.py", "preprocessor_config.json"])
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


def test_loading_without_remote_code_when_hf_epr_is_installed(compressed):
    model, folder, _ = compressed
    plain = AutoModelForImageClassification.from_pretrained(folder)  # hf_epr registered its Auto classes
    remote = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
    assert type(plain).__name__ == "ResNetForImageClassification"
    x = tiny_inputs("resnet")
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=x).logits, remote(pixel_values=x).logits)


def test_without_hf_epr_and_without_remote_code_fails_loudly(compressed, no_hf_epr_runner):
    _, folder, _ = compressed
    proc = no_hf_epr_runner(f"""
        from transformers import AutoModelForImageClassification
        AutoModelForImageClassification.from_pretrained({str(folder)!r})
    """)
    assert proc.returncode != 0 and "trust_remote_code" in proc.stderr


def test_unknown_quant_method_is_silently_ignored_by_transformers(tmp_path):
    """Why the repo is not a 'quantization_config' checkpoint: transformers would load random weights."""
    model = tiny_model("resnet")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "epr"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)  # no error about 'epr' at all
    assert getattr(loaded, "hf_quantizer", None) is None
    assert type(loaded).__name__ == "ResNetForImageClassification"


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


def test_pipeline_on_a_compressed_folder(compressed):
    model, folder, _ = compressed
    clf = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    out = clf(image)
    assert len(out) >= 1 and {"label", "score"} <= set(out[0])


def test_trainer_push_to_hub(hub, tmp_path):
    from test_trainer import make_trainer, reference

    trainer = make_trainer(reference(steps=20), tmp_path / "run", steps=4)
    trainer.train()
    trainer.evaluate()
    trainer.push_to_hub(commit_message="end of training")
    files = sorted(p.name for p in hub["dir"].iterdir())
    assert files == sorted(["README.md", "config.json", WEIGHTS_NAME, "epr_loader.py"])
    card = ModelCard.load(hub["dir"] / "README.md")
    evals = [h for h in trainer.state.log_history if "eval_coded_bytes" in h][-1]
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["accuracy"] == evals["eval_accuracy"] and values["compressed_bytes"] == evals["eval_coded_bytes"]
