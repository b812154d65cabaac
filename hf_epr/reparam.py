"""Attaching decoders to any model: each large parameter becomes a latent tensor behind a parametrization."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import EPRConfig
from .format.decoders import (DECODER_KINDS, DecoderKind, join, native_train, part, quantize_together,
                              small_tensor_limit, weight_spread)


class DecoderParameters(nn.Module):
    """Every compressed tensor's decoder parameters (log steps, then shifts for kinds with shifts) back to back in one
    learned vector, ``flat``: one optimizer entry, one autograd leaf and one gradient for all of them, which the passes
    over many tensors at once (decoding the small tensors, the training rate) read and write as they are. Each
    tensor's decoder reads its slice."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        flat = torch.cat([p.detach().float().reshape(-1) for p in params]) if params else torch.zeros(0)
        self.flat = nn.Parameter(flat)


class LatentDecoder(nn.Module):
    """The parametrization of one compressed tensor: ``weight = kind.forward(latent, params)``, its parameters (log
    steps, shifts) being its slice of the model's :class:`DecoderParameters` from ``offset``."""

    def __init__(self, kind: DecoderKind, pool: DecoderParameters, offset: int):
        super().__init__()
        self.kind, self.offset = kind, offset
        object.__setattr__(self, "pool", pool)  # not a submodule: the model holds it (one copy in state_dict)
        self.keep_memory = False  # right_inverse passes the weight through (its values are about to be loaded)

    @property
    def params(self) -> torch.Tensor:
        """This tensor's decoder parameters: a view of the pool (read at call time: FSDP2 swaps the pool's
        parameter between its sharded and whole forms)."""
        return self.pool.flat[self.offset: self.offset + self.kind.num_params]

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """Weights -> latent (the value the parameter starts from)."""
        return w if self.keep_memory else self.kind.inverse_transform(w)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.kind.forward(z, self.params)

    def units(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in integer units, before rounding."""
        return self.kind.units(z, self.params)


class SharedWeight(nn.Module):
    """Parametrization of a tied alias: returns the owner's decoded tensor."""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        object.__setattr__(self, "_owner", (owner, name))  # not a submodule: no second copy in state_dict

    def forward(self, _placeholder: torch.Tensor) -> torch.Tensor:
        owner, name = self._owner
        return getattr(owner, name)


@dataclass
class CompressedTensor:
    """One compressed parameter of the wrapped model: where it lives, its decoder, and its tied aliases."""

    name: str  # parameter name in the base model
    module: nn.Module
    attr: str
    decoder: LatentDecoder
    aliases: list[str]

    @property
    def latent(self) -> nn.Parameter:
        """The latent tensor (read on every step: the registries directly, not three ``nn.Module`` lookups)."""
        return self.module._modules["parametrizations"]._modules[self.attr]._parameters["original"]

    @property
    def kind(self) -> DecoderKind:
        return self.decoder.kind


class DecodeBatch:
    """The small compressed tensors of a model, decoded together: one straight-through rounding over all their
    latents per forward instead of one per tensor, and one transform per kind of transform. A small tensor costs
    its operations' fixed overhead, not its size, so a model of many small tensors (biases, norms, small kernels)
    spends most of its decoding time on it. What is small depends on the device (:func:`small_tensor_limit`)."""

    def __init__(self, entries: list[CompressedTensor], pool: DecoderParameters):
        self.candidates, self.pool = entries, pool
        self._plans: dict[str, tuple | None] = {}

    def _plan(self, device: torch.device) -> tuple | None:
        """The batched tensors on ``device`` in runs that transform alike, and per latent element where its log step
        lies in the decoders' parameters (the pool), and its shift for the elements of kinds with shifts (first);
        the same as each tensor's step pattern and shift offset for the compiled loops; None when fewer than two
        tensors are small."""
        key = str(device)
        if key not in self._plans:
            limit = small_tensor_limit(device)
            order = [i for i, e in enumerate(self.candidates) if e.latent.numel() <= limit]
            # kinds with shifts first (only they need one per element); tensors that transform alike side by side
            order.sort(key=lambda i: (not self.candidates[i].kind.has_shift,
                                      self.candidates[i].kind.transform_key is not None,
                                      str(self.candidates[i].kind.transform_key)))
            small = [self.candidates[i] for i in order]
            runs: list[list[CompressedTensor]] = []
            steps, shifts, patterns = [], [], []
            for e in small:
                if runs and runs[-1][0].kind.transform_key == e.kind.transform_key:
                    runs[-1].append(e)
                else:
                    runs.append([e])
                group, g, start = e.kind.group_index(device), e.kind.num_groups, e.decoder.offset
                steps.append(group + start)
                if e.kind.has_shift:
                    shifts.append(group + start + g)
                patterns.append(e.kind.compiled_steps(start))
            self._plans[key] = None if len(small) < 2 else (
                runs, torch.cat(steps), torch.cat(shifts) if shifts else steps[0].new_zeros(0), patterns, tuple(order))
        return self._plans[key]

    def order(self, device: torch.device) -> tuple[int, ...] | None:
        """The batched tensors on ``device`` in the order they are decoded (indices into the entries), or None."""
        plan = self._plan(device)
        return plan[-1] if plan is not None else None

    def weights(self) -> tuple[list[tuple[CompressedTensor, torch.Tensor]],
                               tuple[tuple[int, ...], torch.Tensor] | None]:
        """Every batched tensor with its decoded weight (what its parametrization returns); and, when they were
        decoded in torch operations, their latents as concatenated for it (with autograd) with their order (indices
        into the entries), for the training rate to share (see ``entropy.SmallLatents``); else None."""
        plan = self._plan(self.candidates[0].latent.device) if self.candidates else None
        if plan is None:
            return [], None
        runs, step_index, shift_index, patterns, order = plan
        batch = [e for run in runs for e in run]
        latents, joined = [e.latent for e in batch], None
        if native_train(self.pool.flat, *latents) is None:  # torch operations concatenate them: once, for both
            joined = order, join(latents)
            latents = [joined[1]]
        flat = quantize_together(latents, self.pool.flat, step_index, shift_index, patterns)
        weights, start = [], 0
        for run in runs:  # consecutive entries that transform alike: one transform for all
            size = sum(e.latent.numel() for e in run)
            out = run[0].kind.transform_flat(flat[start: start + size])
            weights += zip(run, part(out, [e.kind.shape for e in run]))
            start += size
        return weights, joined


def is_compressed(p: torch.Tensor, config: EPRConfig) -> bool:
    """Large, floating and trainable tensors are compressed; the others stay raw."""
    return p.is_floating_point() and p.requires_grad and p.numel() >= config.raw_threshold


def choose_kind(p: torch.Tensor, config: EPRConfig) -> DecoderKind | None:
    """``config.conv_decoder`` for k x k kernels (k > 1), ``config.dense_decoder`` for other tensors, None (raw)
    for small, integer or frozen ones."""
    if not is_compressed(p, config):
        return None
    name = config.conv_decoder if p.ndim == 4 and p.shape[-1] * p.shape[-2] > 1 else config.dense_decoder
    return DECODER_KINDS[name].for_weight(tuple(p.shape), config.to_dict())


def typical_spread(model: nn.Module, config: EPRConfig) -> float:
    """The median spread of the model's compressed, non-constant tensors (1e-2 if there are none)."""
    spreads = [s for p in model.parameters() if is_compressed(p, config) and (s := weight_spread(p)) is not None]
    return float(np.median(spreads)) if spreads else 1e-2


def attach(model: nn.Module, config: EPRConfig,
           initialize: bool = True) -> tuple[list[CompressedTensor], DecoderParameters]:
    """Reparameterize every large trainable parameter of ``model`` in place; returns them in order, and their
    decoders' parameters (for the caller to hold). Decoders start from each weight's spread (a constant tensor from
    the model's typical spread). With ``initialize=False`` (latents and decoders about to be loaded) nothing is
    computed from the weights: each latent keeps its weight's memory, and the decoders' parameters start at zero."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    default_spread = typical_spread(model, config) if initialize else None
    chosen = [(name, p, kind) for name, p in list(model.named_parameters())
              if (kind := choose_kind(p, config)) is not None]
    initial = [kind.initial_params(p, config.init_step_ratio, default_spread).to(p.device) if initialize
               else torch.zeros(kind.num_params, device=p.device) for _, p, kind in chosen]
    pool = DecoderParameters(initial)
    compressed, offset = [], 0
    for name, p, kind in chosen:
        decoder = LatentDecoder(kind, pool, offset)
        offset += kind.num_params
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        decoder.keep_memory = not initialize
        parametrize.register_parametrization(module, attr, decoder, unsafe=True)
        decoder.keep_memory = False
        aliases = [a for a in owners[id(p)] if a != name]
        for alias in aliases:
            alias_module_name, _, alias_attr = alias.rpartition(".")
            alias_module = model.get_submodule(alias_module_name)
            del alias_module._parameters[alias_attr]
            alias_module.register_buffer(alias_attr, torch.zeros(0), persistent=False)
            parametrize.register_parametrization(alias_module, alias_attr, SharedWeight(module, attr), unsafe=True)
        compressed.append(CompressedTensor(name, module, attr, decoder, aliases))
    return compressed, pool
