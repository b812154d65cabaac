"""The learned density and the rate terms: exact bits, the noise relaxation and their gradients."""

import pytest
import torch

from hf_epr import EPRConfig, EPRModel
from hf_epr.entropy import FactorizedDensity, noise_bits, rate_bits
from hf_epr.testing import tiny_model


def test_rate_bounds_shortcut_matches_scatter_and_coded_size():
    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(init_step_ratio=0.05))
    model.fit_density(200)
    u, bounds = model._relaxed_latents()
    fast = rate_bits(model.density, u, model._latent_channel, bounds=bounds)
    slow = rate_bits(model.density, u, model._latent_channel)
    assert torch.allclose(fast, slow)
    # after fitting, the density's estimate is close to the real coded latents (histogram tables)
    c = model.to_container()
    assert 0.9 < float(fast.detach()) / sum(g.ideal_bits(c.precision) for g in c.groups) < 1.25


def test_noise_relaxation_tracks_exact_bits():
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.1))
    model.fit_density(200)
    u, bounds = model._relaxed_latents()
    exact = float(rate_bits(model.density, u, model._latent_channel, bounds=bounds).detach())
    torch.manual_seed(0)
    noisy = noise_bits(model.density, u, model._latent_channel, bounds=bounds)
    noisy.backward()
    assert 0.8 < float(noisy.detach()) / exact < 1.3
    assert all(p.grad is not None for p in model.parameter_groups()["latents"])


@pytest.mark.parametrize("scale,min_corr", [(3.0, 0.99), (900.0, 0.85)])  # unit bins (shared edges); wide bins
def test_noise_bits_interpolates_the_exact_noisy_bits(scale, min_corr):
    """The tabulated, interpolated rate equals -log2 P(cell) at the noisy values, and its gradient is the slope."""
    torch.manual_seed(0)
    density = FactorizedDensity(1, init_scales=torch.tensor([scale]))
    u = (torch.randn(4000) * scale / 3).requires_grad_()
    channel = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(1)
    fast = noise_bits(density, u, channel)
    fast.backward()
    torch.manual_seed(1)
    v = u.detach().clone().requires_grad_()
    y = v + torch.empty_like(v).uniform_(-0.5, 0.5)  # the same noise draw as inside noise_bits
    exact = density.neg_log2_pmf(y.view(1, -1)).sum()
    exact.backward()
    assert float(fast.detach()) == pytest.approx(float(exact.detach()), rel=2e-3)
    assert torch.corrcoef(torch.stack([u.grad, v.grad]))[0, 1] > min_corr  # piecewise-linear vs exact slope
