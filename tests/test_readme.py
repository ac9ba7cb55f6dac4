"""Every Python snippet of README.md runs as printed, in a fresh namespace and an empty working folder.

The SVI script scores the full chain of 1000 steps in its first ``svi.step`` (about 50 s and 5 GB of memory), too
long for CI: CI runs the same lines with the chain shortened (the texts of ``SHORTER`` replaced, each of which must be
in the snippet), and ``pytest -m slow`` runs it verbatim.  The adapter snippet loads a diffusers model and CIFAR-10
from local paths: it runs on a small diffusers U-Net saved under the folder name it loads and CIFAR-10 batches
written where it reads them."""

import pickle
import re
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch

README = Path(__file__).parents[1] / "README.md"

#: the snippet each test runs, by a text only it contains
SVI, ADAPTER, CONTINUOUS = 'pyro.optim.Adam({"lr": 2e-4})', "load_diffusers(", "pyrodiff.ContinuousGuide(schedule)"

#: CI's shorter chain for the SVI script: T = 20, and its respaced chains of 5 steps instead of 50
SHORTER = {"num_steps=1000": "num_steps=20", "steps=50": "steps=5", "respaced(50)": "respaced(5)"}


def _snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _snippet(marker: str) -> str:
    (found,) = [code for code in _snippets() if marker in code]
    return found


def _run(code: str, folder: Path, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_every_snippet_has_its_test():
    """Each Python block of the README is the one snippet holding one of the markers the tests below run by."""
    snippets = _snippets()
    markers = (SVI, ADAPTER, CONTINUOUS)
    assert len(snippets) == 3 and sorted(sum(m in code for code in snippets) for m in markers) == [1, 1, 1]


def test_the_learned_schedule_snippet(tmp_path, monkeypatch):
    """SVI trains the schedule (the guide registers it); the continuous bound and the 50-step chain share the prior
    term exactly (KL(q(z_1 | x) || N(0, I)) at the same endpoint)."""
    from pyrodiff import LearnedSchedule

    ns = _run(_snippet(CONTINUOUS), tmp_path, monkeypatch)
    start = LearnedSchedule(num_steps=100, gamma_min=-8.0, gamma_max=5.0).state_dict()
    moved = [k for k, v in ns["schedule"].state_dict().items() if not torch.equal(v, start[k])]
    assert "gamma_0" in moved and "w2" in moved
    bound, terms = ns["bound"], ns["terms"]
    torch.testing.assert_close(terms.nats[0, :, -1], bound.nats[0, :, 2], rtol=1e-5, atol=1e-6)


def _check_svi_script(namespace: dict, T: int, K: int) -> None:
    assert namespace["prior"].shape == (2, 1, 4, 1, 8, 8)  # sampled before any data was scored
    assert np.isfinite(namespace["loss"]) and namespace["samples"].shape == namespace["fast"].shape == (16, 1, 8, 8)
    assert namespace["terms"].nats.shape == (1, 8, T + 1) and namespace["ddim_terms"].nats.shape == (1, 8, K + 1)
    assert torch.isfinite(namespace["ddim_terms"].nats).all()


def test_the_svi_script_on_a_shorter_chain(tmp_path, monkeypatch):
    code = _snippet(SVI)
    for long, short in SHORTER.items():
        assert long in code, f"the README's SVI script no longer holds {long!r}: update SHORTER"
        code = code.replace(long, short)
    _check_svi_script(_run(code, tmp_path, monkeypatch), T=20, K=5)


@pytest.mark.slow
def test_the_svi_script_as_printed(tmp_path, monkeypatch):
    _check_svi_script(_run(_snippet(SVI), tmp_path, monkeypatch), T=1000, K=50)


def test_the_adapter_snippet(tmp_path, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(tmp_path / "ddpm-cifar10-32")
    diffusers.DDPMScheduler(num_train_timesteps=10).save_pretrained(tmp_path / "ddpm-cifar10-32")
    cifar = tmp_path / "data" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}, f)
    namespace = _run(_snippet(ADAPTER), tmp_path, monkeypatch)
    assert namespace["terms"].nats.shape == (1, 3, 11) and torch.isfinite(namespace["terms"].bits_per_dim).all()
