"""LeNet-300-100 and LeNet5-Caffe (the EPR paper's MNIST models) as transformers PreTrainedModels."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

VARIANTS = ("lenet5", "lenet300-100")


class LeNetConfig(PreTrainedConfig):
    """``variant``: "lenet5" (conv 20@5x5, pool, conv 50@5x5, pool, dense 500, dense 10; 431,080 params) or
    "lenet300-100" (MLP 784-300-100-10; 266,610 params)."""

    model_type = "hf_epr_lenet"
    variant: str = "lenet5"
    num_channels: int = 1
    image_size: int = 28

    def __post_init__(self, **kwargs):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {self.variant!r}")
        kwargs.setdefault("num_labels", 10)
        super().__post_init__(**kwargs)


class LeNetForImageClassification(PreTrainedModel):
    """LeNet classifier with the usual ``pixel_values``/``labels`` -> ``ImageClassifierOutput`` interface."""

    config_class = LeNetConfig
    main_input_name = "pixel_values"
    base_model_prefix = "lenet"

    def __init__(self, config: LeNetConfig):
        super().__init__(config)
        c, s, n = config.num_channels, config.image_size, config.num_labels
        if config.variant == "lenet5":
            side = ((s - 4) // 2 - 4) // 2
            self.features = nn.Sequential(nn.Conv2d(c, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2))
            self.classifier = nn.Sequential(nn.Linear(50 * side * side, 500), nn.ReLU(), nn.Linear(500, n))
        else:
            self.features = nn.Identity()
            self.classifier = nn.Sequential(nn.Linear(c * s * s, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                            nn.Linear(100, n))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(module.weight, a=5 ** 0.5)
            fan_in = module.weight[0].numel()
            nn.init.uniform_(module.bias, -fan_in ** -0.5, fan_in ** -0.5)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> ImageClassifierOutput:
        logits = self.classifier(self.features(pixel_values).flatten(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(LeNetConfig.model_type, LeNetConfig, exist_ok=True)
AutoModelForImageClassification.register(LeNetConfig, LeNetForImageClassification, exist_ok=True)
