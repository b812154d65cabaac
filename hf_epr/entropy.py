"""Learned factorized density over integer latents (Ballé et al. 2018), its bit cost and its tables."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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
        generator = torch.Generator().manual_seed(0)  # deterministic, whatever the global RNG state
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(k):
            # softplus(H) * x with H initialized so the CDF spans about [-scale, scale] at start
            init = torch.log(torch.expm1(1.0 / scales.pow(1.0 / k) / dims[i + 1]))
            self.matrices.append(nn.Parameter(init.view(-1, 1, 1).expand(channels, dims[i + 1], dims[i]).clone()))
            self.biases.append(nn.Parameter(torch.rand(channels, dims[i + 1], 1, generator=generator) - 0.5))
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

    def log_prob_between(self, lower: torch.Tensor, upper: torch.Tensor,
                         channel: torch.Tensor | None = None) -> torch.Tensor:
        """log P(lower < x < upper) per element: shapes (channels, M), or (K, M) with ``channel`` per row."""
        c = self.cdf_logits(torch.cat([lower, upper], dim=-1), channel)
        return self.log_prob_from_logits(*c.chunk(2, dim=-1))

    @staticmethod
    def log_prob_from_logits(lo_logit: torch.Tensor, up_logit: torch.Tensor) -> torch.Tensor:
        """log(sigmoid(up_logit) - sigmoid(lo_logit)), stable in both tails."""
        s = -torch.sign(lo_logit + up_logit).detach()  # work in the tail where sigmoid is small
        s = torch.where(s == 0, torch.ones_like(s), s)
        a, b = F.logsigmoid(s * lo_logit), F.logsigmoid(s * up_logit)
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return hi + torch.log(-torch.expm1(_pass_through_max(lo - hi, -1e-12)))

    def neg_log2_pmf(self, y: torch.Tensor, channel: torch.Tensor | None = None) -> torch.Tensor:
        """Bits of integer (or relaxed) values y: -log2 P(y - 1/2 < x < y + 1/2)."""
        return -self.log_prob_between(y - 0.5, y + 0.5, channel) / LN2


def _channel_bins(u: torch.Tensor, channel: torch.Tensor, n_ch: int, max_bins: int,
                  bounds: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per channel: lowest rounded value ``lo``, bin width ``step`` (1 unless the channel spans > max_bins
    values), and the common number of bins ``m`` (with a spare bin each side). ``bounds``: the rounded
    values' (min, max) per channel, when the caller has them (then ``u`` is not scanned)."""
    if bounds is None:
        r = torch.round(u.detach()).long()
        empty = torch.zeros(n_ch, dtype=torch.long, device=r.device)
        lo = empty.scatter_reduce(0, channel, r, "amin", include_self=False)
        hi = empty.scatter_reduce(0, channel, r, "amax", include_self=False)
    else:
        lo, hi = bounds
    step = torch.div(hi - lo + max_bins, max_bins, rounding_mode="floor")  # ceil(width / max_bins)
    m = int(torch.div(hi - lo, step, rounding_mode="floor").max()) + 3
    return lo, step, m


