"""Learned factorized density over integer latents (Ballé et al. 2018) and the bit cost of the latents under it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .format.decoders import DecoderKind
from .format.errors import EPRError


LN2 = math.log(2.0)
MAX_CELLS = 256  # cells per channel of the rate's grid, above which its resolution is lowered
DIVERGED = ("the latents or step sizes are not finite: training diverged (lower the learning rates or rate_lambda, "
            "or resume from an earlier checkpoint)")


def integers_per_bin(lo: torch.Tensor, hi: torch.Tensor, max_bins: int) -> torch.Tensor:
    """Per channel: ceil((hi - lo + 1) / max_bins), the integers one bin holds so that a channel spanning the rounded
    values lo..hi needs at most ``max_bins`` bins (1 for all but very wide channels)."""
    return torch.div(hi - lo + max_bins, max_bins, rounding_mode="floor")


def unit_window_bits(density: "FactorizedDensity", edges: torch.Tensor, count: int, r: int) -> torch.Tensor:
    """(C, count) bits of unit-wide windows that share their edges: window i spans ``edges[:, i]`` to
    ``edges[:, i + r]`` (edges 1 / r apart, ``count + r`` per channel): one CDF evaluation per edge."""
    c = density.cdf_logits(edges)
    return -density.log_prob_from_logits(c[:, :count], c[:, r: r + count]) / LN2


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


class LatentTensor(NamedTuple):
    """One compressed tensor as the rate sees it: its latent (weight units), decoder kind, and per-group log step
    sizes and shifts (None for kinds without shifts). Its groups are consecutive density channels."""

    z: torch.Tensor
    kind: DecoderKind
    log_step: torch.Tensor
    shift: torch.Tensor | None


@dataclass
class LatentHistogram:
    """Where every latent falls on a per-channel grid of cells in integer units (``units = (z - shift) / step``).

    Channel c's bins hold ``width[c]`` integers each (1 unless the channel spans more than ``max_bins`` values), and
    each bin is cut into ``resolution`` cells; cell k covers ``origin[c] + [k, k + 1) * width[c] / resolution``.
    """

    counts: torch.Tensor  # (C, K) latents per cell
    index: torch.Tensor  # (N,) int32: the flat cell (c * K + k) of every latent, in tensor order
    origin: torch.Tensor  # (C,) float64
    width: torch.Tensor  # (C,) float64
    step: torch.Tensor  # (C,) float64, the step sizes the grid was built with
    resolution: int
    unit_bins: bool  # every channel has bins of one integer

    @property
    def cells(self) -> int:
        return self.counts.shape[1]

    def centers(self) -> torch.Tensor:
        """(C, K) float32: each cell's center in integer units."""
        k = torch.arange(self.cells, dtype=torch.float64, device=self.origin.device) + 0.5
        return (self.origin[:, None] + k[None, :] * (self.width / self.resolution)[:, None]).float()


@torch.no_grad()
def latent_histogram(tensors: Sequence[LatentTensor], resolution: int = 1, max_bins: int = 512) -> LatentHistogram:
    """Histogram every latent on its channel's grid: one pass over each tensor for its bounds, one or two to place
    it, one conversion and one ``bincount`` over all latents. The grid spans each channel's rounded values with a
    spare bin on each side, so every latent lands inside its own channel. ``resolution`` (1, 2 or 4 cells per bin)
    is halved while the grid would exceed ``MAX_CELLS`` cells per channel: channels that wide are smooth at the
    scale of one integer."""
    log_step = torch.cat([t.log_step.detach() for t in tensors]).double()
    shift = torch.cat([t.shift.detach() if t.shift is not None else torch.zeros_like(t.log_step) for t in tensors])
    step, shift = log_step.exp(), shift.double()
    requested = resolution
    bounds = [t.kind.group_bounds(t.z.detach()) for t in tensors]
    lo = torch.round((torch.cat([b[0] for b in bounds]).double() - shift) / step)
    hi = torch.round((torch.cat([b[1] for b in bounds]).double() - shift) / step)
    width = integers_per_bin(lo, hi, max_bins)
    channels = lo.numel()
    origin = lo - width - 0.5  # cell 0 starts half an integer below the spare bin
    scale = resolution / (width * step)  # cells per weight unit
    offset = (-shift / step - origin) * resolution / width  # the cell of z = 0, before the channel's offset
    # one host sync for the grid's size, and the scalars of one-group tensors (multiplied by Python floats)
    host = torch.cat([torch.stack([torch.floor((hi - lo) / width).max(), (width > 1).any().double()]), scale, offset])
    host = host.tolist()
    if not all(math.isfinite(v) for v in host):
        raise EPRError(DIVERGED)
    bins = int(host[0]) + 3  # the widest channel's bins plus a spare bin each side
    while resolution > 1 and bins * resolution > MAX_CELLS:  # wide channels are smooth at the integer scale
        resolution //= 2
    cells = bins * resolution
    scale, offset = scale * resolution / requested, offset * resolution / requested
    host_scale = [v * resolution / requested for v in host[2: 2 + channels]]
    host_offset = [v * resolution / requested for v in host[2 + channels:]]
    position = torch.empty(sum(t.z.numel() for t in tensors), dtype=torch.float32, device=lo.device)
    start = first = 0
    for t in tensors:
        g, n = t.kind.num_groups, t.z.numel()
        out, z = position[start: start + n].view(t.z.shape), t.z.detach().float()
        if g == 1:
            torch.mul(z, host_scale[first], out=out).add_(host_offset[first] + first * cells)
        else:
            channel_start = torch.arange(first, first + g, device=lo.device, dtype=torch.float64) * cells
            b = (offset[first: first + g] + channel_start).float()
            torch.addcmul(t.kind.group_view(b), z, t.kind.group_view(scale[first: first + g].float()), out=out)
        start, first = start + n, first + g
    index = position.to(torch.int32)  # in range: the grid spans every channel's values
    counts = torch.bincount(index, minlength=channels * cells).view(channels, cells)
    return LatentHistogram(counts, index, origin, width, step, resolution, unit_bins=not host[1])


