"""Loading a compressed repo as a plain model: the classes that transformers' Auto classes call.

``save_pretrained`` copies this package's modules into every compressed repo, and its ``config.json`` maps each
Auto class under which the base architecture is registered to one of the loader classes below. So
``AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True)`` (or ``AutoModel``,
``AutoBackbone``, ``pipeline(...)``) returns the decoded base model with only torch, transformers, numpy,
safetensors and constriction installed; with hf_epr imported the same classes are registered and no remote code
runs. The decoded tensors go through transformers' own ``from_pretrained(None, state_dict=...)``, so
``dtype``, ``device_map`` and loading a head model's weights into its base model behave as for any checkpoint.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from transformers import PreTrainedConfig, PreTrainedModel

from .configuration_epr import HUB_KWARGS, EPRCompressedConfig, base_class
from .container import WEIGHTS_NAME, read_container
from .decoders import decoder_for_entry
from .errors import EPRFormatError
from .latents import decode_latents, decode_processes

# the Auto classes a compressed repo can be loaded with (its auto_map names those its base architecture has)
AUTO_CLASSES = (
    "AutoModel", "AutoModelForImageClassification", "AutoBackbone", "AutoModelForObjectDetection",
    "AutoModelForZeroShotObjectDetection", "AutoModelForSemanticSegmentation", "AutoModelForInstanceSegmentation",
    "AutoModelForUniversalSegmentation", "AutoModelForDepthEstimation", "AutoModelForMaskedImageModeling",
    "AutoModelForImageToImage", "AutoModelForKeypointDetection", "AutoModelForVideoClassification",
    "AutoModelForZeroShotImageClassification", "AutoModelForPreTraining", "AutoModelForMaskedLM",
    "AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering", "AutoModelForMultipleChoice", "AutoModelForAudioClassification",
)
LOAD_KWARGS = ("device_map", "dtype", "attn_implementation", "max_memory", "offload_folder",
               "ignore_mismatched_sizes")


def loader_name(auto_class: str) -> str:
    """The loader class for an Auto class: AutoModelForX -> EPRCompressedForX, AutoModel -> EPRCompressedModel."""
    return auto_class.replace("AutoModelFor", "EPRCompressedFor").replace("AutoModel", "EPRCompressedModel") \
        .replace("AutoBackbone", "EPRCompressedBackbone")


def auto_classes_of(config: PreTrainedConfig) -> list[str]:
    """The Auto classes under which ``config``'s architecture is registered (or that its ``auto_map`` names)."""
    import transformers

    names = []
    for name in AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if (auto is not None and type(config) in auto._model_mapping) or name in (getattr(config, "auto_map", None) or {}):
            names.append(name)
    return names


def model_class_for(config: PreTrainedConfig, auto_class: str, repo: str | os.PathLike | None = None,
                    **hub_kwargs: Any) -> type:
    """The class ``auto_class`` gives for ``config``: from transformers' mapping, else from the repo's code."""
    import transformers

    auto = getattr(transformers, auto_class, None)
    if auto is not None and type(config) in auto._model_mapping:
        return auto._model_mapping[type(config)]
    reference = (getattr(config, "auto_map", None) or {}).get(auto_class)
    if reference is None or repo is None:
        raise EPRFormatError(f"{type(config).__name__} has no {auto_class} model; load the repo with an Auto class "
                             f"its architecture has: {auto_classes_of(config) or 'none known'}")
    return base_class(reference, repo, **hub_kwargs)


def architecture_class(config: PreTrainedConfig, repo: str | os.PathLike | None = None, **hub_kwargs: Any) -> type:
    """The class named in ``config.architectures`` (the model that was compressed)."""
    import transformers

    name = (config.architectures or [None])[0]
    for auto_class in auto_classes_of(config):
        cls = model_class_for(config, auto_class, repo, **hub_kwargs)
        if name is None or cls.__name__ == name:
            return cls
    if name is not None and hasattr(transformers, name):
        return getattr(transformers, name)
    raise EPRFormatError(f"cannot find the base architecture {name!r} of this repo")


