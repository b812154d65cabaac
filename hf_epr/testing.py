"""Small models and data for tests and benchmarks (as ``transformers.testing_utils``): tiny configs of several
vision families, a few plain training steps of an EPRModel, LeNet references trained on real MNIST, the accelerator
path taken on the CPU, and a count of the operations that launch work."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (AutoModelForImageClassification, ConvNextConfig, MobileNetV2Config, RegNetConfig,
                          ResNetConfig, SwinConfig, ViTConfig)

from .data import TensorRows, load_mnist, mnist_pixel_values
from .format import decoders
from .models import LeNetConfig, LeNetForImageClassification

TINY_CONFIGS = {
    "resnet": lambda: ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                   layer_type="basic", num_labels=4),
    "convnext": lambda: ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4),
    "vit": lambda: ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32, num_labels=4),
    "mobilenet_v2": lambda: MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=4),
    "swin": lambda: SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1],
                               num_heads=[1, 2], window_size=2, num_labels=4),
    "regnet": lambda: RegNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                   groups_width=8, num_labels=4),
}
IMAGE_SIZE = {"vit": 16, "swin": 16}
# aten operations that launch no work of their own (views, allocations, metadata)
NO_WORK = {"view", "detach", "as_strided", "slice", "reshape", "narrow", "empty", "empty_strided", "t", "transpose",
           "expand", "unsqueeze", "squeeze", "alias", "resolve_conj", "resolve_neg", "_reshape_alias", "permute",
           "select", "split", "split_with_sizes", "unbind", "chunk", "to", "lift_fresh", "empty_like", "view_as",
           "expand_as", "contiguous", "result_type", "is_nonzero", "item", "_local_scalar_dense", "_to_copy"}


def take_accelerator_path(set_attribute=setattr) -> None:
    """Training takes the accelerator path on the CPU from now on: torch operations, nothing read back from the device
    (pass a pytest ``monkeypatch.setattr`` to have it undone after the test)."""
    set_attribute(decoders, "_native_train", None)
    set_attribute(decoders, "accelerator_path", lambda device: True)


def working_operations(fn) -> int:
    """The aten operations that launch work in one call of ``fn`` (on a GPU each is a kernel launch or more)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages()
               if e.key.startswith("aten::") and e.key.removeprefix("aten::") not in NO_WORK)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialized image classifier of ``family`` (a key of ``TINY_CONFIGS``), in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForImageClassification.from_config(TINY_CONFIGS[family]()).eval()


def tiny_inputs(family: str, n: int = 8, seed: int = 1) -> torch.Tensor:
    """Random pixel values that fit ``tiny_model(family)``."""
    size = IMAGE_SIZE.get(family, 32)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_a_few_steps(model, x: torch.Tensor, steps: int = 5, lam: float = 0.05) -> None:
    """Adam on task loss + lam * bits / N with labels ``arange % 4`` (the EPRModel's own parameter groups)."""
    model.train()
    groups = model.parameter_groups()
    opt = torch.optim.Adam([{"params": groups["latents"], "lr": 1e-3}, {"params": groups["decoders"], "lr": 1e-2},
                            {"params": groups["density"], "lr": 1e-2}, {"params": groups["raw"], "lr": 1e-3}])
    labels = torch.arange(len(x)) % 4
    for _ in range(steps):
        opt.zero_grad()
        loss = model(pixel_values=x, labels=labels).loss + lam * model.bits() / model.num_compressed_parameters
        loss.backward()
        opt.step()
    model.eval()


def small_container():
    """A three-tensor container (two entropy-coded groups, two escapes, one raw tensor): the golden test vector of
    the coded format (``tests/data/golden_v*.safetensors``)."""
    from .format.coders import quantize_pmf
    from .format.container import CodedGroup, Container

    rng = np.random.default_rng(0)
    c = Container(precision=16)
    v1 = np.round(rng.laplace(0, 1.5, 300)).astype(np.int32)
    v2 = np.append(np.round(rng.normal(0, 0.6, 200)), [40, -50]).astype(np.int32)  # two escapes
    c.groups = [CodedGroup(int(v1.min()), quantize_pmf(np.bincount(v1 - v1.min()).tolist() + [0], 16), v1),
                CodedGroup(-3, quantize_pmf(np.ones(8), 16), v2)]
    c.tensors = [{"name": "a.weight", "aliases": [], "shape": [20, 15], "kind": "affine", "groups": [0], "params": 0},
                 {"name": "b.weight", "aliases": [], "shape": [202], "kind": "affine", "groups": [1], "params": 2},
                 {"name": "b.bias", "aliases": [], "shape": [3], "kind": "raw", "dtype": "float32",
                  "offset": c.add_raw(np.array([1.0, -2.0, 0.5], np.float32), "float32")}]
    c.params = [float(np.log(0.01)), 0.0, float(np.log(0.1)), 0.25]
    return c


def mnist_subset(n: int, split: str = "train", with_labels: bool = True) -> TensorRows:
    """The first ``n`` MNIST images of ``split`` as in-memory rows (pixel_values, labels)."""
    x, y = load_mnist(split)
    data = {"pixel_values": mnist_pixel_values(x[:n])}
    if with_labels:
        data["labels"] = torch.from_numpy(y[:n])
    return TensorRows(data)


def mnist_reference(variant: str = "lenet300-100", steps: int = 150) -> LeNetForImageClassification:
    """A LeNet trained for ``steps`` Adam steps (batch 64, seeded) on the MNIST training images, in eval mode."""
    torch.manual_seed(0)
    model = LeNetForImageClassification(LeNetConfig(variant=variant))
    x, y = load_mnist("train")
    xs, ys = mnist_pixel_values(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (64,), generator=g)
        opt.zero_grad()
        model(pixel_values=xs[idx], labels=ys[idx]).loss.backward()
        opt.step()
    return model.eval()