def cell_bits(density: FactorizedDensity, hist: LatentHistogram, smooth: bool = False) -> torch.Tensor:
    """(C, K) bits per latent in each cell, differentiable in the density: ``-log2 P(bin) + log2 width`` of a
    bin-wide window at the cell's center; with ``smooth``, averaged over a unit window around the center (the
    expected bits under the uniform-noise relaxation u + U(-1/2, 1/2)) in channels of unit bins."""
    r, k = hist.resolution, hist.cells
    if hist.unit_bins:  # windows [center - 1/2, center + 1/2] share their edges: one CDF evaluation per edge
        j = torch.arange(k + r, dtype=torch.float64, device=hist.origin.device) + 0.5
        bits = unit_window_bits(density, (hist.origin[:, None] - 0.5 + j[None, :] / r).float(), k, r)
    else:
        half = (hist.width / 2)[:, None].float()
        centers = hist.centers()
        bits = -density.log_prob_between(centers - half, centers + half) / LN2 + torch.log2(2 * half)
    if not smooth or r == 1:  # one cell per integer: the unit window's average is its center's value
        return bits
    # trapezoid average over the r + 1 cells whose centers span one integer: (b[-r/2]/2 + b[1-r/2] + ... + b[r/2]/2) / r
    half = r // 2
    padded = F.pad(bits, (half, half))
    smoothed = (padded[:, :k] + padded[:, r: r + k]) * 0.5
    for j in range(1, r):
        smoothed = smoothed + padded[:, j: j + k]
    smoothed = smoothed / r
    return smoothed if hist.unit_bins else torch.where((hist.width == 1)[:, None], smoothed, bits)


def grid_rate(density: FactorizedDensity, tensors: Sequence[LatentTensor], resolution: int = 1, smooth: bool = False,
              max_bins: int = 512) -> torch.Tensor:
    """Bits of all latents under ``density`` (a 0-dim tensor), from their histogram on a grid of cells.

    ``resolution=1, smooth=False``: the exact bits of the rounded latents. ``resolution=4, smooth=True``: the
    expected bits under the uniform-noise relaxation. Gradients: to the density through the cell values; to each
    latent the slope of the cell values at its cell (a gather); to the step sizes and shifts the same slopes summed
    over each channel's histogram. No pass over the latents beyond those of :func:`latent_histogram` and one gather
    in the backward.
    """
    hist = latent_histogram(tensors, resolution, max_bins)
    values = cell_bits(density, hist, smooth)
    total = (hist.counts.to(values.dtype) * values).sum()
    with torch.no_grad():
        h = (hist.width / hist.resolution).float()[:, None]  # cell width in integer units
        slope = torch.zeros_like(values)
        slope[:, 1:-1] = (values[:, 2:] - values[:, :-2]) / (2 * h)  # bits per integer unit
        weighted = hist.counts.to(slope.dtype) * slope
        grad_log_step = -(weighted * hist.centers()).sum(1)  # d units / d log_step = -units
        grad_shift = -weighted.sum(1) / hist.step.float()  # d units / d shift = -1 / step
        per_latent = (slope / hist.step.float()[:, None]).reshape(-1)  # bits per weight unit
    # a zero-valued term whose gradients are the slopes to the step sizes and shifts (kinds without shifts: zeros)
    params = torch.cat([t.log_step for t in tensors]
                       + [t.shift if t.shift is not None else torch.zeros_like(t.log_step) for t in tensors])
    steering = torch.cat([grad_log_step, grad_shift]) @ (params - params.detach())
    return total + steering + _CellGradient.apply(hist.index, per_latent, *[t.z for t in tensors])


