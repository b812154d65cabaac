"""Decoder kinds: how one tensor's integer latents become its weights, and how they are grouped for coding.

Every kind quantizes per *group* of elements with a learned step (and, where ``has_shift``, a shift):
``u = (z - shift_g) / step_g`` are the latents in integer units, ``q = round(u)`` is what the file codes (one
table per group), and the weights are ``w = transform(step_g * q + shift_g)``. A kind says which group each
element belongs to (``pattern``), and which linear ``transform`` follows (identity for ``affine``, the inverse
2-D DCT of each kernel slice for ``dct``). Its parameters are stored flat as ``[log_step_0 .. log_step_{G-1}]``
followed by ``[shift_0 .. shift_{G-1}]`` when the kind has shifts.

The same class serves the file (``split``/``join`` into coding groups, ``decode``, ``check``) and training
(``units``, ``forward`` with a straight-through rounding, ``initial_params``). A new kind is one subclass
registered with :func:`register_decoder_kind`.
"""

from __future__ import annotations

import math
import os
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from .coders import native
from .errors import EPRFormatError

MAX_LATENT = float(1 << 30)  # rounded latents are clamped to +-2**30 so they fit int32

try:  # the compiled training loops built with hf_epr (optional: torch operations compute the same values)
    from hf_epr import _native_train
except ImportError:
    _native_train = None
if os.environ.get("HF_EPR_NATIVE") == "0":  # to compare, or to rule the compiled loops out
    _native_train = None


def native_train(*tensors: torch.Tensor):
    """The compiled training loops (``hf_epr/_native_train.c``, built by ``pip install``) when they were built, not
    ruled out by ``HF_EPR_NATIVE=0``, and all ``tensors`` are contiguous float32 on the CPU; else None. Also None
    while ``torch.compile`` traces (the loops read memory that its fake tensors do not have: torch operations then)."""
    if _native_train is None or torch.compiler.is_compiling() or not all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return None
    return _native_train


