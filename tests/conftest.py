"""Shared fixtures: a clean subprocess in which hf_epr cannot be imported; training on the accelerator path, and
the places where hf_epr reads a tensor's value on the host."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch

from hf_epr import EPRConfig, EPRModel
from hf_epr.testing import take_accelerator_path, tiny_model

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


@pytest.fixture
def accelerator_path(monkeypatch):
    """Training takes the accelerator path on the CPU: torch operations, nothing read back from the device."""
    take_accelerator_path(monkeypatch.setattr)


@pytest.fixture
def hf_epr_tensor_reads(monkeypatch) -> list[str]:
    """Where hf_epr's code reads a tensor's value on the host from now on (``tolist``, ``item``, ``bool``, ``int`` or
    ``float`` of a tensor): per read, its hf_epr frames as ``file:function``, outermost first, joined by " > ". The
    noise offsets, which torch.randint draws on the host, are numbers here (on a GPU they are not device reads)."""
    reads: list[str] = []

    def recorded(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            ours = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}hf_epr{os.sep}" in f.filename]
            if ours:
                reads.append(" > ".join(f"{Path(f.filename).name}:{f.name}" for f in ours))
            return original(self, *args, **kwargs)
        return read

    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, recorded(name))
    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda high, size, **kw: high // 2 if size == () else randint(high, size,
                                                                                                       **kw))
    return reads
