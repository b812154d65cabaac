"""EPRModel: wrapping reproduces the base model, bits are differentiable, from_pretrained is exact."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hf_epr.format.latents
import hf_epr.modeling
from transformers import AutoModelForImageClassification, ConvNextConfig, ViTConfig

from hf_epr import EPRConfig, EPRConfigError, EPRModel
from hf_epr.format import WEIGHTS_NAME
from hf_epr.modeling import DENSITY_NAME
from hf_epr.testing import TINY_CONFIGS, tiny_inputs, tiny_model, train_a_few_steps

FAMILIES = sorted(TINY_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_reproduces_base(family):
    base = tiny_model(family)
    x = tiny_inputs(family, n=64)
    with torch.no_grad():
        ref = base(pixel_values=x).logits
        out = EPRModel.from_base(copy.deepcopy(base)).eval()(pixel_values=x).logits
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-3, f"{family}: relative logit error {rel:.2e}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.999


def test_decoders_parameters_are_one_tensor_that_each_decoder_views():
    """One optimizer entry and one gradient for every decoder's parameters: each tensor's are a slice of the model's
    one tensor, in order; a copy of the model views its own."""
    model = EPRModel.from_base(tiny_model("resnet"))
    flat = model.decoder_parameters.flat
    assert model.parameter_groups()["decoders"] == [flat]
    assert flat.numel() == sum(e.kind.num_params for e in model.entries) > len(model.entries)
    assert torch.equal(torch.cat([e.decoder.params for e in model.entries]), flat)
    assert all(e.decoder.params.data_ptr() == flat[e.decoder.offset:].data_ptr() for e in model.entries)
    assert sum(1 for name, _ in model.named_parameters() if "decoder" in name) == 1
    twin = copy.deepcopy(model)
    assert twin.entries[0].decoder.params.data_ptr() == twin.decoder_parameters.flat.data_ptr() != flat.data_ptr()


def test_from_pretrained_exact_and_resave_identical(tmp_path):
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(rate_lambda=0.1))
    train_a_few_steps(model, tiny_inputs("resnet"), steps=3)
    model.save_pretrained(tmp_path / "a")
    again = EPRModel.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    x = tiny_inputs("resnet")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, again(pixel_values=x).logits)


def test_from_pretrained_latents_take_over_the_decoded_memory_exactly(tmp_path, monkeypatch):
    model = EPRModel.from_base(tiny_model("vit"), EPRConfig(rate_lambda=0.1, init_step_ratio=0.05))
    train_a_few_steps(model, tiny_inputs("vit"), steps=3)
    model.save_pretrained(tmp_path)
    decoded = []  # the address range of the decoded integers

    def spy(*args, **kwargs):
        groups = hf_epr.format.latents.decode_latents(*args, **kwargs)
        decoded[:] = [min(g.ctypes.data for g in groups), max(g.ctypes.data + g.nbytes for g in groups)]
        return groups

    with monkeypatch.context() as m:
        m.setattr(hf_epr.modeling, "decode_latents", spy)
        adopted = EPRModel.from_pretrained(tmp_path)
    with monkeypatch.context() as m:  # every latent written into its own memory, as before
        m.setattr(hf_epr.modeling, "adopts_decoded_memory", lambda *args: False)
        copied = EPRModel.from_pretrained(tmp_path)
    kinds = {e.kind.name for e in adopted.entries}
    assert kinds == {"affine", "dct"}  # both paths in one load (dct latents keep their own memory)
    for a, c in zip(adopted.entries, copied.entries):
        assert torch.equal(a.latent, c.latent) and torch.equal(a.decoder.params, c.decoder.params), a.name
        inside = decoded[0] <= a.latent.data_ptr() < decoded[1]  # the latent is its decoded integers' memory
        assert inside == (a.kind.name == "affine"), a.name
    ints_a, ints_c = adopted.integer_latents(), copied.integer_latents()
    assert ints_a.keys() == ints_c.keys() and all(torch.equal(ints_a[k], ints_c[k]) for k in ints_a)
    x = tiny_inputs("vit")
    with torch.no_grad():
        assert torch.equal(adopted.eval()(pixel_values=x).logits, copied.eval()(pixel_values=x).logits)
    adopted.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS_NAME).read_bytes() == (tmp_path / WEIGHTS_NAME).read_bytes()
    train_a_few_steps(adopted, tiny_inputs("vit"), steps=2)  # the adopted memory trains like any parameter
    assert all(torch.isfinite(e.latent).all() for e in adopted.entries)


def test_bits_differentiable_and_rate_gradient_shrinks_latents():
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig())
    bits = model.bits()
    assert bits.ndim == 0 and bits.requires_grad
    bits.backward()
    groups = model.parameter_groups()
    assert all(p.grad is not None for p in groups["latents"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["density"])
    # rate only: the estimate must fall when we follow its gradient
    opt = torch.optim.Adam(groups["latents"] + groups["decoders"] + groups["density"], lr=5e-2)
    start = float(model.bits().detach())
    for _ in range(30):
        opt.zero_grad()
        model.bits().backward()
        opt.step()
    assert float(model.bits().detach()) < 0.9 * start


def test_from_base_rejects_what_it_cannot_wrap():
    with pytest.raises(EPRConfigError):
        EPRModel.from_base(torch.nn.Linear(3, 3))
    with pytest.raises(EPRConfigError):
        EPRModel.from_base(tiny_model("resnet"), {"rate_lambda": 1.0})


ROBUST_CASES = {  # random-init models with constant tensors: zero biases, unit norms, layer_scale = 1e-6
    "convnext": (lambda: ConvNextConfig(num_stages=2, hidden_sizes=[32, 64], depths=[1, 1], num_labels=10), 64),
    "vit": (lambda: ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, num_labels=10), 32),
}


@pytest.mark.parametrize("family", sorted(ROBUST_CASES))
def test_random_init_trains_with_finite_loss_and_falling_bits(family):
    config, size = ROBUST_CASES[family]
    torch.manual_seed(0)
    base = AutoModelForImageClassification.from_config(config())
    with torch.no_grad():  # and two more hard cases: an all-zero tensor and one with a huge dynamic range
        base.classifier.weight.zero_()
        outliers = next(p for n, p in base.named_parameters() if n.endswith("weight") and p.ndim == 2 and p.numel() > 512)
        outliers.view(-1)[:3] = torch.tensor([1e3, -1e3, 5e2])
    model = EPRModel.from_base(base, EPRConfig(rate_lambda=0.5)).train()
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    groups = model.parameter_groups()
    opt = torch.optim.Adam([{"params": groups["latents"] + groups["raw"], "lr": 1e-3},
                            {"params": groups["decoders"], "lr": 2e-2}, {"params": groups["density"], "lr": 1e-2}])
    bits = [model.exact_bits()]
    for _ in range(20):
        opt.zero_grad()
        out, relaxed = model(pixel_values=x, labels=y, return_bits=True)
        loss = out.loss + 0.5 * relaxed / model.num_compressed_parameters
        assert torch.isfinite(loss) and torch.isfinite(relaxed)
        loss.backward()
        opt.step()
        bits.append(model.exact_bits())
    assert all(math.isfinite(b) for b in bits) and max(bits) <= 1.05 * bits[0] and bits[-1] < 0.98 * bits[0], bits


def test_from_pretrained_restores_the_density_without_refitting(tmp_path, monkeypatch):
    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(rate_lambda=0.1, init_step_ratio=0.05))
    train_a_few_steps(model, tiny_inputs("convnext"), steps=4)
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(EPRModel, "fit_density", lambda *a, **k: pytest.fail("refitted"))
    again = EPRModel.from_pretrained(tmp_path)
    assert again.exact_bits() == model.exact_bits()
    with torch.no_grad():
        assert torch.equal(again.eval().bits(), model.eval().bits())
        assert all(torch.equal(a, b) for a, b in zip(again.density.parameters(), model.density.parameters()))


def test_repos_saved_without_a_density_refit_it(tmp_path):
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.05))
    model.save_pretrained(tmp_path)
    (tmp_path / DENSITY_NAME).unlink()
    again = EPRModel.from_pretrained(tmp_path)
    c = again.to_container()
    assert 0.9 < again.exact_bits() / sum(g.entropy_bits(c.precision) for g in c.groups) < 1.25


def test_input_embeddings_of_text_models_and_none_for_vision_models():
    from transformers import BertConfig, BertForSequenceClassification

    vision = EPRModel.from_base(tiny_model("resnet"))
    assert vision.get_input_embeddings() is None  # accelerate's FSDP2 preparation asks every model
    text = EPRModel.from_base(BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)))
    assert text.get_input_embeddings() is text.model.bert.embeddings.word_embeddings
