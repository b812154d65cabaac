"""Offline MNIST and the LeNet models."""

import gzip

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageClassification

from hf_epr.data import load_mnist, mnist_image_processor, mnist_pixel_values
from hf_epr.models import LeNetConfig, LeNetForImageClassification


def test_mnist_splits():
    x, y = load_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = load_mnist("train")
    assert x.shape == (5000, 28, 28) and np.bincount(y).tolist() == [500] * 10
    with pytest.raises(ValueError):
        load_mnist("validation")


def test_corrupt_idx_file(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03not an idx file")
    monkeypatch.setenv("HF_EPR_MNIST_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="idx"):
        load_mnist("test")


@pytest.mark.parametrize("variant,count", [("lenet5", 431_080), ("lenet300-100", 266_610)])
def test_lenet(variant, count, tmp_path):
    model = LeNetForImageClassification(LeNetConfig(variant=variant)).eval()
    assert sum(p.numel() for p in model.parameters()) == count
    x = torch.randn(3, 1, 28, 28)
    out = model(pixel_values=x, labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 10) and out.loss.ndim == 0
    model.save_pretrained(tmp_path)
    again = AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, model(pixel_values=x).logits)


def test_image_processor_matches_numpy_preprocessing():
    from PIL import Image

    x, _ = load_mnist("test")
    pv = mnist_image_processor()([Image.fromarray(i, mode="L") for i in x[:5]], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pv, mnist_pixel_values(x[:5]), atol=1e-5)
