"""Shared fixtures: tiny models of several architecture families, and a clean subprocess without hf_epr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (AutoModelForImageClassification, ConvNextConfig, MobileNetV2Config, RegNetConfig,
                          ResNetConfig, SwinConfig, ViTConfig)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForImageClassification.from_config(TINY_CONFIGS[family]()).eval()


def tiny_inputs(family: str, n: int = 8, seed: int = 1) -> torch.Tensor:
    size = IMAGE_SIZE.get(family, 32)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


_BLOCK_HF_EPR = """
import sys
class _NoHfEpr:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_epr" or name.startswith("hf_epr."):
            raise ImportError("hf_epr is hidden in this process")
        return None
sys.meta_path.insert(0, _NoHfEpr())
"""


def run_without_hf_epr(code: str, tmp_path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import hf_epr`` fails (as on a machine without it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": ""}
    script = _BLOCK_HF_EPR + "\ntry:\n    import hf_epr\n    raise SystemExit('hf_epr importable')\n" \
        "except ImportError:\n    pass\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def no_hf_epr_runner(tmp_path):
    return lambda code: run_without_hf_epr(code, tmp_path)
