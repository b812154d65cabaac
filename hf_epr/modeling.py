"""EPRModel: a PreTrainedModel wrapper whose parameters are decoded from entropy-coded integer latents."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from .config import EPRConfig, EPRConfigError
from .entropy import (FactorizedDensity, LatentTensor, RateWorkspace, SmallLatents, cell_bits, grid_rate,
                      latent_histogram, noise_rate)
from .format import decoders
from .format.coders import histogram_table
from .format.configuration_epr import CONFIG_MODEL_TYPE, HUB_KWARGS, EPRCompressedConfig
from .format.container import WEIGHTS_NAME, CodedGroup, Container, atomic_write, read_container
from .format.latents import decode_latents, release_decoded
from .format.decoders import DecoderKind, decoder_for_entry, round_latent
from .format.errors import EPRFormatError
from .format.modeling_epr import architecture_class, decode_state_dict, resolve_file
from .remote_code import repo_auto_map, write_remote_code
from .reparam import CompressedTensor, DecodeBatch, attach

REFIT_STEPS = 100  # density fit after loading a repo saved without its density
DENSITY_NAME = "epr_density.safetensors"
logger = logging.getLogger(__name__)
try:  # FSDP2 (torch >= 2.6): a module wrapped with fully_shard becomes an instance of FSDPModule
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover
    _FSDPModule = None


class EPRModel(PreTrainedModel):
    """A base model whose large tensors are decoded from integer latents (see ``EPRModel.from_base``).

    The forward pass is the base model's own; ``bits()`` is a differentiable estimate of the coded size;
    ``save_pretrained`` writes a compressed repo that ``from_pretrained`` (here or via transformers'
    Auto classes) decodes.
    """

    config_class = EPRCompressedConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"

    def __init__(self, config: EPRCompressedConfig, base_model: PreTrainedModel | None = None,
                 initialize: bool = True):
        """``initialize=False``: latents, decoders and density are about to be loaded, so nothing is computed from
        the base model's weights."""
        super().__init__(config)
        self.model = base_model if base_model is not None else _build(config.to_base_config())
        self.model.config.architectures = [type(self.model).__name__]  # what loading builds again
        self.epr_config = EPRConfig.from_dict(config.epr or {})
        self.entries, self.decoder_parameters = attach(self.model, self.epr_config, initialize)
        channels = sum(e.kind.num_groups for e in self.entries)
        spreads = torch.cat([self._spread(e) for e in self.entries]) if initialize and self.entries else None
        self.density = FactorizedDensity(channels, spreads, self.epr_config.density_filters)
        self.rate_workspace = RateWorkspace()  # the training rate's buffers, kept between steps
        self.decode_batch = DecodeBatch(self.entries, self.decoder_parameters)  # the small tensors, together
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
        base.config.architectures = [type(base).__name__]
        wrapper_config = EPRCompressedConfig(base_config=base.config.to_dict(), epr=config.to_dict())
        model = cls(wrapper_config, base_model=base)
        model.fit_density()
        return model.train(base.training)

    def get_input_embeddings(self) -> nn.Module | None:
        """The base model's input embeddings, or None for architectures without (vision models)."""
        try:
            return self.model.get_input_embeddings()
        except (NotImplementedError, AttributeError):
            return None

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialize: weights come from the base model or the compressed file."""

    @staticmethod
    def _local_channels(entry: CompressedTensor) -> torch.Tensor:
        return entry.kind.group_index(entry.latent.device)

    def _spread(self, entry: CompressedTensor) -> torch.Tensor:
        """Initial scale of each group's density: 3 standard deviations of its latents; a group whose latents all
        round to about one value (a constant tensor) gets the scale of a tensor of the model's typical spread,
        ``3 / init_step_ratio``, since training spreads it as much as any other."""
        with torch.no_grad():
            flat = entry.decoder.units(entry.latent).reshape(-1)
            ch = self._local_channels(entry)
            std = torch.stack([flat[ch == c].std() if (ch == c).sum() > 1 else flat.new_zeros(())
                               for c in range(entry.kind.num_groups)])
            return torch.where(std > 0.5, 3 * std, torch.full_like(std, 3 / self.epr_config.init_step_ratio))

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[None]:
        """All parameters whole for the duration (a collective under FSDP2, where every rank must enter it;
        nothing to do otherwise)."""
        outermost = self.__dict__.get("_full_depth", 0) == 0
        sharded = outermost and _FSDPModule is not None and isinstance(self, _FSDPModule)
        if sharded:
            self.unshard()
        self.__dict__["_full_depth"] = self.__dict__.get("_full_depth", 0) + 1
        try:
            yield
        finally:
            self.__dict__["_full_depth"] -= 1
            if sharded:
                self.reshard()

    # ------------------------------------------------------------------ forward and rate
    def forward(self, *args: Any, return_bits: bool = False, **kwargs: Any):
        """The base model's forward (weights decoded once per call). With ``return_bits=True``: a pair
        ``(outputs, bits())``, the rate computed inside forward so that DistributedDataParallel sees every
        parameter used once per step."""
        with parametrize.cached():
            small = self._decode_small_tensors()
            outputs = self.model(*args, **kwargs)
        return (outputs, self._bits(small)) if return_bits else outputs

    @torch.compiler.disable
    def _decode_small_tensors(self) -> SmallLatents | None:
        """Decode the small tensors together into the parametrizations' cache (which the caller has enabled), so
        that the forward finds them decoded; returns their latents as concatenated for it, if it did (for the rate
        to share). Skipped for sharded (FSDP) latents, each gathered by its own module. Runs as it is under
        ``torch.compile`` (its runs of tensors of many sizes made TorchInductor fail while compiling them)."""
        cache = getattr(parametrize, "_cache", None)
        batch = self.decode_batch.candidates
        if not batch or not isinstance(cache, dict) or type(batch[0].latent.data) is not torch.Tensor:
            return None
        weights, joined = self.decode_batch.weights()
        for entry, weight in weights:
            cache[(id(entry.module), entry.attr)] = weight
        return SmallLatents(*joined) if joined is not None else None

    def latent_tensors(self) -> list[LatentTensor]:
        """Every compressed tensor as the rate sees it (latent, decoder kind, log steps, shifts)."""
        return [LatentTensor(e.latent, e.kind, e.decoder.params) for e in self.entries]

    def bits(self) -> torch.Tensor:
        """Differentiable estimate of the coded size of all latents, in bits (a 0-dim float32 tensor): in training
        with ``rate_relaxation="noise"`` the bits of the latents plus one uniform noise draw each, otherwise the
        bits of the rounded latents (straight-through slope). Always computed in float32, also under autocast."""
        return self._bits(None)

    def _bits(self, small: SmallLatents | None) -> torch.Tensor:
        """:meth:`bits`, sharing the small tensors' latents as the forward concatenated them (if it did: torch
        operations on accelerators); there the rate places the small tensors in the order they are decoded, either
        way (on the CPU in the tensors' order, compiled loops or not)."""
        if not self.entries:
            return torch.zeros((), device=self.device)
        noise = self.training and self.epr_config.rate_relaxation == "noise"
        with torch.autocast(self.device.type, enabled=False):
            tensors = self.latent_tensors()
            if noise:
                if not decoders.accelerator_path(self.device):
                    small = None  # the CPU's passes place the small tensors in the tensors' order
                elif small is None and (order := self.decode_batch.order(self.device)) is not None:
                    small = SmallLatents(order)
                return noise_rate(self.density, tensors, workspace=self.rate_workspace,
                                  params=self.decoder_parameters.flat, small=small)
            return grid_rate(self.density, tensors)

    @torch.no_grad()
    def exact_bits(self) -> float:
        """Bits of the current rounded latents under the density (no relaxation, no gradient)."""
        if not self.entries:
            return 0.0
        with self.full_parameters():
            hist = latent_histogram(self.latent_tensors())
            return float((hist.counts.float() * cell_bits(self.density, hist)).sum())

    @torch.no_grad()
    def empirical_bits(self) -> float:
        """Bits of the rounded latents under their own histogram, per coding group: what the coded stream costs
        (the file's tables are these histograms), without the tables. Cheap (one histogram); the size estimate of
        target-size training. Channels wider than ``max_bins`` integers count their bins as uniform."""
        if not self.entries:
            return 0.0
        with self.full_parameters():
            hist = latent_histogram(self.latent_tensors())
        counts = hist.counts.double()
        total = counts.sum(1, keepdim=True)
        logp = torch.log2(counts / total.clamp(min=1)).nan_to_num(neginf=0.0)
        return float(-(counts * logp).sum() + (total.squeeze(1) * torch.log2(hist.width)).sum())

    @property
    def num_compressed_parameters(self) -> int:
        """Number of latents (the normalizer N of the rate term)."""
        if "_num_latents" not in self.__dict__:
            self.__dict__["_num_latents"] = sum(e.latent.numel() for e in self.entries)
        return self.__dict__["_num_latents"]

    def fit_density(self, steps: int | None = None, lr: float = 0.02) -> None:
        """Fit the density to the current integer latents (latents unchanged): Adam on the bits of their histogram,
        which is computed once."""
        steps = self.epr_config.density_init_steps if steps is None else steps
        if not self.entries or not steps:
            return
        hist = latent_histogram(self.latent_tensors())
        counts = hist.counts.float() / max(1, self.num_compressed_parameters)
        opt = torch.optim.Adam(self.density.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                (counts * cell_bits(self.density, hist)).sum().backward()
                opt.step()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role: ``latents``, ``decoders``, ``density`` and ``raw`` (everything else)."""
        groups = {
            "latents": [e.latent for e in self.entries],
            "decoders": [self.decoder_parameters.flat],
            "density": list(self.density.parameters()),
        }
        seen = {id(p) for ps in groups.values() for p in ps}
        groups["raw"] = [p for p in self.parameters() if id(p) not in seen and p.requires_grad]
        return groups

    def integer_latents(self) -> dict[str, torch.Tensor]:
        """The rounded latents (int64) of every compressed tensor, by parameter name."""
        with torch.no_grad(), self.full_parameters():
            return {e.name: round_latent(e.decoder.units(e.latent)).long() for e in self.entries}

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

    def _coded_groups(self, entry: CompressedTensor) -> list[np.ndarray]:
        q = to_host(round_latent(entry.decoder.units(entry.latent.detach())), torch.int32)
        return entry.kind.split(q)

    def to_container(self) -> Container:
        """The coded form of the model: integer latents + tables (from the latents' histograms) + raw tensors."""
        cfg = self.epr_config
        c = Container(precision=cfg.precision)
        with torch.no_grad(), self.full_parameters():
            for entry in self.entries:
                gids = []
                for values in self._coded_groups(entry):
                    lo, counts = histogram_table(values, cfg.precision, cfg.max_table_symbols)
                    gids.append(len(c.groups))
                    c.groups.append(CodedGroup(lo, counts, values))
                c.tensors.append({"name": entry.name, "aliases": entry.aliases, "shape": list(entry.latent.shape),
                                  "kind": entry.kind.name, "groups": gids, "params": len(c.params),
                                  **entry.kind.layout()})
                c.params.extend(to_host(entry.decoder.params).tolist())
            for name, aliases, tensor in self._raw_tensors():
                dtype = str(tensor.dtype).removeprefix("torch.")
                if tensor.is_floating_point():
                    dtype = cfg.raw_dtype
                array = to_host(tensor, getattr(torch, dtype))
                c.tensors.append({"name": name, "aliases": aliases, "shape": list(tensor.shape), "kind": "raw",
                                  "dtype": dtype, "offset": c.add_raw(array, dtype)})
        return c

    def host_state_dict(self) -> dict[str, torch.Tensor]:
        """Host copies of the wrapper's whole state (the training state of a checkpoint); under FSDP2 every rank
        must call it (it gathers the parameters)."""
        with self.full_parameters():
            tensors = {**dict(self.named_parameters(remove_duplicate=False)),
                       **dict(self.named_buffers(remove_duplicate=False))}
            return {k: torch.from_numpy(to_host(tensors[k])) for k in self.state_dict() if k in tensors}

    def density_bytes(self) -> bytes:
        """The density's parameters as safetensors (saved beside the coded weights so that ``from_pretrained``
        resumes with the same bits estimate; not needed to decode the model, so not in its coded size)."""
        from safetensors.torch import save

        with self.full_parameters():
            state = {k: torch.from_numpy(to_host(v, torch.float32)) for k, v in self.density.named_parameters()}
        return save(state, metadata={"format": "hf_epr-density", "filters": json.dumps(self.epr_config.density_filters)})

    def size_report(self) -> dict[str, Any]:
        """Per tensor: name, shape, kind, bits, bytes; totals. Sizes are from real coding."""
        return self.to_container().size_report()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write a compressed repo: config.json (+ auto_map), epr_weights.safetensors and the code that decodes
        it (see ``hf_epr.remote_code``)."""
        if push_to_hub:
            raise EPRConfigError("save_pretrained(push_to_hub=True) is not supported: use EPRModel.push_to_hub")
        if os.path.isfile(save_directory):
            raise EPRFormatError(f"{save_directory} is a file; save_pretrained needs a folder")
        os.makedirs(save_directory, exist_ok=True)
        atomic_write(os.path.join(save_directory, WEIGHTS_NAME), self.to_container().to_bytes())
        atomic_write(os.path.join(save_directory, DENSITY_NAME), self.density_bytes())
        base_config = self.model.config.to_dict()
        write_remote_code(save_directory, self.model, base_config)
        self.config.base_config = base_config
        self.config.auto_map, self.config.architectures = repo_auto_map(self.model)
        self.config.epr = self.epr_config.to_dict()
        atomic_write(os.path.join(save_directory, "config.json"), self.config.to_json_string().encode())

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload the compressed repo in one commit (see ``hf_epr.hub.push_to_hub`` for the options)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> "EPRModel":
        """The wrapper back from a compressed repo, with exactly the stored integer latents."""
        repo = pretrained_model_name_or_path
        hub = {k: kwargs[k] for k in (*HUB_KWARGS, "trust_remote_code") if k in kwargs}
        config = kwargs.pop("config", None)
        if not isinstance(config, EPRCompressedConfig):
            config = EPRCompressedConfig.from_pretrained(repo, **{k: v for k, v in hub.items() if k in HUB_KWARGS})
        if config.model_type != CONFIG_MODEL_TYPE or not config.base_config:
            raise EPRFormatError(f"{repo} is not an hf_epr compressed repo (config.json has no base_config)")
        meta, arrays = read_container(resolve_file(repo, WEIGHTS_NAME, **hub))
        base_config = config.to_base_config(repo, **hub)
        model = cls(config, base_model=_build(base_config, architecture_class(base_config, repo, **hub)),
                    initialize=False)
        model.load_coded(meta, arrays)
        if not model._load_density(repo, **hub):  # repos saved before the density was stored: fit it again
            model.fit_density(REFIT_STEPS)
        device = kwargs.get("device_map", kwargs.get("device"))
        return model.to(device).eval() if isinstance(device, (str, int, torch.device)) else model.eval()

    def _load_density(self, repo: str | os.PathLike, **hub: Any) -> bool:
        """Restore the density saved with the repo; False when the repo has none that fits."""
        from safetensors.torch import load

        try:
            with open(resolve_file(repo, DENSITY_NAME, **hub), "rb") as f:
                state = load(f.read())
            self.density.load_state_dict(state, strict=True)
        except (OSError, EPRFormatError, RuntimeError, ValueError) as err:  # missing, unreadable or another shape
            logger.info("no usable %s in %s (%s): fitting the density to the latents", DENSITY_NAME, repo, err)
            return False
        return True

    def load_coded(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Set latents, decoder parameters and raw tensors from a read container. A float32 CPU latent of a kind
        that decodes in place takes over its decoded integers' memory (its values are the decoded weights); the
        others are written into their own memory and their integers' pages given back."""
        latents = decode_latents(meta, arrays)
        params = torch.from_numpy(arrays["params"].copy())
        by_name = {t["name"]: t for t in meta["tensors"]}
        with torch.no_grad():
            for entry in self.entries:
                t = by_name.pop(entry.name, None)
                if (t is None or t["kind"] != entry.kind.name or list(t["shape"]) != list(entry.latent.shape)
                        or decoder_for_entry(t).layout() != entry.kind.layout()):
                    raise EPRFormatError(f"{entry.name}: the file does not hold it as a {entry.kind.name} tensor of "
                                         f"shape {list(entry.latent.shape)} with layout {entry.kind.layout()}")
                p = params[t["params"]: t["params"] + entry.kind.num_params].to(entry.decoder.params.device)
                entry.decoder.params.copy_(p)
                groups = [latents[g] for g in t["groups"]]
                if adopts_decoded_memory(entry.kind, entry.latent, p):  # z = step * q + shift: the decoded weights
                    entry.latent.data = entry.kind.decode_groups(groups, p)
                else:
                    entry.kind.from_integers(entry.kind.integers(groups), p, out=entry.latent)
                    for group in groups:
                        release_decoded(group)
            state = decode_state_dict({**meta, "tensors": list(by_name.values())}, arrays, latents)
            for name, _, tensor in self._raw_tensors():
                if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                    raise EPRFormatError(f"{name}: missing from the file or stored with another shape")
                tensor.copy_(state[name].to(tensor.dtype))


def adopts_decoded_memory(kind: DecoderKind, latent: torch.Tensor, params: torch.Tensor) -> bool:
    """Whether ``latent`` can take over its decoded groups' memory: a kind that decodes in place (its latents, in
    weight units, are its decoded weights), float32 on the CPU, not sharded."""
    return (kind.decodes_in_place and latent.dtype == torch.float32 and latent.device.type == "cpu"
            and params.device.type == "cpu" and type(latent.data) is torch.Tensor)


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A NumPy copy of ``t`` on the host (the one place where tensors leave their device for the file)."""
    return t.detach().to("cpu", dtype or t.dtype, copy=True).numpy()


def host_floats(values: list[Any]) -> list[float]:
    """Python floats of a list of floats and 0-dim tensors, with one device sync for all the tensors (the statistics
    of training leave the device here)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    host = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist())
    return [next(host) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _build(base_config, architecture: type | None = None) -> PreTrainedModel:
    """An instance of the base architecture with uninitialized weights (every tensor is overwritten)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5.2
        from transformers.modeling_utils import no_init_weights

    architecture = architecture or architecture_class(base_config)
    with no_init_weights():
        return architecture(base_config)