def host(t: torch.Tensor, writable: bool = False) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (no copy), for the compiled loops. Read through DLPack:
    ``Tensor.numpy()`` marks the tensor's storage non-resizable for good, and FSDP2 frees an unsharded parameter by
    resizing its storage to nothing. ``writable`` (the loops' own output buffers) through ``numpy()``, since NumPy 1.x
    gives read-only arrays from DLPack."""
    return t.detach().numpy() if writable else np.from_dlpack(t.detach())


def round_latent(u: torch.Tensor) -> torch.Tensor:
    """round(u), clamped to +-2**30 (no gradient)."""
    return torch.round(u).clamp(-MAX_LATENT, MAX_LATENT)


def ste_round(u: torch.Tensor) -> torch.Tensor:
    """round(u) in value (clamped like :func:`round_latent`), identity in gradient."""
    return round_latent(u) + (u - u.detach())


CONSTANT_SPREAD = 1e-4  # a tensor whose spread is below this fraction of its magnitude is constant (ones, zeros, ...)


def weight_spread(w: torch.Tensor) -> float | None:
    """The tensor's spread (RMS around its mean), or None for a constant or near-constant tensor (zero biases,
    unit norm scales, a layer scale of 1e-6 everywhere, float noise around one value)."""
    var, mean = torch.var_mean(w.detach().float(), correction=0)
    spread, magnitude = torch.stack([var, var + mean * mean]).sqrt().tolist()
    return spread if math.isfinite(spread) and spread > CONSTANT_SPREAD * magnitude and spread > 0 else None


def init_log_step(w: torch.Tensor, ratio: float, default_spread: float = 1e-2) -> torch.Tensor:
    """log of ``ratio`` times the tensor's spread; a constant tensor takes ``default_spread`` instead (the model's
    typical spread): training moves it by as much as any other weight, whatever its value."""
    spread = weight_spread(w) or default_spread
    return torch.log(torch.tensor(spread * ratio, dtype=torch.float32, device=w.device))


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n x n, float32): coefficients = D @ x, x = D.T @ coefficients."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return torch.from_numpy(d.astype(np.float32))


def _quantize(z: torch.Tensor, step: torch.Tensor, shift: torch.Tensor | None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """step * round((z - shift) / step) + shift, clamped like :func:`round_latent`: the float operations of
    ``decode()``, in place on one temporary (``out`` when given)."""
    x = torch.sub(z, shift, out=out).div_(step) if shift is not None else torch.div(z, step, out=out)
    x = x.round_().clamp_(-MAX_LATENT, MAX_LATENT).mul_(step)
    return x.add_(shift) if shift is not None else x


class _QuantizeSTE(torch.autograd.Function):
    """x = step * round((z - shift) / step) + shift with straight-through rounding, fused, for one tensor of
    ``kind`` with its flat parameters (log steps, then shifts).

    Closed-form gradients of the unfused expression: dx/dz = 1, dx/dlog_step = x - z (summed over each group's
    elements), dx/dshift = 0. One saved tensor, one reduction and one autograd node per tensor.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, params: torch.Tensor, kind: "DecoderKind") -> torch.Tensor:
        compiled = native_train(z, params)
        ctx.kind, ctx.compiled = kind, compiled is not None
        if compiled is not None:  # one pass; the backward reads x - z from x and z
            x = torch.empty_like(z)
            compiled.quantize([(host(z).reshape(-1), *kind.compiled_steps())], host(params.exp()), host(params),
                              host(x, True), torch.get_num_threads())
            ctx.save_for_backward(x, z)
            return x
        log_step, shift = kind.params_split(params)
        x = _quantize(z, kind.group_view(torch.exp(log_step)), kind.group_view(shift) if shift is not None else None)
        ctx.save_for_backward(x - z)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kind = ctx.kind
        if ctx.compiled:
            x, z = ctx.saved_tensors
            grad = grad.contiguous()
            compiled = native_train(grad)
            if compiled is not None:
                sums = torch.empty(kind.num_groups, dtype=torch.float64)
                compiled.group_sums([(host(z).reshape(-1), kind.flat_pattern(), -1)], host(grad), host(x),
                                    host(sums, True), torch.get_num_threads())
                grad_log_step = sums.to(z.dtype)
            else:  # a gradient the compiled loops cannot read
                grad_log_step = kind.reduce_to_groups(grad * (x - z), "sum")
        else:
            (diff,) = ctx.saved_tensors
            if kind.num_groups == 1:  # a dot product
                grad_log_step = (grad.reshape(-1) @ diff.reshape(-1)).reshape(1)
            else:
                grad_log_step = kind.reduce_to_groups(grad * diff, "sum")
        if kind.has_shift:  # no gradient to the shifts
            grad_log_step = torch.cat([grad_log_step, torch.zeros_like(grad_log_step)])
        return grad, grad_log_step, None


def accelerator_path(device: torch.device) -> bool:
    """Whether training's passes on ``device`` take the accelerator path, which reads nothing back to the host
    (:func:`index_sums` adds with ``index_add_``; the training rate builds its grid on the device every step),
    rather than the CPU's (``bincount``; a grid kept while the latents fit, checked on the host)."""
    return device.type != "cpu"


def index_sums(index: torch.Tensor, weights: torch.Tensor | None, size: int) -> torch.Tensor:
    """Per slot below ``size``: how many entries of ``index`` name it (``weights`` None), or the sum of their
    ``weights``. A ``bincount`` on the CPU (float64 sums of weights); an ``index_add_`` on accelerators (sums in the
    weights' dtype), where a bincount reads its input's range back to the host first: two synchronizations that
    stall the step. Counts are exact in float32 below 2**24 per slot."""
    if not accelerator_path(index.device):
        return torch.bincount(index, weights, minlength=size)
    values = weights if weights is not None else torch.ones((), device=index.device).expand(index.numel())
    return torch.zeros(size, dtype=values.dtype, device=index.device).index_add_(0, index, values)


