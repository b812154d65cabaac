"""Small reference architectures as transformers models (registered with the Auto classes on import)."""

from .lenet import LeNetConfig, LeNetForImageClassification

__all__ = ["LeNetConfig", "LeNetForImageClassification"]
