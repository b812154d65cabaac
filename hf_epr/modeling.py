"""EPRModel: a PreTrainedModel wrapper whose parameters are decoded from entropy-coded integer latents."""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from . import loader
from .codec import Container, CodedGroup, atomic_write, quantize_pmf, size_report, table_support
from .config import EPRConfig, EPRConfigError
from .entropy import FactorizedDensity, noise_bits, rate_bits
from .loader import (EPRCompressedConfig, EPRFormatError, WEIGHTS_NAME, build_base_model, dct_latents,
                     read_container, resolve_file)
from .reparam import Entry, attach, ste_round

LOADER_MODULE = "epr_loader"
AUTO_MAP = {
    "AutoConfig": f"{LOADER_MODULE}.EPRCompressedConfig",
    "AutoModelForImageClassification": f"{LOADER_MODULE}.EPRCompressedForImageClassification",
}
REFIT_STEPS = 100  # density fit after loading (the file stores tables, not the density's parameters)


class EPRModel(PreTrainedModel):
    """A base model whose large tensors are decoded from integer latents (see ``EPRModel.from_base``).

    The forward pass is the base model's own; ``bits()`` is a differentiable estimate of the coded size;
    ``save_pretrained`` writes a compressed repo that ``from_pretrained`` (here or via transformers'
    Auto classes) decodes.
    """

    config_class = EPRCompressedConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"

    def __init__(self, config: EPRCompressedConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = base_model if base_model is not None else build_base_model(config.to_base_config())
        self.epr_config = EPRConfig.from_dict(config.epr or {})
        self.entries: list[Entry] = attach(self.model, self.epr_config)
        spreads = [self._spread(e) for e in self.entries]
        self.density = FactorizedDensity(sum(len(s) for s in spreads), torch.cat(spreads) if spreads else None,
                                         self.epr_config.density_filters)
        offsets = np.cumsum([0] + [len(s) for s in spreads])[:-1].tolist()
        channel = [self._local_channels(e) + o for e, o in zip(self.entries, offsets)]
        self.register_buffer("_latent_channel", torch.cat(channel) if channel else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        self.main_input_name = getattr(self.model, "main_input_name", "pixel_values")
        self.post_init()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, base: PreTrainedModel, config: EPRConfig | None = None) -> "EPRModel":
        """Wrap ``base`` (modified in place; pass a copy to keep the original) for EPR fine-tuning."""
        config = config or EPRConfig()
        if not isinstance(base, PreTrainedModel):
            raise EPRConfigError(f"from_base needs a transformers PreTrainedModel, got {type(base).__name__}; "
                                 "load one with AutoModelForImageClassification.from_pretrained/from_config")
        if not isinstance(config, EPRConfig):
            raise EPRConfigError(f"config must be an EPRConfig, got {type(config).__name__}")
        wrapper_config = EPRCompressedConfig(base_config=base.config.to_dict(), epr=config.to_dict())
        model = cls(wrapper_config, base_model=base)
        model.fit_density()
        return model.train(base.training)

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialize: weights come from the base model or the compressed file."""

    @staticmethod
    def _local_channels(entry: Entry) -> torch.Tensor:
        ch = entry.decoder.channels(entry.latent)
        if ch is None:
            return torch.zeros(entry.latent.numel(), dtype=torch.long, device=entry.latent.device)
        return ch

    def _spread(self, entry: Entry) -> torch.Tensor:
        """Initial scale of each group's density: 3 standard deviations of its latents."""
        with torch.no_grad():
            flat = entry.decoder.relaxed(entry.latent).reshape(-1)
            ch = self._local_channels(entry)
            return torch.stack([3 * flat[ch == c].std() for c in range(entry.decoder.num_groups)])

    # ------------------------------------------------------------------ forward and rate
    def forward(self, *args: Any, return_bits: bool = False, **kwargs: Any):
        """The base model's forward (weights decoded once per call). With ``return_bits=True``: a pair
        ``(outputs, bits())``, the rate computed inside forward so that DistributedDataParallel sees every
        parameter used once per step."""
        with parametrize.cached():
            outputs = self.model(*args, **kwargs)
        return (outputs, self.bits()) if return_bits else outputs

    def _relaxed_latents(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """All latents in integer units, flat, in entry order (channels in ``_latent_channel``), and the
        min and max of their rounded values per channel."""
        flat, lows, highs = [], [], []
        for e in self.entries:
            u = e.decoder.relaxed(e.latent)
            r = u.detach()  # min/max before rounding: rounding is monotonic, so round(min) = min(round)
            if e.decoder.kind == "affine":
                lo, hi = (v.round().reshape(1) for v in r.aminmax())
            else:  # per DCT coefficient, then per group of coefficients
                lo, hi = (v.round() for v in r.reshape(-1, r.shape[-2] * r.shape[-1]).aminmax(dim=0))
                g = e.decoder.coef_group
                lo = lo.new_full((e.decoder.num_groups,), float("inf")).scatter_reduce(0, g, lo, "amin")
                hi = hi.new_full((e.decoder.num_groups,), float("-inf")).scatter_reduce(0, g, hi, "amax")
            flat.append(u.reshape(-1))
            lows.append(lo)
            highs.append(hi)
        return torch.cat(flat), (torch.cat(lows).long(), torch.cat(highs).long())

    def bits(self) -> torch.Tensor:
        """Differentiable estimate of the coded size of all latents, in bits (a 0-dim tensor)."""
        if not self.entries:
            return torch.zeros((), device=self.device)
        u, bounds = self._relaxed_latents()
        if self.epr_config.rate_relaxation == "noise" and self.training:
            return noise_bits(self.density, u, self._latent_channel, bounds=bounds)
        return rate_bits(self.density, u, self._latent_channel, bounds=bounds)

    @torch.no_grad()
    def exact_bits(self) -> float:
        """Bits of the current rounded latents under the density (no relaxation, no gradient)."""
        if not self.entries:
            return 0.0
        u, bounds = self._relaxed_latents()
        return float(rate_bits(self.density, u, self._latent_channel, bounds=bounds))

    @property
    def num_compressed_parameters(self) -> int:
        """Number of latents (the normalizer N of the rate term)."""
        return sum(e.latent.numel() for e in self.entries)

    def fit_density(self, steps: int | None = None, lr: float = 0.02) -> None:
        """Fit the density to the current integer latents (latents unchanged)."""
        steps = self.epr_config.density_init_steps if steps is None else steps
        if not self.entries:
            return
        with torch.no_grad():
            u, bounds = self._relaxed_latents()
        opt = torch.optim.Adam(self.density.parameters(), lr=lr)
        n = max(1, self.num_compressed_parameters)
        for _ in range(steps):
            opt.zero_grad()
            with torch.enable_grad():
                loss = rate_bits(self.density, u, self._latent_channel, bounds=bounds) / n
                loss.backward()
            opt.step()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role: ``latents``, ``decoders``, ``density`` and ``raw`` (everything else)."""
        groups = {
            "latents": [e.latent for e in self.entries],
            "decoders": [p for e in self.entries for p in e.decoder.parameters()],
            "density": list(self.density.parameters()),
        }
        seen = {id(p) for ps in groups.values() for p in ps}
        groups["raw"] = [p for p in self.parameters() if id(p) not in seen and p.requires_grad]
        return groups

    def integer_latents(self) -> dict[str, torch.Tensor]:
        """The rounded latents (int64) of every compressed tensor, by parameter name."""
        with torch.no_grad():
            return {e.name: ste_round(e.decoder.relaxed(e.latent)).long() for e in self.entries}

    # ------------------------------------------------------------------ coding
    def _raw_tensors(self) -> list[tuple[str, list[str], torch.Tensor]]:
        """(name, aliases, tensor) of every stored tensor that is not compressed: small params, buffers."""
        compressed = {id(e.latent) for e in self.entries}
        out: dict[int, tuple[str, list[str], torch.Tensor]] = {}
        for mod_name, module in self.model.named_modules():
            if "parametrizations" in mod_name.split("."):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            tensors = [(n, p) for n, p in module._parameters.items() if p is not None]
            tensors += [(n, b) for n, b in module._buffers.items()
                        if b is not None and n not in module._non_persistent_buffers_set]
            for n, t in tensors:
                if id(t) in compressed:
                    continue
                if id(t) in out:
                    out[id(t)][1].append(prefix + n)
                else:
                    out[id(t)] = (prefix + n, [], t)
        return list(out.values())

    def _coded_groups(self, entry: Entry) -> list[np.ndarray]:
        q = ste_round(entry.decoder.relaxed(entry.latent.detach())).to(torch.int32).cpu().numpy()
        if entry.decoder.kind == "affine":
            return [q.reshape(-1)]
        o, i, kh, kw = q.shape
        cg = entry.decoder.coef_group.cpu().numpy()
        flat = q.reshape(o * i, kh * kw)
        return [flat[:, cg == g].reshape(-1) for g in range(entry.decoder.num_groups)]

    def to_container(self) -> Container:
        """The coded form of the model: integer latents + tables (from the latents' histograms) + raw tensors."""
        cfg = self.epr_config
        c = Container(precision=cfg.precision)
        with torch.no_grad():
            for entry in self.entries:
                gids = []
                for values in self._coded_groups(entry):
                    lo, hi = table_support(values, cfg.max_table_symbols)
                    hist = np.bincount(np.clip(values.astype(np.int64) - lo, 0, hi - lo + 1), minlength=hi - lo + 2)
                    hist[-1] = int(((values < lo) | (values > hi)).sum())
                    gids.append(len(c.groups))
                    c.groups.append(CodedGroup(lo, quantize_pmf(hist, cfg.precision), values))
                t = {"name": entry.name, "aliases": entry.aliases, "shape": list(entry.latent.shape),
                     "kind": entry.decoder.kind, "groups": gids, "params": len(c.params)}
                if entry.decoder.kind == "dct":
                    t["coef_group"] = entry.decoder.coef_group.tolist()
                c.params.extend(entry.decoder.params())
                c.tensors.append(t)
            for name, aliases, tensor in self._raw_tensors():
                dtype = str(tensor.dtype).removeprefix("torch.")
                if tensor.is_floating_point():
                    dtype = cfg.raw_dtype
                array = tensor.detach().to(getattr(torch, dtype)).cpu().numpy()
                c.tensors.append({"name": name, "aliases": aliases, "shape": list(tensor.shape), "kind": "raw",
                                  "dtype": dtype, "offset": c.add_raw(array, dtype)})
        return c

    def size_report(self) -> dict[str, Any]:
        """Per tensor: name, shape, kind (affine/dct/raw), bits, bytes; totals. Sizes are from real coding."""
        return size_report(self.to_container())

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write a compressed repo: config.json (+ auto_map), epr_weights.safetensors and the loader module."""
        if os.path.isfile(save_directory):
            raise EPRFormatError(f"{save_directory} is a file; save_pretrained needs a folder")
        os.makedirs(save_directory, exist_ok=True)
        atomic_write(os.path.join(save_directory, WEIGHTS_NAME), self.to_container().to_bytes())
        self.config.auto_map = dict(AUTO_MAP)
        self.config.architectures = ["EPRCompressedForImageClassification"]
        self.config.epr = self.epr_config.to_dict()
        atomic_write(os.path.join(save_directory, "config.json"), self.config.to_json_string().encode())
        with open(loader.__file__, "rb") as f:
            atomic_write(os.path.join(save_directory, f"{LOADER_MODULE}.py"), f.read())
        if push_to_hub:
            raise NotImplementedError("use EPRModel.push_to_hub")

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the compressed repo in one commit (see ``hf_epr.hub.push_to_hub`` for the options)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> "EPRModel":
        """The wrapper back from a compressed repo, with exactly the stored integer latents."""
        repo = pretrained_model_name_or_path
        config = kwargs.pop("config", None)
        if not isinstance(config, EPRCompressedConfig):
            config = EPRCompressedConfig.from_pretrained(repo, **kwargs)
        if config.model_type != loader.CONFIG_MODEL_TYPE or not config.base_config:
            raise EPRFormatError(f"{repo} is not an hf_epr compressed repo (config.json has no base_config)")
        meta, arrays = read_container(resolve_file(repo, WEIGHTS_NAME, **kwargs))
        model = cls(config)
        model.load_coded(meta, arrays)
        model.fit_density(REFIT_STEPS)
        return model.eval()

    def load_coded(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Set latents, decoder parameters and raw tensors from a read container."""
        latents = loader.decode_latents(meta, arrays)
        params = torch.from_numpy(arrays["params"].copy())
        by_name = {t["name"]: t for t in meta["tensors"]}
        with torch.no_grad():
            for entry in self.entries:
                t = by_name.pop(entry.name, None)
                if t is None or t["kind"] != entry.decoder.kind or list(t["shape"]) != list(entry.latent.shape):
                    raise EPRFormatError(f"{entry.name}: the file does not hold it as a {entry.decoder.kind} "
                                         f"tensor of shape {list(entry.latent.shape)}")
                entry.decoder.load_params(params[t["params"]: t["params"] + len(entry.decoder.params())])
                if t["kind"] == "affine":
                    q = torch.from_numpy(latents[t["groups"][0]].astype(np.float32))
                else:
                    q = torch.from_numpy(dct_latents(t, latents))
                entry.latent.copy_(entry.decoder.latents_from_integers(q.view(entry.latent.shape)))
            state = loader.decode_state_dict({**meta, "tensors": list(by_name.values())}, arrays, latents)
            for name, _, tensor in self._raw_tensors():
                if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                    raise EPRFormatError(f"{name}: missing from the file or stored with another shape")
                tensor.copy_(state[name].to(tensor.dtype))
