"""Datasets, each with a held-out test split, as tensors scaled the way the decoders expect.

Bundled (no download): scikit-learn's 8x8 ``digits`` (17 grey levels, scaled to a 17-level grid in
[-1, 1]) and three 2-D sets: ``gaussians8`` (8 Gaussians of std 0.1 on a circle of radius 2, whose
differential entropy, 0.312 nats, is the limit of the negative ELBO), ``moons`` and ``swissroll``.
Local files: ``mnist`` (IDX files) and ``cifar10`` (the python pickle batches), read with numpy. A data
root may come from a specification file, so the CIFAR-10 batches are unpickled with an allow-list of
the few numpy globals they hold: a crafted batch cannot run code.
"""

from __future__ import annotations

import gzip
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

__all__ = ["Dataset", "MixtureParameters", "load_dataset", "DATASETS", "GAUSSIANS8_ENTROPY", "pixel_histogram_nats"]

#: Differential entropy (nats) of the 8-Gaussian mixture: log 8 + log(2 pi e sigma^2), the modes being
#: far apart relative to sigma = 0.1 (the overlap correction is below 1e-30).
GAUSSIANS8_ENTROPY = math.log(8) + 1 + math.log(2 * math.pi * 0.1**2)


@dataclass(frozen=True, eq=False)
class MixtureParameters:
    r"""The parameters of an isotropic Gaussian mixture :math:`q(x_0) = \sum_j \pi_j N(\mu_j, s^2 I)`, as plain data:
    ``means`` :math:`\mu_j` ``(K, *D)`` and ``weights`` :math:`\pi_j` ``(K,)`` (summing to 1), float64, and
    ``variance`` :math:`s^2 > 0`.  :meth:`log_prob` is the law's log-density (torch.distributions); the law with its
    noisy marginals and exact reverse process is ``pyrodiff.theory.mixture.IsotropicGaussianMixture.of(dataset)``."""

    means: torch.Tensor
    variance: float
    weights: torch.Tensor

    def log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(x_0) = \log \sum_j \pi_j N(x_0; \mu_j, s^2 I)` of a batch ``(N, *D)``: shape ``(N,)``, float64,
        on ``x0``'s device (``MixtureSameFamily`` of ``Independent`` normals)."""
        shape = tuple(self.means.shape[1:])
        if not torch.is_tensor(x0) or tuple(x0.shape[1:]) != shape:
            got = tuple(x0.shape) if torch.is_tensor(x0) else type(x0).__name__
            raise ValueError(f"log_prob needs a batch of shape (N, {', '.join(map(str, shape))}), got {got}")
        means, weights = self.means.to(x0.device), self.weights.to(x0.device)
        components = Independent(Normal(means, math.sqrt(self.variance), validate_args=False), len(shape))
        law = MixtureSameFamily(Categorical(probs=weights, validate_args=False), components, validate_args=False)
        return law.log_prob(x0.to(torch.float64))


@dataclass
class Dataset:
    r"""A train/test split. ``levels`` is the number of grid values for integer data (None if continuous);
    ``log_density``, where the data's law :math:`q(x_0)` is known exactly, maps ``(N, *D)`` to
    :math:`\log q(x_0)`, shape ``(N,)``; ``mixture``, where that law is an isotropic Gaussian mixture (gaussians8),
    holds its parameters (its ``log_prob`` is ``log_density``).
    ``train_labels`` / ``test_labels`` are the class of each example where the data have classes (digits)."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    levels: int | None
    log_density: Callable[[torch.Tensor], torch.Tensor] | None = None
    mixture: MixtureParameters | None = None
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def _split(
    x: np.ndarray, test_fraction: float, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    x = torch.as_tensor(x[perm], dtype=dtype)
    return x[n_test:], x[:n_test]


def levels_to_unit(v: np.ndarray, levels: int) -> np.ndarray:
    """Integers 0..levels-1 to the grid 2 v / (levels - 1) - 1 in [-1, 1]."""
    return 2.0 * v.astype(np.float64) / (levels - 1) - 1.0


def _digits(root: Path | None) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.int64)  # (1797, 8, 8), values 0..16
    train, test = _split(levels_to_unit(images, 17)[:, None], 0.2, seed=0)
    train_labels, test_labels = _split(digits.target, 0.2, seed=0, dtype=torch.long)
    return Dataset("digits", train, test, levels=17, train_labels=train_labels, test_labels=test_labels)


def _gaussians8_centres() -> np.ndarray:
    angles = 2 * np.pi * np.arange(8) / 8
    return 2.0 * np.stack([np.cos(angles), np.sin(angles)], 1)


def _gaussians8(num: int, rng: np.random.Generator) -> np.ndarray:
    return _gaussians8_centres()[rng.integers(0, 8, num)] + 0.1 * rng.standard_normal((num, 2))


def _gaussians8_law() -> MixtureParameters:
    r"""The law of gaussians8, :math:`q(x) = \tfrac18 \sum_k N(x; \mu_k, 0.1^2 I)`, in float64 (its ``log_prob`` is
    float64 for float32 data)."""
    return MixtureParameters(
        torch.as_tensor(_gaussians8_centres(), dtype=torch.float64),
        0.1**2,
        torch.full((8,), 1 / 8, dtype=torch.float64),
    )


def _moons(num: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(num, noise=0.05, random_state=int(rng.integers(2**31)))
    return (x - np.array([0.5, 0.25])) * 1.5


def _swissroll(num: int, rng: np.random.Generator) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(num, noise=0.25, random_state=int(rng.integers(2**31)))
    return x[:, [0, 2]] / 5.0


def _two_d(
    generator,
    law: Callable[[], MixtureParameters] | None = None,
    num_train: int = 20000,
    num_test: int = 5000,
):
    def load(root: Path | None) -> Dataset:
        train = generator(num_train, np.random.default_rng(0))
        test = generator(num_test, np.random.default_rng(1))
        known = None if law is None else law()
        return Dataset(
            generator.__name__.lstrip("_"),
            torch.tensor(train, dtype=torch.float32),
            torch.tensor(test, dtype=torch.float32),
            None,
            None if known is None else known.log_prob,
            known,
        )

    return load


def _find(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        for candidate in (root / name, root / (name + ".gz")):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(
        f"{what}: none of {names} (optionally .gz) found in {root}; pyrodiff never downloads data: put the files "
        "there or name their folder (load_dataset's root argument; data.root in a specification; --data-root of "
        "the command and scripts)"
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _mnist(root: Path | None) -> Dataset:
    root = Path(root or "data/mnist")
    train = _read_idx(_find(root, ["train-images-idx3-ubyte", "train-images.idx3-ubyte"], "MNIST"))
    test = _read_idx(_find(root, ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"], "MNIST"))
    as_tensor = lambda a: torch.tensor(levels_to_unit(a, 256)[:, None], dtype=torch.float32)  # noqa: E731
    return Dataset("mnist", as_tensor(train), as_tensor(test), levels=256)


def _latin1_bytes(text: object, encoding: object = None, errors: object = None) -> bytes:
    """``_codecs.encode`` as Python 3's pickles of bytes call it for protocols 0-2 (``encode(text, "latin1")``),
    and nothing else: another codec is no part of a CIFAR-10 batch."""
    if not isinstance(text, str) or encoding != "latin1" or errors is not None:
        raise pickle.UnpicklingError(
            f"_codecs.encode with the encoding {encoding!r}, where a pickle of bytes has 'latin1'"
        )
    return text.encode("latin1")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch, refusing every global but those its numpy arrays need.

    A batch is a dict of bytes keys holding lists, bytes and uint8 arrays. An array pickles as
    ``_reconstruct(ndarray, ...)`` with a ``dtype`` (the official Python 2 files and protocols up to 4,
    ``numpy.core`` before numpy 2, ``numpy._core`` since), or with protocol 5 as ``_frombuffer``. Python 3
    pickles bytes for protocols 0-2 as ``_codecs.encode(text, "latin1")``: that global is read as
    :func:`_latin1_bytes`, which does only that. Any other global (``os.system``, say) is what a crafted
    file would call, so it is refused."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
        }
    )

    def __init__(self, file: BinaryIO, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) not in self.ALLOWED:
            raise ValueError(
                f"{self.path} refers to {module}.{name}, which a CIFAR-10 batch never holds; "
                f"it was not loaded, because unpickling it could run code"
            )
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> np.ndarray:
    """The images of one CIFAR-10 python batch, ``(N, 3, 32, 32)`` uint8, read without running code from it."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        try:
            d = _BatchUnpickler(f, path).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path} is not a readable CIFAR-10 python batch: {e}") from e
    if not isinstance(d, dict) or b"data" not in d:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: it has no b'data' entry")
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: b'data' is not an array of bytes ({e})") from e
    if data.size % (3 * 32 * 32):
        raise ValueError(f"{path}: b'data' holds {data.size} values, not a whole number of 3x32x32 images")
    return data.reshape(-1, 3, 32, 32)


def _cifar10(root: Path | None) -> Dataset:
    root = Path(root or "data/cifar-10-batches-py")

    def batch(name: str) -> np.ndarray:
        return _read_cifar_batch(_find(root, [name], "CIFAR-10"))

    train = np.concatenate([batch(f"data_batch_{i}") for i in range(1, 6)])
    test = batch("test_batch")
    as_tensor = lambda a: torch.tensor(levels_to_unit(a, 256), dtype=torch.float32)  # noqa: E731
    return Dataset("cifar10", as_tensor(train), as_tensor(test), levels=256)


DATASETS = {
    "digits": _digits,
    "gaussians8": _two_d(_gaussians8, _gaussians8_law),
    "moons": _two_d(_moons),
    "swissroll": _two_d(_swissroll),
    "mnist": _mnist,
    "cifar10": _cifar10,
}


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Load a dataset by name (see :data:`DATASETS`); ``root`` is the folder of local files."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    data = DATASETS[name](None if root is None else Path(root))
    if len(data.train) == 0 or len(data.test) == 0:
        raise ValueError(f"dataset {name!r} has an empty split")
    return data


def pixel_histogram_nats(train: torch.Tensor, test: torch.Tensor, levels: int) -> torch.Tensor:
    r"""The baseline with no model of dependencies between pixels: independent per-pixel categoricals over the
    ``levels`` grid levels, fit to the training counts with add-one smoothing; :math:`-\log p(x)` of each test
    example (nats, exact), shape ``(N,)``.  Its parameters are the ``D x levels`` probabilities."""
    to_level = lambda x: ((x.reshape(len(x), -1) + 1) * (levels - 1) / 2).round().long()  # noqa: E731
    counts = torch.nn.functional.one_hot(to_level(train), levels).sum(0).double() + 1  # (D, levels)
    log_p = (counts / counts.sum(-1, keepdim=True)).log()
    return -log_p.gather(1, to_level(test).T).sum(0)
