import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pyrodiff.chain.decoders import check_levels_grid
from pyrodiff.data import GAUSSIANS8_ENTROPY, load_dataset
from pyrodiff.theory.mixture import IsotropicGaussianMixture


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


def test_gaussians8_law_is_its_eight_gaussians_and_gives_its_log_density():
    """The law: 8 means 2 (cos, sin)(2 pi k / 8), variance 0.1^2, equal weights; ``log_density`` (torch.distributions)
    equals the explicit formula log (1/8) sum_k N(x; mu_k, 0.01 I) in float64 and the independent implementation of
    the theory stage, ``IsotropicGaussianMixture.of(dataset).log_prob``; the data follow the law's moments."""
    d = load_dataset("gaussians8")
    law = IsotropicGaussianMixture.of(d)
    angles = 2 * np.pi * np.arange(8) / 8
    centres = 2 * np.stack([np.cos(angles), np.sin(angles)], 1)
    assert np.allclose(d.mixture.means.numpy(), centres, rtol=0, atol=1e-15) and d.mixture.means.dtype == torch.float64
    assert np.allclose(law.means.numpy(), centres, rtol=0, atol=1e-15) and law.means.dtype == torch.float64
    assert law.variance == pytest.approx(0.01, rel=1e-15) and np.allclose(law.weights.numpy(), 1 / 8, rtol=1e-15)
    x = d.test[:500]
    sq = ((x.double().numpy()[:, None, :] - centres) ** 2).sum(-1)
    expected = np.log(np.exp(-sq / 0.02).sum(1) / 8) - np.log(2 * np.pi * 0.01)
    got = d.log_density(x)
    assert got.dtype == torch.float64 and np.allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got, law.log_prob(x), rtol=1e-12, atol=1e-12)
    train = d.train.double().numpy()
    n = len(train)
    assert np.all(np.abs(train.mean(0) - law.mean().numpy()) < 4.5 * train.std(0) / np.sqrt(n))
    m = law.mean().numpy()
    products = (train - m)[:, :, None] * (train - m)[:, None, :]
    assert np.all(np.abs(products.mean(0) - law.covariance().numpy()) < 4.5 * products.std(0) / np.sqrt(n))
    h, se = law.entropy_estimate(4000, torch.Generator().manual_seed(0))
    assert abs(h - GAUSSIANS8_ENTROPY) < 4.5 * se
    for name in ("moons", "swissroll", "digits"):
        assert load_dataset(name).mixture is None
        with pytest.raises(ValueError, match=f"dataset '{name}' has no known Gaussian-mixture law"):
            IsotropicGaussianMixture.of(load_dataset(name))
    with pytest.raises(ValueError, match=r"batch of shape \(N, 2\), got \(4, 3\)"):
        d.log_density(torch.zeros(4, 3))


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


def _python2_batch(images: np.ndarray) -> bytes:
    """A CIFAR-10 batch as the official files hold it: a Python 2 protocol-2 pickle of a dict with str keys
    (bytes under ``encoding="bytes"``) and a uint8 array pickled through ``numpy.core.multiarray._reconstruct``."""
    raw = images.astype(np.uint8).tobytes()
    n, d = images.shape
    return (
        b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
        b"K\x00\x85U\x01b\x87Rq\x04(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", d) + b"\x86"
        b"cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tbU\x06labels]q\x07(K\x01K\x02eU\x0bbatch_labelU\x05dummyu."
    )


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _write_cifar(root):
    for name in _CIFAR_FILES:
        with open(root / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), dtype=np.uint8)}, f)


@pytest.mark.parametrize("form", ["python2", 0, 1, 2, 3, 4, 5])
def test_cifar_batches_in_every_numpy_pickle_form_are_read(tmp_path, form):
    """The official (Python 2) files, and the batches Python 3 writes with every protocol: below 3 those hold
    their bytes as ``_codecs.encode(text, "latin1")``."""
    images = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)
    for name in _CIFAR_FILES:
        batch = {b"data": images, b"labels": [0, 1], b"batch_label": b"dummy"}
        blob = _python2_batch(images) if form == "python2" else pickle.dumps(batch, protocol=form)
        (tmp_path / name).write_bytes(blob)
    c = load_dataset("cifar10", tmp_path)
    assert c.train.shape == (10, 3, 32, 32) and c.test.shape == (2, 3, 32, 32)
    expected = torch.tensor(images.reshape(-1, 3, 32, 32) / 127.5 - 1.0, dtype=torch.float32)
    assert torch.equal(c.test, expected)


