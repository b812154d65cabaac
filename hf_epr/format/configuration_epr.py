"""``config.json`` of a compressed repo: the base model's config plus the ``epr`` section."""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from .errors import EPRFormatError

CONFIG_MODEL_TYPE = "epr_compressed"
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class EPRCompressedConfig(PreTrainedConfig):
    """The base architecture's config as a dict (``base_config``; for architectures outside transformers with
    an ``auto_map`` to the source files the repo carries) and the EPR settings (``epr``)."""

    model_type = CONFIG_MODEL_TYPE
    base_config: dict | None = None
    epr: dict | None = None

    def to_base_config(self, repo: str | os.PathLike | None = None, **hub_kwargs: Any) -> PreTrainedConfig:
        """The base architecture's own config object. An architecture that transformers does not know is built
        from the code the repo carries (``base_config["auto_map"]``; needs ``repo``)."""
        if not isinstance(self.base_config, dict) or "model_type" not in self.base_config:
            raise EPRFormatError("config.json has no 'base_config' with a 'model_type': not an hf_epr repo")
        base = dict(self.base_config)
        model_type = base.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **base)
        except ValueError:
            pass
        reference = (base.get("auto_map") or {}).get("AutoConfig")
        if reference is None or repo is None:
            raise EPRFormatError(
                f"the base architecture {model_type!r} is neither part of transformers nor carried by the repo: "
                "install the package that defines it (and import it) before loading")
        config_class = base_class(reference, repo, **hub_kwargs)
        return config_class.from_dict({**base, "model_type": model_type})


def base_class(reference: str, repo: str | os.PathLike, **hub_kwargs: Any) -> type:
    """A class from the source files a compressed repo carries for its base architecture ("module.Class").

    Runs code from the repo, so only where the user allowed it: when this module itself runs as a repo's remote
    code (loaded with ``trust_remote_code=True``), or when ``trust_remote_code=True`` is passed here.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    if not (__name__.startswith("transformers_modules") or hub_kwargs.get("trust_remote_code")):
        raise EPRFormatError(f"the base architecture's code ({reference}) comes with the repo {repo}: "
                             "pass trust_remote_code=True to run it")
    keep = {k: hub_kwargs[k] for k in HUB_KWARGS if k in hub_kwargs}
    return get_class_from_dynamic_module(reference, str(repo), **keep)
