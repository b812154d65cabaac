"""Loading a compressed repo as a plain model: without hf_epr, through the Auto classes and pipelines."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import (AutoModel, AutoModelForImageClassification, BertConfig, BertForSequenceClassification,
                          SegformerConfig, SegformerForSemanticSegmentation, YolosConfig, YolosForObjectDetection,
                          pipeline)

from hf_epr import EPRCompressedForImageClassification, EPRConfig, EPRFormatError, EPRModel
from hf_epr.format import WEIGHTS_NAME
from hf_epr.modeling import DENSITY_NAME
from hf_epr.remote_code import BUNDLED_FILES
from hf_epr.testing import TINY_CONFIGS, tiny_inputs, tiny_model, train_a_few_steps

FAMILIES = sorted(TINY_CONFIGS)



@pytest.mark.parametrize("family", FAMILIES)
def test_train_save_load_without_hf_epr(family, tmp_path, no_hf_epr_runner):
    model = EPRModel.from_base(tiny_model(family), EPRConfig(rate_lambda=0.05))
    x = tiny_inputs(family)
    train_a_few_steps(model, x)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", WEIGHTS_NAME, DENSITY_NAME, *BUNDLED_FILES])
    np.save(tmp_path / "x.npy", x.numpy())
    proc = no_hf_epr_runner(f"""
        import numpy as np, torch
        from transformers import AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers.models."), type(m)
        with torch.no_grad():
            out = m(pixel_values=torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).logits
        np.save({str(tmp_path / 'out.npy')!r}, out.numpy())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert (got - expected).abs().max() <= 1e-5
    again = EPRModel.from_pretrained(folder)
    a, b = model.integer_latents(), again.integer_latents()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_plain_loader_in_process_matches(tmp_path):
    model = EPRModel.from_base(tiny_model("regnet"), EPRConfig(raw_dtype="float16"))
    model.eval().save_pretrained(tmp_path)
    plain = EPRCompressedForImageClassification.from_pretrained(tmp_path)
    reloaded = EPRModel.from_pretrained(tmp_path)  # raw tensors are float16 in the file: compare with the file
    x = tiny_inputs("regnet")
    with torch.no_grad():
        assert (plain(pixel_values=x).logits - reloaded(pixel_values=x).logits).abs().max() <= 1e-5
        assert (plain(pixel_values=x).logits - model(pixel_values=x).logits).abs().max() <= 1e-2
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "epr_compressed" and cfg["base_config"]["model_type"] == "regnet"
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}


def test_folder_errors(tmp_path):
    with pytest.raises(EPRFormatError, match="not an hf_epr"):
        EPRModel.from_pretrained(tmp_path)
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig())
    model.save_pretrained(tmp_path / "ok")
    shutil.copytree(tmp_path / "ok", tmp_path / "noweights")
    (tmp_path / "noweights" / WEIGHTS_NAME).unlink()
    with pytest.raises(EPRFormatError):
        EPRCompressedForImageClassification.from_pretrained(tmp_path / "noweights")
    # a file from another model does not load into this one
    other = EPRModel.from_base(tiny_model("regnet"), EPRConfig())
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / WEIGHTS_NAME, tmp_path / "ok" / WEIGHTS_NAME)
    with pytest.raises(EPRFormatError):
        EPRModel.from_pretrained(tmp_path / "ok")
    with pytest.raises(EPRFormatError):
        EPRCompressedForImageClassification.from_pretrained(tmp_path / "ok")


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


def test_pipeline_on_a_compressed_folder(compressed):
    model, folder, _ = compressed
    clf = pipeline("image-classification", model=str(folder), trust_remote_code=True)
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    out = clf(image)
    assert len(out) >= 1 and {"label", "score"} <= set(out[0])


AUTO_CASES = {  # family -> (model, inputs, the Auto classes to load it with besides its own)
    "resnet": (lambda: tiny_model("resnet"), lambda: {"pixel_values": tiny_inputs("resnet")},
               ["AutoModel", "AutoBackbone"]),
    "yolos": (lambda: YolosForObjectDetection(YolosConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=[32, 32],
        patch_size=8, num_detection_tokens=3, num_labels=3)), lambda: {"pixel_values": tiny_inputs("resnet")},
        ["AutoModel"]),
    "segformer": (lambda: SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
        decoder_hidden_size=16, num_labels=3, patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2])),
        lambda: {"pixel_values": tiny_inputs("resnet")}, ["AutoModel"]),
    "bert": (lambda: BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=3)), lambda: {"input_ids": torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))},
        ["AutoModel", "AutoModelForMaskedLM"]),
}


def test_every_auto_class_of_the_base_architecture_loads_without_hf_epr(tmp_path, no_hf_epr_runner):
    """Backbone, detection, segmentation and text models: the repo's auto_map names each Auto class under which
    the base architecture is registered, and each returns that class with the decoded weights."""
    expected, plan = {}, {}
    for name, (build, inputs, others) in AUTO_CASES.items():
        torch.manual_seed(0)
        base = build().eval()
        model = EPRModel.from_base(base, EPRConfig(init_step_ratio=0.05, raw_threshold=16)).eval()
        model.save_pretrained(tmp_path / name)
        auto_map = json.loads((tmp_path / name / "config.json").read_text())["auto_map"]
        own = {"resnet": "AutoModelForImageClassification", "yolos": "AutoModelForObjectDetection",
               "segformer": "AutoModelForSemanticSegmentation", "bert": "AutoModelForSequenceClassification"}[name]
        assert {own, *others} <= set(auto_map), auto_map
        x = inputs()
        torch.save(x, tmp_path / f"{name}-inputs.pt")
        with torch.no_grad():
            expected[name] = model(**x)[0]
        plan[name] = [own, *others]
    proc = no_hf_epr_runner(f"""
        import json, torch, transformers
        plan, out = {plan!r}, {{}}
        for name, autos in plan.items():
            x = torch.load({str(tmp_path)!r} + f"/{{name}}-inputs.pt")
            for auto in autos:
                folder = {str(tmp_path)!r} + "/" + name
                if auto == "AutoBackbone":  # transformers' AutoBackbone takes any folder for a timm name: the class
                    from transformers.dynamic_module_utils import get_class_from_dynamic_module
                    ref = json.load(open(folder + "/config.json"))["auto_map"][auto]
                    m = get_class_from_dynamic_module(ref, folder).from_pretrained(folder)
                else:
                    m = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True)
                out[f"{{name}}/{{auto}}"] = type(m).__name__
                if auto == autos[0]:
                    with torch.no_grad():
                        torch.save(m(**x)[0], {str(tmp_path)!r} + f"/{{name}}-out.pt")
        print(json.dumps(out))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert classes["resnet/AutoModel"] == "ResNetModel" and classes["resnet/AutoBackbone"] == "ResNetBackbone"
    assert classes["yolos/AutoModelForObjectDetection"] == "YolosForObjectDetection"
    assert classes["segformer/AutoModelForSemanticSegmentation"] == "SegformerForSemanticSegmentation"
    assert classes["bert/AutoModel"] == "BertModel" and classes["bert/AutoModelForMaskedLM"] == "BertForMaskedLM"
    for name in AUTO_CASES:
        assert (torch.load(tmp_path / f"{name}-out.pt") - expected[name]).abs().max() <= 1e-5, name


def test_dtype_and_device_map_as_for_any_checkpoint(compressed):
    _, folder, _ = compressed
    half = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float16, device_map="cpu")
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    base = AutoModel.from_pretrained(folder)  # the head model's weights into its base model, as transformers does
    assert type(base).__name__ == "ResNetModel"