class _QuantizeTogether(torch.autograd.Function):
    """:class:`_QuantizeSTE` for several tensors in one operation: the latents ``zs``, then the flat parameters of
    their decoders (all of them back to back: a tensor's parameters are a slice). ``step_index`` gives each latent
    element (all tensors' elements in order) the place of its log step in the parameters; ``shift_index`` that of
    its shift, for the leading elements whose kinds have shifts (the tensors of kinds with shifts come first).
    ``patterns``: the same places as each tensor's :meth:`DecoderKind.compiled_steps`, for the compiled loops."""

    @staticmethod
    def forward(ctx, step_index: torch.Tensor, shift_index: torch.Tensor, patterns: list[tuple[np.ndarray, int]],
                params: torch.Tensor, *zs: torch.Tensor) -> torch.Tensor:
        flat = params.detach().reshape(-1)
        ctx.shapes, ctx.params = [t.shape for t in zs], (params.numel(), params.dtype, params.shape)
        compiled = native_train(flat, *zs)
        ctx.patterns = patterns if compiled is not None else None
        if compiled is not None:  # one pass over the tensors where they are; the backward reads x - z from x and z
            x = flat.new_empty(sum(z.numel() for z in zs))
            compiled.quantize([(host(z).reshape(-1), *p) for z, p in zip(zs, patterns)], host(flat.exp()), host(flat),
                              host(x, True), torch.get_num_threads())
            ctx.save_for_backward(x, *zs)
            return x
        z = zs[0].reshape(-1) if len(zs) == 1 else torch.cat([t.reshape(-1) for t in zs])
        step, shifted, x = flat.exp().index_select(0, step_index), shift_index.numel(), torch.empty_like(z)
        _quantize(z[:shifted], step[:shifted], flat.index_select(0, shift_index), out=x[:shifted])
        _quantize(z[shifted:], step[shifted:], None, out=x[shifted:])
        ctx.save_for_backward(x - z, step_index)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad, sizes = grad.contiguous(), [math.prod(s) for s in ctx.shapes]
        numel, dtype, shape = ctx.params
        if ctx.patterns is not None:
            x, *zs = ctx.saved_tensors
            per_param = torch.empty(numel, dtype=torch.float64)
            native_train(x).group_sums([(host(z).reshape(-1), *p) for z, p in zip(zs, ctx.patterns)], host(grad),
                                       host(x), host(per_param, True), torch.get_num_threads())  # shifts get 0
        else:
            diff, step_index = ctx.saved_tensors
            per_param = index_sums(step_index, (grad * diff).double(), numel)
        grads = [g.view(s) for g, s in zip(grad.split(sizes), ctx.shapes)]
        return None, None, None, per_param.to(dtype).view(shape), *grads


SMALL_TENSOR = 1 << 16  # on the CPU, tensors up to this many elements are handled together (decoding, training rate)
# on a GPU, where every operation is a kernel launch: batching every tensor instead left an H200 step's time within
# noise and made the step sizes' gradient one bincount over all latents (3 ms for ViT-B/16; gpu_check --profile)
SMALL_TENSOR_ACCELERATOR = 1 << 20


def small_tensor_limit(device: torch.device) -> int:
    """Tensors up to this many elements are decoded, and placed by the training rate, together on ``device``."""
    return SMALL_TENSOR if torch.device(device).type == "cpu" else SMALL_TENSOR_ACCELERATOR


