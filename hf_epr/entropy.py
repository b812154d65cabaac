"""Learned factorized density over integer latents (Ballé et al. 2018), its bit cost and its tables."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .codec import quantize_pmf

LN2 = math.log(2.0)


def _pass_through_max(x: torch.Tensor, bound: float) -> torch.Tensor:
    """min(x, bound) in value, identity in gradient (keeps the rate gradient alive in the tails)."""
    return x - (x - bound).clamp(min=0).detach()


class FactorizedDensity(nn.Module):
    """One univariate density per channel: a monotone network gives the CDF logits c(x).

    p(n) = sigmoid(c(n + 1/2)) - sigmoid(c(n - 1/2)), computed in log space so that latents far in the
    tails still receive a rate gradient.
    """

    def __init__(self, channels: int, init_scales: torch.Tensor | None = None, filters: tuple[int, ...] = (3, 3, 3)):
        super().__init__()
        dims = (1, *filters, 1)
        scales = torch.ones(channels) if init_scales is None else init_scales.float().clamp(min=1.0)
        k = len(filters) + 1
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(k):
            # softplus(H) * x with H initialized so the CDF spans about [-scale, scale] at start
            init = torch.log(torch.expm1(1.0 / scales.pow(1.0 / k) / dims[i + 1]))
            self.matrices.append(nn.Parameter(init.view(-1, 1, 1).expand(channels, dims[i + 1], dims[i]).clone()))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1) - 0.5))
            if i < k - 1:
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))

    @property
    def channels(self) -> int:
        return self.matrices[0].shape[0]

    def cdf_logits(self, x: torch.Tensor, channel: torch.Tensor | None = None) -> torch.Tensor:
        """c(x) for x of shape (channels, M), or for x of shape (K, M) with one channel index per row."""
        h = x.unsqueeze(1)
        for i, (m, b) in enumerate(zip(self.matrices, self.biases)):
            f = self.factors[i] if i < len(self.factors) else None
            if channel is not None:
                m, b, f = m[channel], b[channel], (f[channel] if f is not None else None)
            h = torch.matmul(F.softplus(m), h) + b
            if f is not None:
                h = h + torch.tanh(f) * torch.tanh(h)
        return h.squeeze(1)

    def log_pmf(self, y: torch.Tensor, channel: torch.Tensor | None = None) -> torch.Tensor:
        """Natural log of the probability of integer (or relaxed) values y, shape (channels, M)
        (or (K, M) with ``channel`` giving each row's channel)."""
        lower = self.cdf_logits(y - 0.5, channel)
        upper = self.cdf_logits(y + 0.5, channel)
        s = -torch.sign(lower + upper).detach()
        s = torch.where(s == 0, torch.ones_like(s), s)
        a, b = F.logsigmoid(s * lower), F.logsigmoid(s * upper)
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return hi + torch.log(-torch.expm1(_pass_through_max(lo - hi, -1e-12)))

    def neg_log2_pmf(self, y: torch.Tensor, channel: torch.Tensor | None = None) -> torch.Tensor:
        """Bits of values y (shapes as in ``log_pmf``)."""
        return -self.log_pmf(y, channel) / LN2

    def integer_counts(self, channel: int, lo: int, hi: int, precision: int) -> np.ndarray:
        """The quantized table of one channel over [lo, hi] plus the escape symbol (tail mass)."""
        with torch.no_grad():
            y = torch.arange(lo, hi + 1, dtype=torch.float32).expand(self.channels, -1)
            p = torch.exp(self.log_pmf(y)[channel]).double().numpy()
        p = np.nan_to_num(p, nan=0.0)
        return quantize_pmf(np.append(p, max(0.0, 1.0 - p.sum())), precision)


def histogram(u: torch.Tensor, channel: torch.Tensor, channels: int, max_range: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grid, counts, index) of round(u) per channel; the grid spans the values with one spare each side."""
    r = torch.round(u.detach()).clamp(-max_range, max_range).long()
    lo, hi = int(r.min()), int(r.max())
    m = hi - lo + 3
    grid = torch.arange(lo - 1, hi + 2, dtype=u.dtype, device=u.device).expand(channels, m)
    idx = channel * m + (r - lo + 1)
    counts = torch.bincount(idx, minlength=channels * m).view(channels, m).to(u.dtype)
    return grid, counts, idx


def grid_bits(density: FactorizedDensity, u: torch.Tensor, channel: torch.Tensor, max_range: int) -> torch.Tensor:
    """Bits of round(u) under ``density``; gradient to u by a central difference (straight-through).

    ``u`` is a flat tensor of relaxed latents (integer units), ``channel`` its density channel. The
    density is evaluated once per integer on the range the latents span, not once per latent.
    """
    r = torch.round(u.detach()).clamp(-max_range, max_range).long()
    if (int(r.max()) - int(r.min()) + 3) * density.channels > 2 * r.numel():
        return _sparse_bits(density, u, r, channel)
    grid, counts, idx = histogram(u, channel, density.channels, max_range)
    f = density.neg_log2_pmf(grid)  # (C, m)
    slope = torch.zeros_like(f)
    slope[:, 1:-1] = (f[:, 2:] - f[:, :-2]).detach() / 2
    return (counts * f).sum() + ((u - u.detach()) * slope.view(-1)[idx]).sum()


def _sparse_bits(density: FactorizedDensity, u: torch.Tensor, r: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """``grid_bits`` for latents spread thinly over a wide range: the density is evaluated only at the
    distinct (channel, value) pairs and their neighbours."""
    span = 2 * int(r.abs().max()) + 3
    keys, inverse, counts = torch.unique(channel * span + r, return_inverse=True, return_counts=True)
    ch, val = keys // span, keys % span
    val = torch.where(val > span // 2, val - span, val).to(u.dtype)
    f = density.neg_log2_pmf(torch.stack([val - 1, val, val + 1], dim=1), ch)  # (K, 3)
    slope = ((f[:, 2] - f[:, 0]) / 2).detach()
    return (counts.to(f.dtype) * f[:, 1]).sum() + ((u - u.detach()) * slope[inverse]).sum()


def noise_bits(density: FactorizedDensity, u: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """Bits of u + U(-1/2, 1/2) under ``density`` (the uniform-noise relaxation)."""
    y = u + torch.empty_like(u).uniform_(-0.5, 0.5)
    total = u.new_zeros(())
    for c in range(density.channels):
        sel = y[channel == c]
        if sel.numel():
            f = density.neg_log2_pmf(sel.expand(density.channels, -1))[c]
            total = total + f.sum()
    return total
