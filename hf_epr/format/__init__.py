"""The coded format: everything needed to read and write a compressed repo.

``hf_epr`` imports this package, and ``save_pretrained`` copies its modules (all but this file) into every
compressed repo as the repo's remote code, so they use relative imports only and need nothing beyond torch,
transformers, numpy, safetensors and constriction (where hf_epr is installed, they use its compiled decoder,
``_native.c``, which the repo does not carry).
"""

from .coders import CODERS, Coder, categorical, histogram_table, quantize_pmf
from .configuration_epr import CONFIG_MODEL_TYPE, EPRCompressedConfig
from .container import (FORMAT_VERSION, WEIGHTS_NAME, CodedGroup, Container, atomic_write, file_size_report,
                        parse_container, read_container)
from .latents import decode_latents
from .decoders import DECODER_KINDS, AffineKind, DCTKind, DecoderKind, decoder_for_entry, register_decoder_kind
from .errors import EPRError, EPRFormatError
from .modeling_epr import (AUTO_CLASSES, LOADERS, EPRCompressedForImageClassification, EPRCompressedLoader,
                           auto_classes_of, architecture_class, decode_state_dict, loader_name, resolve_file)

BUNDLED_MODULES = ("errors", "coders", "decoders", "latents", "container", "configuration_epr", "modeling_epr")
