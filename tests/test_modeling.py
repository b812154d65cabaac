"""EPRModel: wrapping reproduces the base model, bits are differentiable, from_pretrained is exact."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_epr import EPRConfig, EPRConfigError, EPRModel
from hf_epr.format import WEIGHTS_NAME
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