def test_gzipped_cifar_batches_are_read(tmp_path):
    _write_cifar(tmp_path)
    for name in _CIFAR_FILES:
        (tmp_path / (name + ".gz")).write_bytes(gzip.compress((tmp_path / name).read_bytes()))
        (tmp_path / name).unlink()
    assert load_dataset("cifar10", tmp_path).train.shape == (10, 3, 32, 32)


class _RunsCode:
    """Pickles as a call to ``os.system``: unpickling it runs the shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL])
def test_a_cifar_batch_that_would_run_code_is_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "MARKER"
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"hook": _RunsCode(f"touch '{marker}'")}
        pickle.dump(batch, f, protocol=protocol)
    with pytest.raises(ValueError) as caught:
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()
    message = str(caught.value)
    assert str(tmp_path / "data_batch_1") in message and f"{os.system.__module__}.system" in message
    assert "could run code" in message
    with open(tmp_path / "data_batch_1", "rb") as f:
        pickle.load(f)  # the payload is live: an unrestricted load runs it
    assert marker.exists()


def _encoded_key_batch(encoding: str) -> bytes:
    """A protocol-2 pickle of ``{_codecs.encode("\\x00\\xff", encoding): 1}``; with "latin1" it is Python 3's pickle
    of ``{b"\\x00\\xff": 1}`` (bytes become that call for protocols 0-2)."""
    blob, name = pickle.dumps({b"\x00\xff": 1}, protocol=2), encoding.encode()
    assert blob.count(b"X\x06\x00\x00\x00latin1") == 1
    return blob.replace(b"X\x06\x00\x00\x00latin1", b"X" + struct.pack("<I", len(name)) + name)


@pytest.mark.parametrize("encoding", ["zlib", "hex", "rot13", "utf-8"])
def test_codecs_encode_is_allowed_only_as_protocol_2_writes_bytes(tmp_path, encoding):
    """``_codecs.encode`` is let through only as Python 3 pickles bytes for protocols 0-2: latin-1 text to
    bytes; any other codec (zlib's, hex's, ...) is no part of a CIFAR-10 batch and is refused."""
    assert pickle.loads(_encoded_key_batch("latin1")) == {b"\x00\xff": 1}
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(_encoded_key_batch(encoding))
    with pytest.raises(ValueError, match=f"_codecs.encode with the encoding {encoding!r}") as caught:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "data_batch_2") in str(caught.value)


@pytest.mark.parametrize(
    "batch, error",
    [
        ({b"labels": [0, 1]}, "no b'data' entry"),
        ([np.zeros((2, 3072), np.uint8)], "no b'data' entry"),
        ({b"data": np.zeros((2, 3000), np.uint8)}, "6000 values, not a whole number of 3x32x32 images"),
        ({b"data": [b"not", b"pixels"]}, "b'data' is not an array of bytes"),
    ],
)
def test_a_malformed_cifar_batch_is_named(tmp_path, batch, error):
    _write_cifar(tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(ValueError, match=error) as caught:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "data_batch_3") in str(caught.value)


def test_a_truncated_cifar_batch_is_named(tmp_path):
    _write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable CIFAR-10 python batch") as caught:
        load_dataset("cifar10", tmp_path)
    assert str(path) in str(caught.value)


def test_truncated_idx_file(tmp_path):
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_digits_labels_follow_their_images():
    """Each example's label is scikit-learn's label of the same image (the split permutes both alike)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    data = load_dataset("digits")
    assert data.train_labels.dtype == torch.long and data.train_labels.shape == (data.train.shape[0],)
    for images, labels in ((data.train, data.train_labels), (data.test, data.test_labels)):
        levels = ((images[:, 0] + 1) * 8).round().numpy().astype(np.int64)
        for image, label in zip(levels[:50], labels[:50].numpy(), strict=True):
            matches = np.nonzero((raw.images.astype(np.int64) == image).all((1, 2)))[0]
            assert label in raw.target[matches]


def test_missing_local_files_name_the_argument_of_each_caller(tmp_path, monkeypatch):
    """A Python caller of load_dataset is told of its root argument, not only of the command's --data-root."""
    monkeypatch.chdir(tmp_path)
    for name, folder in (("mnist", "data/mnist"), ("cifar10", "data/cifar-10-batches-py")):
        with pytest.raises(FileNotFoundError) as caught:
            load_dataset(name)
        message = str(caught.value)
        assert f"found in {folder}; pyrodiff never downloads data" in message
        assert "load_dataset's root argument" in message and "--data-root" in message