def resolve_file(repo: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str:
    """Local path of one file of a compressed repo (a folder or a Hub id)."""
    if os.path.isdir(repo):
        path = os.path.join(repo, filename)
        if not os.path.isfile(path):
            raise EPRFormatError(f"{repo} has no {filename}: it is not an hf_epr compressed repo")
        return path
    from transformers.utils import cached_file

    keep = {k: hub_kwargs[k] for k in HUB_KWARGS if k in hub_kwargs}
    return cached_file(str(repo), filename, **keep)


def iter_decoded(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                 latents: list[np.ndarray] | None = None) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield (names, tensor) for every stored tensor (names: the tensor's name and its tied aliases). The decoded
    latents are consumed: decoders may turn them into weights in place (pass copies to keep them)."""
    latents = decode_latents(meta, arrays) if latents is None else latents
    params = torch.from_numpy(arrays["params"].copy())

    kinds = [None if t["kind"] == "raw" else decoder_for_entry(t) for t in meta["tensors"]]

    def decode(i: int) -> tuple[list[str], torch.Tensor]:
        t, kind = meta["tensors"][i], kinds[i]
        shape = tuple(t["shape"])
        if kind is None:
            flat = arrays[f"raw.{t['dtype']}"]
            value = torch.from_numpy(flat[t["offset"]: t["offset"] + math.prod(shape)].copy()).view(shape)
        else:
            value = kind.decode_groups([latents[g] for g in t["groups"]],
                                       params[t["params"]: t["params"] + kind.num_params])
        return [t["name"], *t.get("aliases", [])], value

    # decoders that need no temporary memory (their passes release the GIL) run on a pool, the others one at a
    # time here, so that the peak memory stays the model's
    with ThreadPoolExecutor(decode_processes()) as pool:
        done = {i: pool.submit(decode, i) for i, kind in enumerate(kinds) if kind is not None and kind.decodes_in_place}
        for i in range(len(kinds)):
            yield done.pop(i).result() if i in done else decode(i)


def decode_state_dict(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                      latents: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, by name (aliases of shared tensors included)."""
    return {name: value for names, value in iter_decoded(meta, arrays, latents) for name in names}


class EPRCompressedLoader(PreTrainedModel):
    """``from_pretrained`` returns the decoded base model, as the Auto class ``auto_class`` would build it."""

    config_class = EPRCompressedConfig
    auto_class = "AutoModel"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):  # noqa: D102
        repo = pretrained_model_name_or_path
        hub = {k: kwargs[k] for k in (*HUB_KWARGS, "trust_remote_code") if k in kwargs}
        if not isinstance(config, EPRCompressedConfig):
            config = EPRCompressedConfig.from_pretrained(repo, **{k: v for k, v in hub.items() if k in HUB_KWARGS})
        base_config = config.to_base_config(repo, **hub)
        target = model_class_for(base_config, cls.auto_class, repo, **hub)
        state = decode_state_dict(*read_container(resolve_file(repo, WEIGHTS_NAME, **hub)))
        options = {k: kwargs[k] for k in LOAD_KWARGS if k in kwargs}
        if "torch_dtype" in kwargs:
            options.setdefault("dtype", kwargs["torch_dtype"])
        try:
            model, info = target.from_pretrained(None, *model_args, config=base_config, state_dict=state,
                                                 output_loading_info=True, **options)
        except RuntimeError as err:  # e.g. a tensor whose shape does not fit the architecture
            raise EPRFormatError(f"the file does not fit {target.__name__}: {err}") from None
        if target.__name__ == (base_config.architectures or [target.__name__])[0]:
            wrong = {k: sorted(v)[:5] for k, v in info.items() if k in ("missing_keys", "unexpected_keys",
                                                                       "mismatched_keys") and v}
            if wrong:
                raise EPRFormatError(f"the file does not fit {target.__name__}: {wrong}")
        return model


def _loader(auto_class: str) -> type:
    return type(loader_name(auto_class), (EPRCompressedLoader,), {"auto_class": auto_class, "__module__": __name__,
                                                                   "__doc__": f"Loader for {auto_class}."})


LOADERS = {auto_class: _loader(auto_class) for auto_class in AUTO_CLASSES}
globals().update({cls.__name__: cls for cls in LOADERS.values()})
EPRCompressedForImageClassification = LOADERS["AutoModelForImageClassification"]
