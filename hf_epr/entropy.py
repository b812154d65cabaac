"""Learned factorized density over integer latents (Ballé et al. 2018) and the bit cost of the latents under it."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .format import decoders  # (its accelerator_path looked up at call time: one switch for both modules)
from .format.decoders import DecoderKind, host, index_sums, native_train, round_latent, small_tensor_limit
from .format.errors import EPRError


LN2 = math.log(2.0)
MAX_CELLS = 256  # cells per channel of the rate's grid, above which its resolution is lowered
DIVERGED = ("the latents or step sizes are not finite: training diverged (lower the learning rates or rate_lambda, "
            "or resume from an earlier checkpoint)")


def integers_per_bin(lo: torch.Tensor, hi: torch.Tensor, max_bins: int) -> torch.Tensor:
    """Per channel: ceil((hi - lo + 1) / max_bins), the integers one bin holds so that a channel spanning the rounded
    values lo..hi needs at most ``max_bins`` bins (1 for all but very wide channels)."""
    return torch.div(hi - lo + max_bins, max_bins, rounding_mode="floor")


def bin_window_bits(density: "FactorizedDensity", first: torch.Tensor, h: torch.Tensor, width: torch.Tensor,
                    count: int, r: int) -> torch.Tensor:
    """(C, count) bits of a window one bin wide centred on each of ``count`` points per channel, ``first + j * h``
    (``r`` points per bin of ``width`` integers): ``-log2 P(window) + log2 width``, i.e. one integer's window in
    channels of unit bins, the density averaged over the bin in wider ones. Neighbouring windows share their edges:
    one CDF evaluation per point."""
    j = torch.arange(count + r, dtype=first.dtype, device=first.device) - r / 2
    edges = (first.unsqueeze(1) + j.unsqueeze(0) * h.unsqueeze(1)).to(density.matrices[0].dtype)
    c = density.cdf_logits(edges)
    bits = -density.log_prob_from_logits(c[:, :count], c[:, r: r + count]) / LN2
    return bits + torch.log2(width.to(bits.dtype)).unsqueeze(1)


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
            h = torch.baddbmm(b, F.softplus(m), h)
            if f is not None:
                h = torch.addcmul(h, torch.tanh(f), torch.tanh(h))
        return h.squeeze(1)

    def log_prob_between(self, lower: torch.Tensor, upper: torch.Tensor,
                         channel: torch.Tensor | None = None) -> torch.Tensor:
        """log P(lower < x < upper) per element: shapes (channels, M), or (K, M) with ``channel`` per row."""
        c = self.cdf_logits(torch.cat([lower, upper], dim=-1), channel)
        return self.log_prob_from_logits(*c.chunk(2, dim=-1))

    @staticmethod
    def log_prob_from_logits(lo_logit: torch.Tensor, up_logit: torch.Tensor) -> torch.Tensor:
        """log(sigmoid(up_logit) - sigmoid(lo_logit)), stable in both tails."""
        s = torch.where(lo_logit + up_logit > 0, -1.0, 1.0)  # work in the tail where sigmoid is small
        a, b = F.logsigmoid(s * lo_logit), F.logsigmoid(s * up_logit)
        hi, lo = torch.maximum(a, b), torch.minimum(a, b)
        return hi + torch.log(-torch.expm1(_pass_through_max(lo - hi, -1e-12)))

    def neg_log2_pmf(self, y: torch.Tensor, channel: torch.Tensor | None = None) -> torch.Tensor:
        """Bits of integer (or relaxed) values y: -log2 P(y - 1/2 < x < y + 1/2)."""
        return -self.log_prob_between(y - 0.5, y + 0.5, channel) / LN2


class LatentTensor(NamedTuple):
    """One compressed tensor as the rate sees it: its latent (weight units), decoder kind and the decoder's flat
    parameters (per-group log step sizes, then shifts for kinds with shifts). Its groups are consecutive density
    channels."""

    z: torch.Tensor
    kind: DecoderKind
    params: torch.Tensor

    @property
    def log_step(self) -> torch.Tensor:
        return self.params[: self.kind.num_groups]

    @property
    def shift(self) -> torch.Tensor | None:
        return self.kind.params_split(self.params)[1]


class SmallLatents(NamedTuple):
    """How the caller holds the small tensors: their ``order`` (indices into the rate's tensors), which the training
    rate places them in, and, when the forward's batched decoding concatenated them in torch operations (with
    autograd), that concatenation: the rate reads it as it is and sends it its gradient in one piece, which autograd
    adds to the decoding's once instead of once per tensor."""

    order: tuple[int, ...]
    flat: torch.Tensor | None = None


