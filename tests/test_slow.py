"""Long checks, left out of CI: run with ``pytest -m slow``."""

import pytest
import torch
from test_train import TINY_2D

from pyrodiff.training.checkpoint import load_checkpoint
from pyrodiff.training.loop import train


@pytest.mark.slow
def test_compiled_network_trains_like_the_eager_one(tmp_path):
    """``compile = true`` compiles the network (inductor needs a C++ compiler) and follows the same
    loss curve as eager execution."""
    eager = train(TINY_2D, tmp_path / "eager", progress=False, num_samples=8)
    compiled = train(
        TINY_2D.with_changes({"training": {"compile": True}}), tmp_path / "compiled", progress=False, num_samples=8
    )
    a, b = load_checkpoint(eager.checkpoint), load_checkpoint(compiled.checkpoint)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-4)
    for name, value in a["network"].items():
        assert torch.allclose(value, b["network"][name], rtol=1e-4, atol=1e-5)
