"""hf_epr: entropy penalized reparameterization (EPR) model compression for Hugging Face models."""

from . import models  # registers hf_epr's own architectures (LeNet) with transformers' Auto classes
from .config import EPRConfig, EPRConfigError
from .format import EPRCompressedConfig, EPRCompressedForImageClassification, EPRError, EPRFormatError
from .hub import register_auto_classes
from .modeling import EPRModel
from .trainer import EPRTrainer, EPRTrainingArguments, EPRTrainingError

__all__ = ["EPRConfig", "EPRConfigError", "EPRCompressedConfig", "EPRCompressedForImageClassification", "EPRError",
           "EPRFormatError", "EPRModel", "EPRTrainer", "EPRTrainingArguments", "EPRTrainingError"]
__version__ = "0.1.0"

register_auto_classes()
