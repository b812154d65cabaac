"""LeNet-300-100 and LeNet5-Caffe (the EPR paper's MNIST models) as transformers models."""

import math
from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

VARIANTS = ("lenet5", "lenet300-100")


@strict
class LeNetConfig(PreTrainedConfig):
    """``variant``: "lenet5" (LeNet5-Caffe, 431,080 params) or "lenet300-100" (MLP 784-300-100-10, 266,610 params).

    Like transformers 5.x's own configs this is a (strict, type-checked) dataclass: fields are class annotations.
    ``num_labels`` defaults to 10 (stored as ``id2label``/``label2id`` as usual).
    """

    model_type: ClassVar[str] = "hf_epr_lenet"
    variant: str = "lenet5"
    num_channels: int = 1
    image_size: int = 28

    def __post_init__(self, **kwargs) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {self.variant!r}")
        if self.id2label is None:  # a config loaded from JSON carries id2label; only fresh configs get 10 labels
            kwargs.setdefault("num_labels", 10)
        super().__post_init__(**kwargs)


class LeNetForImageClassification(PreTrainedModel):
    """LeNet classifier: ``pixel_values`` (B, 1, 28, 28) [+ ``labels``] -> ``ImageClassifierOutput``."""

    config_class = LeNetConfig
    config: LeNetConfig
    main_input_name = "pixel_values"
    base_model_prefix = "lenet"
    input_modalities = ("image",)

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

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default Linear/Conv2d init, via transformers' guarded init (skips weights already loaded)."""
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> ImageClassifierOutput | tuple:
        """Logits (B, num_labels); cross-entropy ``loss`` when ``labels`` are given."""
        logits = self.classifier(self.features(pixel_values).flatten(1))
        loss = nn.functional.cross_entropy(logits, labels.view(-1).long()) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()


AutoConfig.register(LeNetConfig.model_type, LeNetConfig, exist_ok=True)
AutoModelForImageClassification.register(LeNetConfig, LeNetForImageClassification, exist_ok=True)
