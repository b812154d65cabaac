"""Attaching decoders to any model: each large parameter becomes a latent tensor behind a parametrization."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import EPRConfig
from .format.decoders import DECODER_KINDS, DecoderKind, quantize_together, small_tensor_limit, weight_spread


class LatentDecoder(nn.Module):
    """The parametrization of one compressed tensor: ``weight = kind.forward(latent, params)``, with the
    decoder's parameters (log steps, shifts) as one flat learned vector."""

    def __init__(self, kind: DecoderKind, params: torch.Tensor):
        super().__init__()
        self.kind = kind
        self.params = nn.Parameter(params.detach().float().contiguous())
        self.keep_memory = False  # right_inverse passes the weight through (its values are about to be loaded)

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

    def __init__(self, entries: list[CompressedTensor]):
        self.candidates = entries
        self._plans: dict[str, tuple | None] = {}

    def _plan(self, device: torch.device) -> tuple | None:
        """The batched tensors on ``device`` in runs that transform alike, and per latent element where its log step
        lies in the decoders' parameters concatenated, and its shift for the elements of kinds with shifts (first);
        the same as each tensor's step pattern and shift offset for the compiled loops; None when fewer than two
        tensors are small."""
        key = str(device)
        if key not in self._plans:
            limit = small_tensor_limit(device)
            small = [e for e in self.candidates if e.latent.numel() <= limit]
            # kinds with shifts first (only they need one per element); tensors that transform alike side by side
            small.sort(key=lambda e: (not e.kind.has_shift, e.kind.transform_key is not None,
                                      str(e.kind.transform_key)))
            runs: list[list[CompressedTensor]] = []
            steps, shifts, patterns, start = [], [], [], 0
            for e in small:
                if runs and runs[-1][0].kind.transform_key == e.kind.transform_key:
                    runs[-1].append(e)
                else:
                    runs.append([e])
                group, g = e.kind.group_index(device), e.kind.num_groups
                steps.append(group + start)
                if e.kind.has_shift:
                    shifts.append(group + start + g)
                patterns.append(e.kind.compiled_steps(start))
                start += e.decoder.params.numel()
            self._plans[key] = None if len(small) < 2 else (
                runs, torch.cat(steps), torch.cat(shifts) if shifts else steps[0].new_zeros(0), patterns)
        return self._plans[key]

    def weights(self) -> list[tuple[CompressedTensor, torch.Tensor]]:
        """Every batched tensor with its decoded weight (what its parametrization returns)."""
        plan = self._plan(self.candidates[0].latent.device) if self.candidates else None
        if plan is None:
            return []
        runs, step_index, shift_index, patterns = plan
        batch = [e for run in runs for e in run]
        flat = quantize_together([e.latent for e in batch], [e.decoder.params for e in batch], step_index, shift_index,
                                 patterns)
        weights, start = [], 0
        for run in runs:  # consecutive entries that transform alike: one transform for all
            sizes = [e.latent.numel() for e in run]
            out = run[0].kind.transform_flat(flat[start: start + sum(sizes)])
            weights += [(e, w.view(e.kind.shape)) for e, w in zip(run, out.split(sizes))]
            start += sum(sizes)
        return weights


def is_compressed(p: torch.Tensor, config: EPRConfig) -> bool:
    """Large, floating and trainable tensors are compressed; the others stay raw."""
    return p.is_floating_point() and p.requires_grad and p.numel() >= config.raw_threshold


def choose_decoder(p: torch.Tensor, config: EPRConfig, default_spread: float | None = 1e-2) -> LatentDecoder | None:
    """``config.conv_decoder`` for k x k kernels (k > 1), ``config.dense_decoder`` for other tensors, None (raw)
    for small, integer or frozen ones. Constant tensors start with a step from ``default_spread``; with
    ``default_spread=None`` the parameters start at zero (to be loaded)."""
    if not is_compressed(p, config):
        return None
    name = config.conv_decoder if p.ndim == 4 and p.shape[-1] * p.shape[-2] > 1 else config.dense_decoder
    kind = DECODER_KINDS[name].for_weight(tuple(p.shape), config.to_dict())
    if default_spread is None:
        return LatentDecoder(kind, torch.zeros(kind.num_params, device=p.device))
    return LatentDecoder(kind, kind.initial_params(p, config.init_step_ratio, default_spread).to(p.device))


def typical_spread(model: nn.Module, config: EPRConfig) -> float:
    """The median spread of the model's compressed, non-constant tensors (1e-2 if there are none)."""
    spreads = [s for p in model.parameters() if is_compressed(p, config) and (s := weight_spread(p)) is not None]
    return float(np.median(spreads)) if spreads else 1e-2


def attach(model: nn.Module, config: EPRConfig, initialize: bool = True) -> list[CompressedTensor]:
    """Reparameterize every large trainable parameter of ``model`` in place; returns them in order. With
    ``initialize=False`` (latents and decoders about to be loaded) nothing is computed from the weights: each
    latent keeps its weight's memory, and the decoders' parameters start at zero."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    compressed, default_spread = [], typical_spread(model, config) if initialize else None
    for name, p in list(model.named_parameters()):
        decoder = choose_decoder(p, config, default_spread)
        if decoder is None:
            continue
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
    return compressed