def noise_rate(density: FactorizedDensity, tensors: Sequence[LatentTensor], resolution: int = 4,
               max_bins: int = 512) -> torch.Tensor:
    """Bits of every latent plus one fresh uniform noise draw, u + U(-1/2, 1/2), under ``density`` (the
    uniform-noise relaxation of Ballé et al., sampled: the training rate of ``rate_relaxation="noise"``).

    The bits of an integer-wide window are tabulated per channel on a grid ``resolution`` times finer than one
    integer (bins of several integers for channels wider than ``max_bins``) and interpolated linearly at each noisy
    value. Gradients: to the density through the table; to each latent (and, through its integer units, to the
    step sizes and shifts) the slope of the interpolation at its noisy value. Its expectation is
    :func:`grid_rate`'s ``smooth`` estimate; training uses the sampled form, whose runs reach smaller files at
    better accuracy than runs on the deterministic expectation (see the README's Results).
    """
    units, lows, highs = [], [], []
    for t in tensors:
        u = t.kind.units(t.z, torch.cat([t.log_step, t.shift]) if t.shift is not None else t.log_step)
        lo, hi = t.kind.group_bounds(u.detach())
        units.append(u)
        lows.append(lo)
        highs.append(hi)
    bounds = torch.cat(lows + highs)
    lo, hi = torch.round(bounds.nan_to_num(0.0, 0.0, 0.0)).long().chunk(2)
    step = integers_per_bin(lo, hi, max_bins)
    # one host sync for the grid's size and the finiteness check
    widest, finite = torch.stack([torch.div(hi - lo, step, rounding_mode="floor").max(),
                                  torch.isfinite(bounds).all().long()]).tolist()
    if not finite:
        raise EPRError(DIVERGED)
    dtype, device = units[0].dtype, units[0].device
    m = widest + 3  # bins, with a spare bin each side
    h = step.to(dtype) / resolution  # grid spacing per channel
    points = (m + 1) * resolution
    origin = (lo - step).to(dtype) - 1  # below every noisy value
    if bool((step == 1).all()):
        edges = (origin - 0.5).unsqueeze(1) + torch.arange(points + resolution, dtype=dtype,
                                                            device=device).unsqueeze(0) / resolution
        f = unit_window_bits(density, edges, points, resolution).reshape(-1)
    else:
        grid = origin.unsqueeze(1) + torch.arange(points, dtype=dtype, device=device).unsqueeze(0) * h.unsqueeze(1)
        f = (-density.log_prob_between(grid - 0.5, grid + 0.5) / LN2).reshape(-1)
    inv_h = 1 / h
    flat = torch.cat([u.reshape(-1) for u in units])
    y = flat.detach() + torch.empty_like(flat).uniform_(-0.5, 0.5)
    # position of each noisy value on its channel's grid, k + w (k integer, 0 <= w < 1), placed tensor by tensor with
    # the channel's origin and spacing broadcast over its groups (no per-latent channel index)
    base = torch.empty(flat.numel(), dtype=torch.long, device=device)
    w = torch.empty_like(y)
    spacing, start, first = [], 0, 0  # per tensor: its slice and grid points per integer unit
    for t, u in zip(tensors, units):
        n, g, view = u.numel(), t.kind.num_groups, t.kind.group_view
        ih = view(inv_h[first: first + g])
        pos = (y[start: start + n].view(u.shape) - view(origin[first: first + g])).mul_(ih).clamp_(0, points - 1.001)
        k = pos.floor()
        w[start: start + n].view(u.shape).copy_(pos.sub_(k))
        offset = view(torch.arange(first, first + g, device=device) * points)
        torch.add(k.long(), offset, out=base[start: start + n].view(u.shape))
        spacing.append((start, n, u.shape, ih))
        start, first = start + n, first + g
    # value: sum_i f[base_i] (1 - w_i) + f[base_i + 1] w_i, the weight of every grid point gathered by bincount
    s = torch.bincount(base, w, minlength=f.numel())
    weight = torch.bincount(base, minlength=f.numel()).to(s.dtype) - s
    weight[1:] += s[:-1]
    grad = (f[1:] - f[:-1]).detach()[base]  # slope per grid spacing, then per integer unit
    for start, n, shape, ih in spacing:
        grad[start: start + n].view(shape).mul_(ih)
    return (f * weight.to(f.dtype)).sum() + _ValueGradient.apply(flat, grad)


class _ValueGradient(torch.autograd.Function):
    """Zero in value; d/du = ``grad`` (a precomputed per-element gradient)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return u.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None


class _CellGradient(torch.autograd.Function):
    """Zero in value; the gradient to each latent is the slope table at its cell (one gather for all latents)."""

    @staticmethod
    def forward(ctx, index: torch.Tensor, slope: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, slope)
        ctx.shapes = [z.shape for z in zs]
        return slope.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        index, slope = ctx.saved_tensors
        grad = (slope * grad_output).index_select(0, index)
        parts = grad.split([math.prod(s) for s in ctx.shapes])
        return (None, None, *[p.view(s) for p, s in zip(parts, ctx.shapes)])
