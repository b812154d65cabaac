"""Shared fixtures: a clean subprocess in which hf_epr cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hf_epr import EPRConfig, EPRModel
from hf_epr.testing import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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


@pytest.fixture
def compressed(tmp_path):
    """(model, folder, processor): a tiny ResNet wrapped with a coarse step, saved with an image processor."""
    from transformers import ViTImageProcessorPil

    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.05)).eval()
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(folder)
    return model, folder, processor
