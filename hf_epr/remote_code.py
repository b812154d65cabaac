"""What a compressed repo carries so that it loads where hf_epr is not installed.

* the ``hf_epr.format`` modules (the decoder, as the repo's remote code), and an ``auto_map`` from every Auto
  class under which the base architecture is registered to the matching loader class;
* for a base architecture outside transformers (hf_epr's LeNets, a user's own model), its configuration and
  modeling source files with their relative imports, and an ``auto_map`` to them in ``base_config`` — as
  transformers does for custom models.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files

from . import format as epr_format
from .format.container import atomic_write
from .format.errors import EPRFormatError
from .format.modeling_epr import auto_classes_of, loader_name, model_class_for

logger = logging.getLogger(__name__)
FORMAT_DIR = Path(epr_format.__file__).parent
BUNDLED_FILES = tuple(f"{name}.py" for name in epr_format.BUNDLED_MODULES)


def _class_names(config) -> dict[str, str]:
    """Auto class -> name of the model class it gives for ``config``."""
    names = {}
    for auto_class in auto_classes_of(config):
        reference = (getattr(config, "auto_map", None) or {}).get(auto_class)
        names[auto_class] = reference.split(".")[-1] if reference else model_class_for(config, auto_class).__name__
    return names


def repo_auto_map(base: PreTrainedModel) -> tuple[dict[str, str], list[str]]:
    """(auto_map, architectures) of a compressed repo whose base model is ``base``."""
    names = _class_names(base.config)
    auto_map = {"AutoConfig": "configuration_epr.EPRCompressedConfig",
                **{name: f"modeling_epr.{loader_name(name)}" for name in names}}
    own = [name for name, cls in names.items() if cls == type(base).__name__]
    return auto_map, [loader_name(own[0] if own else (list(names) or ["AutoModel"])[0])]


def write_remote_code(folder: str | os.PathLike, base: PreTrainedModel, base_config: dict[str, Any]) -> list[str]:
    """Copy the decoder modules, and the base architecture's own source when transformers does not define it,
    into ``folder``; sets ``base_config["auto_map"]`` for the latter. Returns the files written."""
    written = []
    for name in BUNDLED_FILES:
        atomic_write(Path(folder) / name, (FORMAT_DIR / name).read_bytes())
        written.append(name)
    return written + write_base_code(folder, base, base_config, written)


def write_base_code(folder: str | os.PathLike, base: PreTrainedModel, config: dict[str, Any],
                    taken: list[str] = ()) -> list[str]:
    """Copy the source files of ``base``'s architecture into ``folder`` unless transformers defines it, and set
    ``config["auto_map"]`` (``config``: a config dict) to its classes. Returns the files written."""
    written = list(taken)
    if type(base).__module__.startswith("transformers.") and type(base.config).__module__.startswith("transformers."):
        return []
    own_map = {k: v for k, v in (getattr(base.config, "auto_map", None) or {}).items() if isinstance(v, str)}
    if own_map:  # a model loaded as remote code: carry the same files and the same auto_map
        folder_of_code = Path(sys.modules[type(base).__module__].__file__).parent
        for reference in own_map.values():
            _copy_source(folder_of_code / f"{reference.split('.')[0]}.py", folder, written)
        config["auto_map"] = own_map
        return written[len(taken):]
    classes = {"AutoConfig": type(base.config)}
    classes.update({name: model_class_for(base.config, name) for name in auto_classes_of(base.config)})
    auto_map = {}
    for auto_class, cls in classes.items():
        module = sys.modules.get(cls.__module__)
        source = getattr(module, "__file__", None)
        if cls.__module__ == "__main__" or not source:
            logger.warning("%s is defined in %s: its code cannot travel with the repo, which will then need that "
                           "code installed to load", cls.__name__, cls.__module__)
            return written[len(taken):]
        _copy_source(Path(source), folder, written)
        auto_map[auto_class] = f"{Path(source).stem}.{cls.__name__}"
    config["auto_map"] = auto_map
    return written[len(taken):]


def _copy_source(source: Path, folder: str | os.PathLike, written: list[str]) -> None:
    """Copy a module file and the files it imports relatively (recursively) into ``folder``."""
    for path in [source, *map(Path, get_relative_import_files(source))]:
        if path.name in BUNDLED_FILES:
            raise EPRFormatError(f"the base architecture's source file {path.name} has the name of one of hf_epr's "
                                 f"own repo files {BUNDLED_FILES}: rename it to save a compressed repo")
        if path.name not in written:
            atomic_write(Path(folder) / path.name, path.read_bytes())
            written.append(path.name)
