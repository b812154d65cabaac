"""Attaching decoders to any model: each large parameter becomes a latent tensor behind a parametrization."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import EPRConfig
from .format.decoders import DECODER_KINDS, DecoderKind, weight_spread


class LatentDecoder(nn.Module):
    """The parametrization of one compressed tensor: ``weight = kind.forward(latent, params)``, with the
    decoder's parameters (log steps, shifts) as one flat learned vector."""

    def __init__(self, kind: DecoderKind, params: torch.Tensor):
        super().__init__()
        self.kind = kind
        self.params = nn.Parameter(params.detach().float().contiguous())

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """Weights -> latent (the value the parameter starts from)."""
        return self.kind.inverse_transform(w)

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
        return getattr(self.module.parametrizations, self.attr).original

    @property
    def kind(self) -> DecoderKind:
        return self.decoder.kind


def is_compressed(p: torch.Tensor, config: EPRConfig) -> bool:
    """Large, floating and trainable tensors are compressed; the others stay raw."""
    return p.is_floating_point() and p.requires_grad and p.numel() >= config.raw_threshold


def choose_decoder(p: torch.Tensor, config: EPRConfig, default_spread: float = 1e-2) -> LatentDecoder | None:
    """``config.conv_decoder`` for k x k kernels (k > 1), ``config.dense_decoder`` for other tensors, None (raw)
    for small, integer or frozen ones. Constant tensors start with a step from ``default_spread``."""
    if not is_compressed(p, config):
        return None
    name = config.conv_decoder if p.ndim == 4 and p.shape[-1] * p.shape[-2] > 1 else config.dense_decoder
    kind = DECODER_KINDS[name].for_weight(tuple(p.shape), config.to_dict())
    return LatentDecoder(kind, kind.initial_params(p, config.init_step_ratio, default_spread).to(p.device))


def typical_spread(model: nn.Module, config: EPRConfig) -> float:
    """The median spread of the model's compressed, non-constant tensors (1e-2 if there are none)."""
    spreads = [s for p in model.parameters() if is_compressed(p, config) and (s := weight_spread(p)) is not None]
    return float(np.median(spreads)) if spreads else 1e-2


def attach(model: nn.Module, config: EPRConfig) -> list[CompressedTensor]:
    """Reparameterize every large trainable parameter of ``model`` in place; returns them in order."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    compressed, default_spread = [], typical_spread(model, config)
    for name, p in list(model.named_parameters()):
        decoder = choose_decoder(p, config, default_spread)
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
        compressed.append(CompressedTensor(name, module, attr, decoder, aliases))
    return compressed
