import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from pyrodiff.data import GAUSSIANS8_ENTROPY, load_dataset
from pyrodiff.decoders import check_levels_grid


def test_digits_are_on_the_17_level_grid_with_a_held_out_split():
    d = load_dataset("digits")
    assert d.levels == 17 and d.data_shape == (1, 8, 8)
    assert len(d.train) + len(d.test) == 1797 and len(d.test) == 359
    check_levels_grid(d.train, 17)
    check_levels_grid(d.test, 17)


@pytest.mark.parametrize("name", ["gaussians8", "moons", "swissroll"])
def test_two_d_sets(name):
    d = load_dataset(name)
    assert d.data_shape == (2,) and d.levels is None
    assert not np.allclose(d.train[:10].numpy(), d.test[:10].numpy())


def test_gaussians8_entropy_and_geometry():
    assert GAUSSIANS8_ENTROPY == pytest.approx(0.312, abs=5e-4)
    x = load_dataset("gaussians8").train.numpy()
    r = np.linalg.norm(x, axis=1)
    assert abs(r.mean() - 2.0) < 0.01


def test_gaussians8_log_density_is_normalised_and_its_mean_is_the_entropy():
    d = load_dataset("gaussians8")
    grid = torch.linspace(-3, 3, 601, dtype=torch.float64)
    xy = torch.cartesian_prod(grid, grid)
    cell = (grid[1] - grid[0]) ** 2
    assert (d.log_density(xy).exp().sum() * cell).item() == pytest.approx(1.0, abs=1e-6)
    neg_log_q = -d.log_density(d.test)
    stderr = neg_log_q.std() / len(neg_log_q) ** 0.5
    assert abs(neg_log_q.mean() - GAUSSIANS8_ENTROPY) < 4 * stderr
    assert load_dataset("moons").log_density is None


def test_missing_local_files_give_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        load_dataset("cifar10", tmp_path)


def _write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_local_mnist_and_cifar_readers(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28), dtype=np.uint8))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (2, 28, 28), dtype=np.uint8))
    d = load_dataset("mnist", tmp_path)
    assert d.train.shape == (6, 1, 28, 28) and d.test.shape == (2, 1, 28, 28) and d.levels == 256
    check_levels_grid(d.train, 256)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}, f)
    c = load_dataset("cifar10", tmp_path)
    assert c.train.shape == (15, 3, 32, 32) and c.test.shape == (3, 3, 32, 32)


def test_truncated_idx_file(tmp_path):
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