class RateLayout:
    """Where every latent tensor lies in the rate's flat buffers, and its channels and parameters. With ``batched``,
    the small tensors (up to :func:`small_tensor_limit` elements) come first, back to back, and are placed together with
    per-element gathers: a few operations whatever their number (a small tensor's cost is the fixed overhead of its
    operations). The large ones follow, each placed on its own with its groups' coefficients broadcast (no
    per-element index)."""

    def __init__(self, tensors: Sequence[LatentTensor], batched: bool = False, order: Sequence[int] | None = None):
        """``order``: the small tensors' order (indices into ``tensors``), when the caller has them concatenated
        so (see :class:`SmallLatents`); ignored unless it names exactly the small tensors."""
        sizes = [t.z.numel() for t in tensors]
        limit = small_tensor_limit(tensors[0].z.device) if batched else -1
        small = [i for i, n in enumerate(sizes) if n <= limit]
        if order is not None and sorted(order) == small:
            small = list(order)
        self.small = small if len(small) > 1 else []
        self.large = [i for i in range(len(tensors)) if i not in set(self.small)]
        self.key = self.key_of(tensors, order)
        self.parts: list[slice] = [slice(0)] * len(tensors)  # each tensor's slice of the flat buffers
        start = 0
        for i in self.small + self.large:
            self.parts[i], start = slice(start, start + sizes[i]), start + sizes[i]
        self.numel = start
        self.small_numel = sum(sizes[i] for i in self.small)
        first = 0
        self.channels: list[slice] = []  # each tensor's density channels (its groups, consecutive)
        for t in tensors:
            self.channels.append(slice(first, first + t.kind.num_groups))
            first += t.kind.num_groups
        device = tensors[0].z.device
        self.small_channel = torch.cat([tensors[i].kind.group_index(device) + self.channels[i].start
                                        for i in self.small]) if self.small else None
        # per channel: where its log step and its shift lie in the parameters concatenated (plus a trailing zero)
        self.param_sizes = [t.params.numel() for t in tensors]
        total, step_index, shift_index, start = sum(self.param_sizes), [], [], 0
        for t, size in zip(tensors, self.param_sizes):
            g = torch.arange(t.kind.num_groups, device=device) + start
            step_index.append(g)
            shift_index.append(g + t.kind.num_groups if t.kind.has_shift else torch.full_like(g, total))
            start += size
        self.step_index, self.shift_index = torch.cat(step_index), torch.cat(shift_index)
        self._offsets: tuple[int, torch.Tensor] | None = None
        self._host: list[list] | None = None  # see host_parts

    @staticmethod
    def key_of(tensors: Sequence[LatentTensor], order: Sequence[int] | None = None) -> tuple:
        return tuple((id(t.z), tuple(t.z.shape), id(t.kind), t.z.device) for t in tensors), tuple(order or ())

    def small_values(self, tensors: Sequence[LatentTensor], small: "SmallLatents | None",
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The small tensors' latents back to back, detached: the caller's concatenation when given (one that fits
        this layout: :func:`noise_rate` passes on no other), else a new one (into ``out`` when given)."""
        if small is not None:
            return small.flat.detach()
        return torch.cat([tensors[i].z.reshape(-1) for i in self.small], out=out)

    def check_params(self, params: torch.Tensor | None) -> None:
        """Raise EPRError unless ``params`` (the tensors' parameters back to back, when the caller holds them so)
        is one flat tensor of their number of elements."""
        if params is not None and (params.ndim != 1 or params.numel() != sum(self.param_sizes)):
            raise EPRError(f"params has shape {tuple(params.shape)}; the tensors' decoders have "
                           f"{sum(self.param_sizes)} parameters, to be passed as one flat tensor")

    @torch.no_grad()  # (not a detach per tensor: an operation each, for nothing but the host's time)
    def steps_and_shifts(self, tensors: Sequence[LatentTensor],
                         params: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_step, shift) of every channel, detached (shift 0 for kinds without shifts). ``params``: see
        :meth:`check_params` (else the tensors' own are put together)."""
        parts = [params.reshape(-1)] if params is not None else [t.params for t in tensors]
        flat = torch.cat([*parts, parts[0].new_zeros(1)])
        return flat[self.step_index], flat[self.shift_index]

    def steering(self, tensors: Sequence[LatentTensor], grad_log_step: torch.Tensor, grad_shift: torch.Tensor,
                 params: torch.Tensor | None = None) -> torch.Tensor:
        """A zero-valued term whose gradients to the decoders' parameters are the given ones (per channel; shifts of
        kinds without shifts dropped): to ``params`` when given (see :meth:`check_params`), else to each tensor's."""
        flat = grad_log_step.new_zeros(sum(self.param_sizes) + 1)
        flat.index_add_(0, self.step_index, grad_log_step).index_add_(0, self.shift_index, grad_shift)
        if params is not None:
            return _ParamGradient.apply(flat[:-1], params)
        return _ParamGradient.apply(flat[:-1], *[t.params for t in tensors])

    @torch.no_grad()
    def place(self, tensors: Sequence[LatentTensor], out: torch.Tensor, noise: torch.Tensor, a: torch.Tensor,
              b: torch.Tensor, c: torch.Tensor | float, scratch: torch.Tensor | None = None,
              small: "SmallLatents | None" = None) -> None:
        """``out = z * a + b + noise * c`` for every latent, with a, b, c given per channel (c may be one number)."""
        per_channel = isinstance(c, torch.Tensor)
        if self.small:
            part = out[: self.small_numel]
            z = self.small_values(tensors, small, scratch[: self.small_numel] if scratch is not None else None)
            coef = torch.stack([a, b, c] if per_channel else [a, b]).index_select(1, self.small_channel)
            torch.addcmul(coef[1], z, coef[0], out=part)
            if per_channel:
                part.addcmul_(noise[: self.small_numel], coef[2])
            else:
                part.add_(noise[: self.small_numel], alpha=c)
        for i in self.large:
            t, where, ch = tensors[i], self.parts[i], self.channels[i]
            target, view = out[where].view(t.z.shape), t.kind.group_view
            torch.addcmul(view(b[ch]), t.z, view(a[ch]), out=target)
            if per_channel:
                target.addcmul_(noise[where].view(t.z.shape), view(c[ch]))
            else:
                target.add_(noise[where].view(t.z.shape), alpha=c)

    @torch.no_grad()
    def bounds(self, tensors: Sequence[LatentTensor],
               small: "SmallLatents | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel: the least and the greatest latent (weight units; NaN if one is NaN). The small tensors
        together (two scatter reductions over their elements), each large one on its own."""
        large = [tensors[i].kind.group_bounds(tensors[i].z) for i in self.large]
        if not self.small:  # every tensor on its own, in tensor (so channel) order
            return tuple(torch.cat([b[j] for b in large]) for j in (0, 1))
        z = self.small_values(tensors, small)
        channels = len(self.step_index)
        lo = z.new_full((channels,), math.inf).scatter_reduce_(0, self.small_channel, z, "amin")
        hi = z.new_full((channels,), -math.inf).scatter_reduce_(0, self.small_channel, z, "amax")
        for i, (a, b) in zip(self.large, large):
            lo[self.channels[i]], hi[self.channels[i]] = a, b
        return lo, hi

    def host_parts(self, tensors: Sequence[LatentTensor]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(values, channel pattern) of every tensor in placement order, as NumPy arrays for the compiled pass: the
        values share the CPU tensors' memory (a view is made again when a tensor's memory has moved); the pattern
        is each element's density channel, repeating over the flat tensor (see ``DecoderKind.flat_pattern``)."""
        order = self.small + self.large
        if self._host is None:  # [data pointer, values, pattern] per tensor
            self._host = [[None, None, tensors[i].kind.flat_pattern() + np.int32(self.channels[i].start)]
                          for i in order]
        for entry, i in zip(self._host, order):
            z = tensors[i].z
            if entry[0] != z.data_ptr():
                entry[0], entry[1] = z.data_ptr(), host(z).reshape(-1)
        return [(values, pattern) for _, values, pattern in self._host]

    def add_channel_offsets(self, tensors: Sequence[LatentTensor], index: torch.Tensor, cells: int) -> None:
        """Add ``channel * cells`` to every latent's cell index (int32)."""
        if self.small:
            if self._offsets is None or self._offsets[0] != cells:
                self._offsets = cells, (self.small_channel * cells).to(torch.int32)
            index[: self.small_numel].add_(self._offsets[1])
        offsets = torch.arange(len(self.step_index), device=index.device, dtype=torch.int32) * cells
        for i in self.large:
            t = tensors[i]
            index[self.parts[i]].view(t.z.shape).add_(t.kind.group_view(offsets[self.channels[i]]))


def _unit_bounds(tensors: Sequence[LatentTensor], step: torch.Tensor, shift: torch.Tensor, layout: RateLayout,
                 small: "SmallLatents | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: the least and the greatest latent in integer units, (z - shift) / step (step > 0 keeps the
    order)."""
    return tuple((b - shift) / step for b in layout.bounds(tensors, small))


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
    layout: RateLayout  # where each tensor's latents lie in ``index``

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
    layout = RateLayout(tensors)
    log_step, shift = layout.steps_and_shifts(tensors)
    step, shift = log_step.double().exp(), shift.double()
    requested = resolution
    lo, hi = (torch.round(b) for b in _unit_bounds(tensors, step, shift, layout))
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
    exact = resolution == 1  # bins of the rounded latents: round them as the encoder does (ties included)
    if exact:
        scale, offset = 1 / width, -origin / width
        host_scale, host_offset = scale.tolist(), offset.tolist()
    position = torch.empty(sum(t.z.numel() for t in tensors), dtype=torch.float32, device=lo.device)
    for t, part, ch in zip(tensors, layout.parts, layout.channels):
        out, z = position[part].view(t.z.shape), t.z.detach().float()
        if exact:
            z = round_latent(t.kind.units(z, t.params.detach()))
        if t.kind.num_groups == 1:
            torch.mul(z, host_scale[ch.start], out=out).add_(host_offset[ch.start] + ch.start * cells)
        else:
            channel_start = torch.arange(ch.start, ch.stop, device=lo.device, dtype=torch.float64) * cells
            b = (offset[ch] + channel_start).float()
            torch.addcmul(t.kind.group_view(b), z, t.kind.group_view(scale[ch].float()), out=out)
    index = position.to(torch.int32)  # in range: the grid spans every channel's values
    counts = torch.bincount(index, minlength=channels * cells).view(channels, cells)
    return LatentHistogram(counts, index, origin, width, step, resolution, unit_bins=not host[1], layout=layout)


def cell_bits(density: FactorizedDensity, hist: LatentHistogram, smooth: bool = False) -> torch.Tensor:
    """(C, K) bits per latent in each cell, differentiable in the density: ``-log2 P(bin) + log2 width`` of a
    bin-wide window at the cell's center; with ``smooth``, averaged over a unit window around the center (the
    expected bits under the uniform-noise relaxation u + U(-1/2, 1/2)) in channels of unit bins."""
    r, k = hist.resolution, hist.cells
    h = hist.width / r  # cell width; cell centers from origin + h / 2
    bits = bin_window_bits(density, hist.origin + h / 2, h, hist.width, k, r)
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
    return (total + hist.layout.steering(tensors, grad_log_step, grad_shift)
            + _CellGradient.apply(hist.index, per_latent, None, hist.layout, None, *[t.z for t in tensors]))


SAMPLED_LATENTS = 1 << 22  # the density's and step sizes' gradients are estimated from about this many latents
SAMPLE_BLOCK = 1024  # the subset is every stride-th block of this many consecutive latents
NOISE_SEED = 20200426  # the noise buffer's seed
NOISE_PERIOD = 1 << 16  # random offsets into the noise buffer: distinct noise values each latent can draw
GRID_MARGIN = 2  # spare bins each side of a channel's range when the training rate's grid is built
GRID_REFRESH = 100  # steps after which the grid is built again (tightened) even if every latent still fits


@dataclass
class RateGrid:
    """The training rate's per-channel grid, in integer units: channel c's points are ``origin[c] + j * h[c]`` for
    j < ``points`` (``resolution`` points per bin of ``width[c]`` integers)."""

    origin: torch.Tensor  # (C,)
    width: torch.Tensor  # (C,) long
    points: int
    resolution: int
    max_bins: int
    age: int = 0
    finite: torch.Tensor | None = None  # built without a host check: whether its latents were finite (on the device)

    @property
    def h(self) -> torch.Tensor:
        return self.width.to(self.origin.dtype) / self.resolution

    @functools.cached_property
    def points_per_unit(self) -> torch.Tensor | float:
        """1 / h: per channel, or one number when every channel's bins are alike (no per-channel broadcast; one host
        sync per grid to find out)."""
        same = int(torch.where((self.width == self.width[0]).all(), self.width[0], 0))
        return self.resolution / same if same else 1 / self.h

    @classmethod
    @torch.no_grad()
    def spanning(cls, tensors: Sequence[LatentTensor], layout: RateLayout, step: torch.Tensor, shift: torch.Tensor,
                 resolution: int, max_bins: int, dtype: torch.dtype, check: bool = True,
                 small: "SmallLatents | None" = None) -> "RateGrid":
        """A grid around every channel's rounded values, with ``GRID_MARGIN`` spare bins and room for the noise.
        With ``check=False`` nothing is read back to the host: the grid has the points that the widest channel
        could need (``max_bins`` bins) and its ``finite`` flag stays on the device."""
        bounds = torch.cat(_unit_bounds(tensors, step, shift, layout, small))
        lo, hi = torch.round(bounds.nan_to_num(0.0, 0.0, 0.0)).long().chunk(2)
        width = integers_per_bin(lo, hi, max_bins)  # so that (hi - lo) // width < max_bins
        spare = GRID_MARGIN + 1  # bins below the lowest value; the noise needs half a bin of them
        origin = (lo - spare * width).to(dtype) - 1
        if not check:
            return cls(origin, width, (max_bins - 1 + 2 * spare + 2) * resolution, resolution, max_bins,
                       finite=torch.isfinite(bounds).all())
        # one host sync for the grid's size and the finiteness check
        widest, finite = torch.stack([torch.div(hi - lo, width, rounding_mode="floor").max(),
                                      torch.isfinite(bounds).all().long()]).tolist()
        if not finite:
            raise EPRError(DIVERGED)
        return cls(origin, width, (widest + 2 * spare + 2) * resolution, resolution, max_bins)


class _LateFlag:
    """A boolean computed on the device, for the host to read later without stalling: on CUDA copied into pinned
    memory behind an event (by the time it is read, the device has long passed the event); elsewhere read as is."""

    def __init__(self, flag: torch.Tensor):
        self.event = None
        if flag.device.type == "cuda":
            self.value = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.value.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = flag

    def read(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.value)


class RateWorkspace:
    """What the training rate keeps between steps: its grid (on the CPU built again only when a latent leaves it;
    on accelerators at every step, see :meth:`device_grid`), a buffer of uniform noise read at a random offset
    each step, and scratch buffers over the latents. Allocating (and first touching) buffers this large every
    step costs more than the passes over them. Not copied with the model (a copy starts empty)."""

    def __init__(self) -> None:
        self.grid: RateGrid | None = None
        self.builds = 0  # grids built so far (a step that builds one pays a pass over the bounds and, usually, a
        # placement pass on the grid it replaces)
        self.index_pending = False  # the latest cell index is saved for a backward that has not run yet
        self.latest_finite: _LateFlag | None = None  # the accelerator path's finiteness check, read a step late
        self._buffers: dict[str, torch.Tensor] = {}
        self._layout: RateLayout | None = None

    def __deepcopy__(self, memo: dict) -> "RateWorkspace":
        return RateWorkspace()

    def __getstate__(self) -> dict:
        return RateWorkspace().__dict__

    def buffer(self, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reusable 1-D buffer of at least n elements (its first n returned)."""
        b = self._buffers.get(name)
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            b = self._buffers[name] = torch.empty(n, dtype=dtype, device=device)
        return b[:n]

    def layout(self, tensors: Sequence[LatentTensor], order: Sequence[int] | None = None) -> RateLayout:
        """The tensors' batched :class:`RateLayout` (kept while they are the same tensors, in the same order)."""
        layout = self._layout
        if layout is None or layout.key != RateLayout.key_of(tensors, order):
            layout = self._layout = RateLayout(tensors, batched=True, order=order)
        return layout

    def index(self, n: int, device: torch.device) -> torch.Tensor:
        """The cell-index buffer, or a new one while the previous is still held by a pending backward."""
        if self.index_pending:
            self._buffers.pop("index", None)
        self.index_pending = True
        return self.buffer("index", n, torch.int32, device)

    def noise(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """n draws of U(-1/2, 1/2): a window at a random offset (global torch RNG) of a buffer drawn once from a
        fixed seed (so that a resumed run draws the same noise as an uninterrupted one)."""
        b = self._buffers.get("noise")
        if b is None or b.numel() < n + NOISE_PERIOD or b.dtype != dtype or b.device != device:
            generator = torch.Generator(device).manual_seed(NOISE_SEED)
            b = torch.empty(n + NOISE_PERIOD, dtype=dtype, device=device).uniform_(-0.5, 0.5, generator=generator)
            self._buffers["noise"] = b
        offset = int(torch.randint(NOISE_PERIOD, ()))
        return b[offset: offset + n]

    def state_dict(self) -> dict:
        """The grid, as JSON-ready values (training checkpoints keep it: a resumed run continues on the same grid)."""
        g = self.grid
        if g is None:
            return {}
        return {"origin": g.origin.tolist(), "width": g.width.tolist(), "points": g.points,
                "resolution": g.resolution, "max_bins": g.max_bins, "age": g.age}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.grid = None
        if state:
            self.grid = RateGrid(torch.tensor(state["origin"], dtype=torch.float32, device=device),
                                 torch.tensor(state["width"], dtype=torch.long, device=device), int(state["points"]),
                                 int(state["resolution"]), int(state["max_bins"]), int(state["age"]))

    def device_grid(self, tensors: Sequence[LatentTensor], layout: RateLayout, step: torch.Tensor, shift: torch.Tensor,
                    resolution: int, max_bins: int, dtype: torch.dtype,
                    small: "SmallLatents | None" = None) -> RateGrid:
        """The accelerator path's grid: built on the device at every step, nothing read back to the host. Whether
        the latents were finite is read one step late (EPRError then, as the host-checked grid raises at once)."""
        latest, self.latest_finite = self.latest_finite, None
        if latest is not None and not latest.read():
            raise EPRError(DIVERGED)
        self.grid = RateGrid.spanning(tensors, layout, step, shift, resolution, max_bins, dtype, check=False,
                                      small=small)
        self.latest_finite = _LateFlag(self.grid.finite)
        self.builds += 1
        return self.grid

    def usable_grid(self, channels: int, resolution: int, max_bins: int, device: torch.device) -> RateGrid | None:
        g = self.grid
        if (g is None or g.origin.numel() != channels or g.origin.device != device or g.resolution != resolution
                or g.max_bins != max_bins or g.age >= GRID_REFRESH):
            return None
        g.age += 1
        return g


def noise_rate(density: FactorizedDensity, tensors: Sequence[LatentTensor], resolution: int = 4,
               max_bins: int = 64, workspace: RateWorkspace | None = None,
               params: torch.Tensor | None = None, small: SmallLatents | None = None) -> torch.Tensor:
    """Bits of every latent plus one uniform noise draw, u + U(-1/2, 1/2), under ``density`` (the uniform-noise
    relaxation of Ballé et al., sampled: the training rate of ``rate_relaxation="noise"``).

    The bits of a window one bin wide are tabulated per channel on a grid ``resolution`` times finer than one bin (a
    bin is one integer, or several in channels wider than ``max_bins``, whose density is then averaged over the bin)
    and interpolated linearly at each noisy value. Gradients: to each latent, the slope of the interpolation at its
    noisy value; to the density (through the table) and to the step sizes and shifts, sums over the latents, taken
    over every latent up to ``SAMPLED_LATENTS`` and over an evenly strided random subset (scaled up, unbiased) above
    that; the value is the same estimate. The passes over the latents run in place in ``workspace``'s buffers (pass
    the same workspace every step; its grid is kept while every latent fits, or on accelerators built on the device
    at every step, so that nothing is read back to the host); noise comes from its fixed random buffer at a random
    offset. ``params``: the tensors' decoder parameters back to back, where the caller holds them as one tensor
    (the step sizes' and shifts' gradients then go to it, in one piece); ``small``: the order of the small tensors
    and their latents as the caller concatenated them (see :class:`SmallLatents`). Its expectation is
    :func:`grid_rate`'s ``smooth`` estimate; training uses the sampled form, whose runs reach smaller files at better
    accuracy than runs on the deterministic expectation (see the README's Results).
    """
    workspace = workspace if workspace is not None else RateWorkspace()
    dtype, device = torch.promote_types(tensors[0].z.dtype, torch.float32), tensors[0].z.device
    n = sum(t.z.numel() for t in tensors)
    with torch.no_grad():
        compiled = native_train(*(t.z for t in tensors)) is not None
        layout = workspace.layout(tensors, small.order if small is not None else None)
        layout.check_params(params)
        # the compiled pass reads every tensor where it is
        shared = small is not None and small.flat is not None and not compiled and small.order == tuple(layout.small)
        small = small if shared else None
        log_step, shift = layout.steps_and_shifts(tensors, params)
        step = log_step.exp()
        channels = step.numel()
        # the sums over latents are estimated from every stride-th block above SAMPLED_LATENTS
        stride = max(1, -(-n // SAMPLED_LATENTS))
        # torch operations pad their buffers to whole strides of blocks (the padding goes to a cell no sum reads)
        padded = n if stride == 1 or compiled else -(-n // (SAMPLE_BLOCK * stride)) * SAMPLE_BLOCK * stride
        noise = workspace.noise(padded, dtype, device)
        pick = int(torch.randint(stride, ())) if stride > 1 else 0
        # grid position of every noisy value, (z - shift) / step + noise - origin in grid spacings, with its
        # channel's coefficients: z * a + b + noise * c
        if not compiled and decoders.accelerator_path(device):  # nothing read back to the host: a grid built on the device
            grid = workspace.device_grid(tensors, layout, step, shift, resolution, max_bins, dtype, small)
            c = 1 / grid.h  # per channel (one number for all would need the host to find that they are alike)
            a, b = c / step, -(shift / step + grid.origin) * c
            found = _torch_sums(layout, tensors, workspace, grid.points, noise, (a, b, c), stride, pick, check=False,
                                small=small)
        else:
            grid = workspace.usable_grid(channels, resolution, max_bins, device)
            for fresh in ((False, True) if grid is not None else (True,)):
                if fresh:
                    grid = workspace.grid = RateGrid.spanning(tensors, layout, step, shift, resolution, max_bins,
                                                              dtype, small=small)
                    workspace.builds += 1
                c = grid.points_per_unit
                a, b = c / step, -(shift / step + grid.origin) * c
                found = (_compiled_sums(layout, tensors, workspace, grid.points, noise, (a, b, c), stride, pick)
                         if compiled else _torch_sums(layout, tensors, workspace, grid.points, noise, (a, b, c),
                                                      stride, pick, small=small))
                if found is not None:
                    break
                if fresh:  # a grid built around the latents holds them unless they are not finite
                    raise EPRError(DIVERGED)
        index, count, frac, drawn = found
        points = grid.points
    h, origin = grid.h, grid.origin
    f = bin_window_bits(density, origin, h, grid.width, points, resolution)  # wide bins: smooth at one integer
    with torch.no_grad():
        weight = count - frac  # linear interpolation: (1 - w) to the point below, w to the point above
        weight[:, 1:] += frac[:, :-1]
        h = h[:, None]
        per_unit = F.pad(torch.diff(f, dim=1) / h, (0, 1))  # bits per integer unit in each point's interval
        # d units / d log_step = -units, d units / d shift = -1 / step; a latent's units are its noisy value
        # origin + (j + w) * h less its noise draw
        j = torch.arange(points, dtype=dtype, device=device)
        units = torch.addcmul(origin[:, None], j, h).mul_(count).addcmul_(frac, h).sub_(drawn)
        grad_log_step = -(per_unit * units).sum(1)
        grad_shift = -(per_unit * count).sum(1) / step
        per_latent = (per_unit / step[:, None]).reshape(-1)  # bits per latent unit z
    return ((f * weight).sum() + layout.steering(tensors, grad_log_step, grad_shift, params)
            + _CellGradient.apply(index, per_latent, workspace, layout, small.flat if small is not None else None,
                                  *[t.z for t in tensors]))


def _torch_sums(layout: RateLayout, tensors: Sequence[LatentTensor], workspace: RateWorkspace, points: int,
                noise: torch.Tensor, coef: tuple, stride: int, pick: int, check: bool = True,
                small: SmallLatents | None = None) -> tuple[torch.Tensor, ...] | None:
    """:func:`noise_rate`'s pass over the latents in torch operations: (cell index of every latent, and per grid
    point the count, fractions and noise draws of the latents of every stride-th block of ``SAMPLE_BLOCK`` from
    ``pick``, scaled by ``stride``), or None when a noisy value leaves the grid (found with one host synchronization;
    with ``check=False`` none, for a grid built around the latents). ``noise`` is padded to whole strides of
    blocks."""
    (a, b, c), n, padded = coef, layout.numel, noise.numel()
    dtype, device, channels = noise.dtype, noise.device, a.numel()
    position = workspace.buffer("position", padded, dtype, device)
    layout.place(tensors, position, noise, a, b, c, workspace.buffer("small", layout.small_numel, dtype, device)
                 if small is None else None, small)
    if check:
        low, high = torch.stack(position[:n].aminmax()).tolist()  # one host sync: do all lie on the grid?
        if not (0 <= low and high < points - 1):
            return None
    else:  # on a grid built around them they do, unless not finite: those (training diverged) go to its ends
        position[:n].nan_to_num_(0.0, 0.0, 0.0).clamp_(0.0, points - 1)
    index = workspace.index(padded, device)
    index[:n].copy_(position[:n])  # positions are >= 0: truncation is the floor
    position.frac_()  # the fraction w of the way to the next grid point
    index[n:] = channels * points  # the spare cell
    layout.add_channel_offsets(tensors, index, points)
    sample = [index, position, noise]
    if stride > 1:  # copied once into contiguous buffers (each bincount would copy a strided input again)
        sample = [workspace.buffer(f"sample{i}", padded // stride, x.dtype, device).view(-1, SAMPLE_BLOCK)
                  .copy_(x.view(-1, SAMPLE_BLOCK)[pick::stride]).view(-1) for i, x in enumerate(sample)]
    cells = channels * points
    return index[:n], *(index_sums(sample[0], w, cells + 1)[:cells].to(dtype).view(channels, -1) * stride
                        for w in (None, sample[1], sample[2]))


def _compiled_sums(layout: RateLayout, tensors: Sequence[LatentTensor], workspace: RateWorkspace, points: int,
                   noise: torch.Tensor, coef: tuple, stride: int, pick: int) -> tuple[torch.Tensor, ...] | None:
    """:func:`_torch_sums` in one compiled pass (``_native_train.c``; float32 latents on the CPU)."""
    a, b, c = coef
    channels = a.numel()
    rows = torch.stack([a, b, c if isinstance(c, torch.Tensor) else torch.full_like(a, c)]).float()
    index = workspace.index(layout.numel, noise.device)
    sums = workspace.buffer("sums", channels * points * 3, torch.float64, noise.device)
    if not native_train(noise).noisy_histogram(layout.host_parts(tensors), host(noise), host(rows), host(index, True),
                                               host(sums, True), points, SAMPLE_BLOCK, stride, pick,
                                               torch.get_num_threads()):
        return None
    sums = sums.view(channels, points, 3).to(noise.dtype)
    return index, *(sums * stride if stride > 1 else sums).unbind(-1)


class _ParamGradient(torch.autograd.Function):
    """Zero in value; the gradient to each parameter tensor is its slice of ``flat`` (one node for all)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        ctx.sizes = [p.numel() for p in params]
        return flat.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (flat,) = ctx.saved_tensors
        return (None, *(flat * grad_output).split(ctx.sizes))


class _CellGradient(torch.autograd.Function):
    """Zero in value; the gradient to each latent is the slope table at its cell: one gather for all the small
    tensors together, one per large tensor. With ``small_flat`` (the small tensors' latents as the caller
    concatenated them, see :class:`SmallLatents`) their gradient goes to it, in one piece."""

    @staticmethod
    def forward(ctx, index: torch.Tensor, slope: torch.Tensor, workspace: RateWorkspace | None, layout: RateLayout,
                small_flat: torch.Tensor | None, *zs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index, slope)
        ctx.shapes, ctx.workspace, ctx.layout = [z.shape for z in zs], workspace, layout
        ctx.joined = small_flat is not None
        return slope.new_zeros(())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        index, slope = ctx.saved_tensors
        table, layout, grads, joined = slope * grad_output, ctx.layout, [None] * len(ctx.shapes), None
        if layout.small:
            small = table.index_select(0, index[: layout.small_numel])
            if ctx.joined:
                joined = small
            else:
                for i in layout.small:
                    grads[i] = small[layout.parts[i]].view(ctx.shapes[i])
        for i in layout.large:  # gathered into a tensor of its own shape (not a view): autograd adds the decoder's
            # gradient into it in place instead of allocating their sum
            grads[i] = table.new_empty(ctx.shapes[i])
            torch.index_select(table, 0, index[layout.parts[i]], out=grads[i].view(-1))
        if ctx.workspace is not None:
            ctx.workspace.index_pending = False  # its index buffer may be written again
        return (None, None, None, None, joined, *grads)
