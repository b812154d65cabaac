"""Decoders (parametrizations) that turn latent tensors into weights, and attaching them to any model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import EPRConfig
from .loader import affine_decode, dct_decode, dct_matrix


MAX_LATENT = float(1 << 30)


def round_latent(u: torch.Tensor) -> torch.Tensor:
    """round(u), clamped to +-2**30 so it fits int32 (no gradient)."""
    return torch.round(u).clamp(-MAX_LATENT, MAX_LATENT)


def ste_round(u: torch.Tensor) -> torch.Tensor:
    """round(u) exactly in value (clamped to +-2**30 so it fits int32), identity in gradient."""
    return round_latent(u) + (u - u.detach())


def affine_units(z: torch.Tensor, log_step: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Affine latents in integer units, before rounding: (z - shift) / step."""
    return (z - shift) / torch.exp(log_step)


def init_log_step(w: torch.Tensor, ratio: float) -> torch.Tensor:
    """log of ``ratio`` times the tensor's spread (its RMS around the mean; 1e-2 for a constant tensor)."""
    spread = (w.detach().float() - w.detach().float().mean()).pow(2).mean().sqrt()
    return torch.log(torch.where(spread > 0, spread, torch.full_like(spread, 1e-2)) * ratio)


class AffineDecoder(nn.Module):
    """w = step * round((z - shift) / step) + shift, with a learned step and shift per tensor."""

    kind = "affine"

    def __init__(self, weight: torch.Tensor, step_ratio: float):
        super().__init__()
        w = weight.detach().float()
        self.log_step = nn.Parameter(init_log_step(w, step_ratio).reshape(()))
        self.shift = nn.Parameter(w.mean().reshape(()))
        self.register_buffer("coef_group", torch.zeros(1, dtype=torch.long), persistent=False)

    @property
    def num_groups(self) -> int:
        return 1

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in integer units, before rounding."""
        return affine_units(z, self.log_step, self.shift)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _AffineSTE.apply(z, self.log_step, self.shift)

    def channels(self, z: torch.Tensor) -> torch.Tensor | None:
        """Group index of every latent (None: all in group 0)."""
        return None

    def latents_from_integers(self, q: torch.Tensor) -> torch.Tensor:
        """The latent z whose rounding gives integers q."""
        return affine_decode(q.float(), self.log_step.detach(), self.shift.detach())

    def params(self) -> list[float]:
        return [float(self.log_step), float(self.shift)]

    def load_params(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.log_step.copy_(values[0])
            self.shift.copy_(values[1])


class _AffineSTE(torch.autograd.Function):
    """w = affine_decode(round((z - shift) / step), log_step, shift) with straight-through rounding, fused.

    The gradients are those of autograd through the unfused expression, in closed form: dw/dz = 1,
    dw/dshift = 0, dw/dlog_step = step * (q - u) = w - z. One saved tensor and one reduction in backward,
    instead of a chain of elementwise ops both ways (the decoder runs at every forward).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, log_step: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        w = affine_decode(round_latent(affine_units(z, log_step, shift)), log_step, shift)
        ctx.save_for_backward(w - z)
        return w

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        return grad, (grad * diff).sum().reshape(()), torch.zeros((), dtype=grad.dtype, device=grad.device)


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


class DCTDecoder(nn.Module):
    """k x k kernels decoded from DCT coefficients with one learned step per coefficient group."""

    kind = "dct"

    def __init__(self, weight: torch.Tensor, step_ratio: float, grouping: str, min_latents: int):
        super().__init__()
        o, i, kh, kw = weight.shape
        groups = dct_coef_groups(kh, kw, o * i, grouping, min_latents)
        self.register_buffer("coef_group", torch.tensor(groups, dtype=torch.long), persistent=False)
        n = max(groups) + 1
        self.log_step = nn.Parameter(init_log_step(weight, step_ratio).expand(n).clone())

    @property
    def num_groups(self) -> int:
        return self.log_step.numel()

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """Weights -> DCT coefficients (the latent tensor)."""
        kh, kw = w.shape[-2:]
        return dct_matrix(kh).to(w) @ w @ dct_matrix(kw).to(w).t()

    def _steps(self, z: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_step)[self.coef_group].view(z.shape[-2:])

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        return z / self._steps(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return dct_decode(ste_round(self.relaxed(z)), self.log_step, self.coef_group)

    def channels(self, z: torch.Tensor) -> torch.Tensor:
        return self.coef_group.expand(z.shape[0] * z.shape[1], -1).reshape(-1)

    def latents_from_integers(self, q: torch.Tensor) -> torch.Tensor:
        return self._steps(q).detach() * q.float()

    def params(self) -> list[float]:
        return [float(v) for v in self.log_step]

    def load_params(self, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.log_step.copy_(values)


class SharedWeight(nn.Module):
    """Parametrization of a tied alias: returns the owner's decoded tensor."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        object.__setattr__(self, "_owner", (owner, name))  # not a submodule: no second copy in state_dict

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        owner, name = self._owner
        return getattr(owner, name)


@dataclass
class Entry:
    """One compressed tensor of the wrapped model."""

    name: str  # parameter name in the base model
    module: nn.Module
    attr: str
    decoder: AffineDecoder | DCTDecoder
    aliases: list[str]

    @property
    def latent(self) -> nn.Parameter:
        return getattr(self.module.parametrizations, self.attr).original


def choose_decoder(p: torch.Tensor, config: EPRConfig) -> AffineDecoder | DCTDecoder | None:
    """Affine for dense-like tensors, DCT for k x k kernels (k > 1), None (raw) for small tensors."""
    if not p.is_floating_point() or not p.requires_grad or p.numel() < config.raw_threshold:
        return None
    if p.ndim == 4 and p.shape[-1] * p.shape[-2] > 1:
        return DCTDecoder(p, config.init_step_ratio, config.dct_grouping, config.min_group_latents)
    return AffineDecoder(p, config.init_step_ratio)


def attach(model: nn.Module, config: EPRConfig) -> list[Entry]:
    """Reparameterize every large trainable parameter of ``model`` in place; returns the entries."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    entries = []
    for name, p in list(model.named_parameters()):
        decoder = choose_decoder(p, config)
        if decoder is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        parametrize.register_parametrization(module, attr, decoder, unsafe=True)
        aliases = [a for a in owners[id(p)] if a != name]
        for alias in aliases:
            alias_module_name, _, alias_attr = alias.rpartition(".")
            alias_module = model.get_submodule(alias_module_name)
            del alias_module._parameters[alias_attr]
            alias_module.register_buffer(alias_attr, torch.zeros(0), persistent=False)
            parametrize.register_parametrization(alias_module, alias_attr, SharedWeight(module, attr), unsafe=True)
        entries.append(Entry(name, module, attr, decoder, aliases))
    return entries