class _Join(torch.autograd.Function):
    """Tensors flattened and concatenated, in one autograd node (a concatenation of reshaped tensors is one node
    per tensor more: a reshape's); its backward hands each tensor its slice of the gradient as a view."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [t.shape for t in tensors]
        return torch.cat([t.reshape(-1) for t in tensors])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = grad.split([math.prod(s) for s in ctx.shapes])
        return tuple(g.view(s) for g, s in zip(grads, ctx.shapes))


class _Part(torch.autograd.Function):
    """The inverse of :class:`_Join`: a flat tensor's consecutive slices as tensors of the given shapes (views), in
    one autograd node (a split's outputs reshaped are one node per tensor more)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, shapes: list[torch.Size]):
        ctx.shapes = shapes
        return tuple(p.view(s) for p, s in zip(flat.split([math.prod(s) for s in shapes]), shapes))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # (gradients of unused parts arrive as zeros)
        return torch.cat([g.reshape(-1) for g in grads]), None


def join(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``tensors`` flattened and concatenated, differentiable, in one autograd node."""
    return _Join.apply(*tensors)


def part(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`join`: ``flat``'s consecutive slices shaped as ``shapes`` (views; differentiable, one
    autograd node)."""
    return _Part.apply(flat, [torch.Size(s) for s in shapes])


def quantize_together(zs: list[torch.Tensor], params: torch.Tensor, step_index: torch.Tensor,
                      shift_index: torch.Tensor, patterns: list[tuple[np.ndarray, int]]) -> torch.Tensor:
    """The quantized latents of several tensors (each ``kind.forward`` before its transform), flat and back to back,
    in one operation and one autograd node: the per-operation cost of many small tensors paid once. ``params``: the
    decoders' parameters, flat (``step_index``, ``shift_index`` and ``patterns`` place each tensor's in it). ``zs``
    may be one tensor, the latents already back to back (torch operations only: the compiled loops take each
    tensor's ``patterns``). See :class:`_QuantizeTogether`."""
    return _QuantizeTogether.apply(step_index, shift_index, patterns, params, *zs)


class DecoderKind:
    """One compressed tensor's decoder: shape, grouping and maths (see the module docstring).

    Subclasses set ``name``, ``has_shift`` and ``layout_keys`` (the extra fields of the file's tensor entry),
    and implement ``group_pattern``; they override ``transform``/``inverse_transform`` and, for speed,
    ``split``/``join``.
    """

    name: ClassVar[str]
    has_shift: ClassVar[bool] = True
    layout_keys: ClassVar[tuple[str, ...]] = ()
    decodes_in_place: ClassVar[bool] = False  # decode_groups of a file's groups needs no temporary memory

    def __init__(self, shape: Sequence[int], **layout: Any):
        self.shape = tuple(int(s) for s in shape)
        self._cache: dict[Any, Any] = {}  # patterns, bases, flags: computed once per kind
        self.check()

    # ------------------------------------------------------------------ layout
    @classmethod
    def for_weight(cls, shape: Sequence[int], options: Mapping[str, Any]) -> "DecoderKind":
        """The decoder a training run gives a weight of this shape (``options``: the EPRConfig as a dict)."""
        return cls(shape)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "DecoderKind":
        """The decoder of a file's tensor entry (raises EPRFormatError if its layout is inconsistent)."""
        return cls(entry["shape"], **{k: entry.get(k) for k in cls.layout_keys})

    def layout(self) -> dict[str, Any]:
        """The fields the file's tensor entry needs besides name, shape and kind."""
        return {}

    def check(self) -> None:
        """Raise EPRFormatError if shape and layout do not fit this kind."""

    def group_pattern(self) -> np.ndarray:
        """Group id of each element, as an int64 array that broadcasts against the tensor's shape."""
        raise NotImplementedError

    @property
    def num_groups(self) -> int:
        return int(self.group_pattern().max()) + 1 if self.group_pattern().size else 0

    @property
    def num_params(self) -> int:
        return self.num_groups * (2 if self.has_shift else 1)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def group_sizes(self) -> list[int]:
        """Number of latents in each coding group."""
        p = self.group_pattern()
        per = self.numel // max(1, p.size)  # elements each pattern entry stands for
        return (np.bincount(p.reshape(-1), minlength=self.num_groups) * per).tolist()

    # ------------------------------------------------------------------ coding order
    def split(self, q: np.ndarray) -> list[np.ndarray]:
        """The integer latents (tensor-shaped) as one flat array per coding group, in coding order."""
        groups = np.broadcast_to(self.group_pattern(), self.shape).reshape(-1)
        flat = q.reshape(-1)
        return [flat[groups == g] for g in range(self.num_groups)]

    def join(self, groups: list[np.ndarray]) -> np.ndarray:
        """Inverse of :meth:`split`: a float32 array of the tensor's shape."""
        ids = np.broadcast_to(self.group_pattern(), self.shape).reshape(-1)
        out = np.empty(self.numel, np.float32)
        for g, values in enumerate(groups):
            out[ids == g] = values
        return out.reshape(self.shape)

    # ------------------------------------------------------------------ maths
    def pattern(self, device: torch.device) -> torch.Tensor:
        """:meth:`group_pattern` as a tensor on ``device`` (cached)."""
        key = ("pattern", str(device))
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(self.group_pattern(), dtype=torch.long, device=device)
        return self._cache[key]

    def group_view(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group ``values`` (G,) spread over the elements (a tensor that broadcasts against the shape)."""
        if self.num_groups == 1:
            return values  # shape (1,) broadcasts as it is: no indexing kernel
        return values[self.pattern(values.device)]

    def params_split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log_step (G,), shift (G,) or None) from the flat parameters."""
        g = self.num_groups
        return params[:g], (params[g: 2 * g] if self.has_shift else None)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The linear map from dequantized latents to weights (identity unless overridden)."""
        return x

    @property
    def transform_key(self) -> tuple | None:
        """Kinds with equal keys transform alike, so that several tensors go through one :meth:`transform_flat`;
        None for the identity."""
        return None

    def transform_flat(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` of one or several tensors of this kind's key, flat and back to back."""
        return x

    def inverse_transform(self, w: torch.Tensor) -> torch.Tensor:
        """Weights -> latents in weight units (the inverse of :meth:`transform`)."""
        return w

    def decode(self, q: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Weights from integer latents ``q`` (float, tensor-shaped) and the flat parameters."""
        log_step, shift = self.params_split(params)
        x = self.group_view(torch.exp(log_step)) * q
        if shift is not None:
            x = x + self.group_view(shift)
        return self.transform(x)

    def decode_groups(self, groups: list[np.ndarray], params: torch.Tensor) -> torch.Tensor:
        """Weights from the decoded coding groups (int32 arrays that the caller no longer needs: a kind may
        reuse their memory)."""
        return self.decode(self.integers(groups), params)

    def units(self, z: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Latents in integer units, before rounding: (z - shift) / step."""
        log_step, shift = self.params_split(params)
        step = self.group_view(torch.exp(log_step))
        return (z - self.group_view(shift)) / step if shift is not None else z / step

    def forward(self, z: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Training forward: the weights with straight-through rounding (gradients to z and the parameters)."""
        return self.transform(_QuantizeSTE.apply(z, params, self))

    def from_integers(self, q: torch.Tensor, params: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """A latent z (weight units) whose rounding gives the integers ``q``; computed in ``out`` when given (``q``
        of any dtype, converted as it is copied in)."""
        log_step, shift = self.params_split(params)
        step = self.group_view(torch.exp(log_step))
        z = out.copy_(q).mul_(step) if out is not None else step * q
        if shift is None:
            return z
        return z.add_(self.group_view(shift)) if out is not None else z + self.group_view(shift)

    def integers(self, groups: list[np.ndarray]) -> torch.Tensor:
        """The decoded coding groups as one tensor of the tensor's shape (any dtype: a view where the kind can)."""
        return torch.from_numpy(self.join(groups))

    def flat_pattern(self) -> np.ndarray:
        """The group of every element as an int32 pattern that repeats over the flat tensor, for the compiled loops:
        one entry for one group, the group pattern where it spans trailing dimensions (dct), one entry per element
        otherwise (cached)."""
        if "flat" not in self._cache:
            p = self.group_pattern()
            while p.ndim and p.shape[0] == 1 and p.size > 1:
                p = p[0]
            if p.size > 1 and tuple(p.shape) != self.shape[len(self.shape) - p.ndim:]:
                p = np.broadcast_to(self.group_pattern(), self.shape)
            self._cache["flat"] = np.ascontiguousarray(p.reshape(-1)[:1] if p.size == 1 else p.reshape(-1), np.int32)
        return self._cache["flat"]

    def compiled_steps(self, first: int = 0) -> tuple[np.ndarray, int]:
        """For the compiled loops: the parameter index of each element's step (its group, after ``first``) as a
        repeating pattern (:meth:`flat_pattern`), and how far its shift lies after its step (-1: no shifts)."""
        pattern = self.flat_pattern()
        return (pattern + np.int32(first) if first else pattern), (self.num_groups if self.has_shift else -1)

    def group_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Group id of every element in the latent's flat (row-major) order."""
        return self.pattern(torch.device(device)).expand(self.shape).reshape(-1)

    def reduce_to_groups(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """``op`` ("amin", "amax" or "sum") of a tensor-shaped ``x`` over each group's elements: shape (G,)."""
        p = self.pattern(x.device)
        lead = x.ndim - p.ndim
        dims = [d for d in range(x.ndim) if d < lead or (p.shape[d - lead] == 1 and x.shape[d] != 1)]
        r = getattr(torch, op)(x, dim=tuple(dims), keepdim=True) if dims else x
        r, ids = r.reshape(-1), p.expand(r.shape[lead:]).reshape(-1)
        if self._one_group_per_pattern_entry and ids.numel() == self.num_groups:
            return r
        out = r.new_zeros(self.num_groups)
        return out.scatter_reduce(0, ids, r, op, include_self=False)

    @property
    def _one_group_per_pattern_entry(self) -> bool:
        """True when the pattern lists the groups 0..G-1 once each, in order (no scatter needed)."""
        if "identity" not in self._cache:
            p = self.group_pattern().reshape(-1)
            self._cache["identity"] = bool(np.array_equal(p, np.arange(p.size)))
        return self._cache["identity"]

    def group_bounds(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min, max) of a tensor-shaped ``x`` over each group's elements, each of shape (G,): one pass when there
        is one group or the group pattern spans trailing dimensions only (affine, dct), two otherwise."""
        p = self.pattern(x.device)
        lead = x.ndim - p.ndim
        if self.num_groups == 1:
            lo, hi = x.aminmax()
            return lo.reshape(1), hi.reshape(1)
        if p.ndim and all(x.shape[lead + i] == s for i, s in enumerate(p.shape)):
            lo, hi = x.reshape(-1, p.numel()).aminmax(dim=0)
            if self._one_group_per_pattern_entry:
                return lo, hi
            ids = p.reshape(-1)
            return (lo.new_full((self.num_groups,), float("inf")).scatter_reduce(0, ids, lo, "amin"),
                    hi.new_full((self.num_groups,), float("-inf")).scatter_reduce(0, ids, hi, "amax"))
        return self.reduce_to_groups(x, "amin"), self.reduce_to_groups(x, "amax")

    def initial_params(self, w: torch.Tensor, step_ratio: float, default_spread: float = 1e-2) -> torch.Tensor:
        """Starting parameters for the weight ``w``: a step of ``step_ratio`` times its spread (``default_spread``
        for a constant tensor, see :func:`init_log_step`), its mean as shift."""
        log_step = init_log_step(w, step_ratio, default_spread).reshape(1).repeat(self.num_groups)
        if not self.has_shift:
            return log_step
        return torch.cat([log_step, w.detach().float().mean().reshape(1).repeat(self.num_groups)])


class AffineKind(DecoderKind):
    """``w = step * q + shift``: one step, one shift and one coding group per tensor (dense weights)."""

    name = "affine"
    decodes_in_place = True

    def group_pattern(self) -> np.ndarray:
        return np.zeros((1,), np.int64)

    @property
    def num_groups(self) -> int:
        return 1

    def split(self, q: np.ndarray) -> list[np.ndarray]:
        return [q.reshape(-1)]

    def join(self, groups: list[np.ndarray]) -> np.ndarray:
        return groups[0].astype(np.float32).reshape(self.shape)

    def integers(self, groups: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(groups[0]).view(self.shape)

    def decode_groups(self, groups: list[np.ndarray], params: torch.Tensor) -> torch.Tensor:
        """In place: the int32 values become the float32 weights in the same memory (no copy of the tensor)."""
        values = groups[0]
        weights = values.view(np.float32)
        step, shift = torch.exp(params[:1]).numpy()[0], params[1:2].numpy()[0]
        if native() is not None and values.flags.c_contiguous:  # one compiled pass
            native().affine_in_place(values, float(step), float(shift))
        else:
            np.copyto(weights, values, casting="unsafe")  # element by element, so in place is safe
            np.multiply(weights, step, out=weights)  # the same float32 operations as decode()
            np.add(weights, shift, out=weights)
        return torch.from_numpy(weights).view(self.shape)


def _back_to_back(groups: list[np.ndarray], n: int) -> np.ndarray | None:
    """One int32 view over ``groups`` when they are n values back to back in one array's memory (else None)."""
    root = groups[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.dtype != np.int32 or root.ndim != 1 or not root.flags.c_contiguous or sum(g.size for g in groups) != n:
        return None
    start = (groups[0].ctypes.data - root.ctypes.data) // 4
    if not all(g.dtype == np.int32 and g.flags.c_contiguous for g in groups) or start < 0 or start + n > root.size:
        return None
    position = groups[0].ctypes.data
    for g in groups:
        if g.ctypes.data != position:
            return None
        position += g.nbytes
    return root[start: start + n]


def dct_coef_groups(kh: int, kw: int, slices: int, grouping: str, min_latents: int) -> list[int]:
    """Group of each DCT coefficient (row-major kh x kw): bands u+v merged until each is large enough."""
    if grouping == "frequency":
        return list(range(kh * kw))
    band = [u + v for u in range(kh) for v in range(kw)]
    if grouping == "tensor":
        return [0] * (kh * kw)
    sizes = [band.count(b) * slices for b in range(kh + kw - 1)]
    merged, group, filled = [], 0, 0
    for b, size in enumerate(sizes):
        if filled >= min_latents:
            group, filled = group + 1, 0
        merged.append(group)
        filled += size
    if filled < min_latents and group > 0:  # too small a last group joins the one before
        merged = [min(m, group - 1) for m in merged]
    return [merged[b] for b in band]


class DCTKind(DecoderKind):
    """k x k conv kernels (O, I, kh, kw) stored as the orthonormal 2-D DCT of each kernel slice; one step and
    one coding group per band of frequencies (``coef_group``: the group of each of the kh*kw coefficients)."""

    name = "dct"
    has_shift = False
    layout_keys = ("coef_group",)

    def __init__(self, shape: Sequence[int], coef_group: Sequence[int] | None = None):
        self.coef_group = coef_group
        super().__init__(shape)

    @classmethod
    def for_weight(cls, shape: Sequence[int], options: Mapping[str, Any]) -> "DCTKind":
        o, i, kh, kw = shape
        groups = dct_coef_groups(kh, kw, o * i, options.get("dct_grouping", "band"),
                                 options.get("min_group_latents", 2048))
        return cls(shape, groups)

    def layout(self) -> dict[str, Any]:
        return {"coef_group": list(self.coef_group)}

    def check(self) -> None:
        cg = self.coef_group
        if len(self.shape) != 4:
            raise EPRFormatError(f"a dct tensor must be 4-D, not of shape {list(self.shape)}")
        if not (isinstance(cg, (list, tuple)) and len(cg) == self.shape[2] * self.shape[3]
                and all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < len(cg) for g in cg)
                and set(cg) == set(range(max(cg) + 1))):
            raise EPRFormatError(f"bad coef_group {cg!r} for a dct tensor of shape {list(self.shape)}")
        self.coef_group = [int(g) for g in cg]

    def group_pattern(self) -> np.ndarray:
        return np.asarray(self.coef_group, np.int64).reshape(self.shape[2:])

    @property
    def num_groups(self) -> int:
        return max(self.coef_group) + 1

    def split(self, q: np.ndarray) -> list[np.ndarray]:
        o, i, kh, kw = self.shape
        cg = np.asarray(self.coef_group)
        flat = q.reshape(o * i, kh * kw)
        return [flat[:, cg == g].reshape(-1) for g in range(self.num_groups)]

    def join(self, groups: list[np.ndarray]) -> np.ndarray:
        o, i, kh, kw = self.shape
        cg = np.asarray(self.coef_group)
        q = np.empty((o * i, kh * kw), np.float32)
        for g, values in enumerate(groups):
            cols = np.flatnonzero(cg == g)
            q[:, cols] = values.reshape(o * i, len(cols))
        return q.reshape(self.shape)

    def decode_groups(self, groups: list[np.ndarray], params: torch.Tensor) -> torch.Tensor:
        """The weights in the groups' own memory when the groups lie back to back (as a file's decoded groups do):
        the coefficients are gathered into one temporary, and the transform writes over the int32 values."""
        region = _back_to_back(groups, self.numel)
        if region is None:
            return super().decode_groups(groups, params)
        x = self.integers(groups)  # reads every group before the region is written
        x.mul_(self.group_view(torch.exp(self.params_split(params)[0])))  # the float32 operations of decode()
        weights = torch.from_numpy(region.view(np.float32)).view(self.shape)
        kh, kw = self.shape[2:]
        torch.matmul(x.reshape(*self.shape[:2], kh * kw), self._basis(x), out=weights.view(*self.shape[:2], kh * kw))
        return weights

    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        """kron(Dh, Dw) on ``like``'s device: [(u, v), (i, j)] = Dh[u, i] * Dw[v, j] (cached)."""
        key = ("basis", str(like.device))
        if key not in self._cache:
            kh, kw = self.shape[2:]
            self._cache[key] = torch.kron(dct_matrix(kh), dct_matrix(kw)).to(like.device)
        return self._cache[key]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """Kernels from DCT coefficients: Dh.T @ x @ Dw per slice, as one matrix product with kron(Dh, Dw)."""
        return self.transform_flat(x.reshape(-1)).view(x.shape)

    @property
    def transform_key(self) -> tuple:
        return ("dct", *self.shape[2:])

    def transform_flat(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.shape[2:]
        return (x.view(-1, kh * kw) @ self._basis(x)).view(-1)

    def inverse_transform(self, w: torch.Tensor) -> torch.Tensor:
        kh, kw = self.shape[2:]
        return dct_matrix(kh).to(w) @ w @ dct_matrix(kw).to(w).t()


DECODER_KINDS: dict[str, type[DecoderKind]] = {}


def register_decoder_kind(cls: type[DecoderKind]) -> type[DecoderKind]:
    """Make a decoder kind known by its ``name`` (to training, validation and loading)."""
    DECODER_KINDS[cls.name] = cls
    return cls


for _kind in (AffineKind, DCTKind):
    register_decoder_kind(_kind)


def decoder_for_entry(entry: Mapping[str, Any]) -> DecoderKind:
    """The decoder of one of a file's tensor entries; EPRFormatError for an unknown kind or a bad layout."""
    cls = DECODER_KINDS.get(entry.get("kind"))
    if cls is None:
        raise EPRFormatError(f"{entry.get('name')}: unknown kind {entry.get('kind')!r}; "
                             f"this reader knows {sorted(DECODER_KINDS)} and 'raw'")
    return cls.from_entry(entry)