def _bin_bits(density: FactorizedDensity, centers: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Bits of one integer at each center (C, M): -log2 P(center +- step/2) + log2 step."""
    half = (step.to(centers.dtype) / 2).unsqueeze(1)
    return -density.log_prob_between(centers - half, centers + half) / LN2 + torch.log2(2 * half)


def rate_bits(density: FactorizedDensity, u: torch.Tensor, channel: torch.Tensor, max_bins: int = 512,
              bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Bits of round(u) under ``density``, with a straight-through gradient to u (central difference).

    ``u`` is a flat tensor of relaxed latents (integer units), ``channel`` the density channel of each.
    Latents are histogrammed per channel and the density is evaluated once per histogram bin, so the
    cost is O(latents) plus O(channels x max_bins). A channel whose values span more than ``max_bins``
    integers uses bins of s integers, each integer priced at P(bin) / s; narrower channels are exact.
    ``bounds`` = (min, max) of round(u) per channel, when the caller has them cheaper than a scatter.
    """
    r = torch.round(u.detach()).long()
    n_ch = density.channels
    lo, step, m = _channel_bins(u, channel, n_ch, max_bins, bounds)
    # bin j of channel c covers [lo + (j-1) * step, lo + j * step - 1]
    bins = torch.arange(m, device=lo.device).unsqueeze(0)
    centers = (lo - step).unsqueeze(1) + bins * step.unsqueeze(1) + (step.unsqueeze(1) - 1) / 2
    f = _bin_bits(density, centers.to(u.dtype), step)
    idx = channel * m + torch.div(r - lo[channel], step[channel], rounding_mode="floor") + 1
    counts = torch.bincount(idx, minlength=n_ch * m).view(n_ch, m).to(f.dtype)
    slope = torch.zeros_like(f)
    slope[:, 1:-1] = (f[:, 2:] - f[:, :-2]).detach() / (2 * step.unsqueeze(1))
    return (counts * f).sum() + ((u - u.detach()) * slope.view(-1)[idx]).sum()


def noise_bits(density: FactorizedDensity, u: torch.Tensor, channel: torch.Tensor, max_bins: int = 512,
               bounds: tuple[torch.Tensor, torch.Tensor] | None = None, resolution: int = 4) -> torch.Tensor:
    """Bits of u + U(-1/2, 1/2) under ``density`` (the uniform-noise relaxation of Ballé et al.).

    The per-value bits are tabulated per channel on a grid ``resolution`` times finer than the bins of
    ``rate_bits`` and interpolated linearly, so the cost stays O(latents) + O(channels x bins x resolution).
    """
    n_ch = density.channels
    lo, step, m = _channel_bins(u, channel, n_ch, max_bins, bounds)
    h = step.to(u.dtype) / resolution  # grid spacing per channel
    points = (m + 1) * resolution
    origin = (lo - step).to(u.dtype) - 1  # below every noisy value
    uniform = bool((step == step[0]).all())  # the usual case: every channel on the same grid spacing
    if uniform and int(step[0]) == 1:  # cells [t - 1/2, t + 1/2] share edges: one CDF evaluation per edge
        edges = (origin - 0.5).unsqueeze(1) + torch.arange(points + resolution, dtype=u.dtype,
                                                            device=u.device).unsqueeze(0) / resolution
        c = density.cdf_logits(edges)
        f = -density.log_prob_from_logits(c[:, :points], c[:, resolution:]).reshape(-1) / LN2
    else:  # bits of an integer-wide cell at each grid point t
        grid = origin.unsqueeze(1) + torch.arange(points, dtype=u.dtype, device=u.device).unsqueeze(0) * h.unsqueeze(1)
        f = _bin_bits(density, grid, torch.ones_like(step)).reshape(-1)
    # position of each noisy value on its channel's grid: t = k + w, k integer, 0 <= w < 1
    inv_h = (1 / h[0]) if uniform else (1 / h)[channel]
    y = u.detach() + torch.empty_like(u).uniform_(-0.5, 0.5)
    pos = (y - origin[channel]).mul_(inv_h).clamp_(0, points - 1.001)
    k = pos.floor()
    w = pos.sub_(k)
    base = k.long().add_(channel * points)
    # value: sum_i f[base_i] (1 - w_i) + f[base_i + 1] w_i, with the weight of every grid point gathered by
    # bincount (deterministic, unlike indexing's backward on CPU): counts - s + s shifted by one point
    s = torch.bincount(base, w, minlength=f.numel())
    weight = torch.bincount(base, minlength=f.numel()).to(s.dtype) - s
    weight[1:] += s[:-1]
    # gradient to u: the slope of the interpolation (per grid unit, times grid points per latent unit)
    df = (f[1:] - f[:-1]).detach()
    return (f * weight.to(f.dtype)).sum() + _with_gradient(u, df[base].mul_(inv_h))


class _WithGradient(torch.autograd.Function):
    """Zero in value; d/du = ``grad`` (a precomputed, detached per-element gradient)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return u.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None


def _with_gradient(u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero whose gradient to ``u`` is ``grad`` (instead of sum((u - u.detach()) * grad))."""
    return _WithGradient.apply(u, grad)
