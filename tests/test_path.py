"""The shared shape of path laws: row k - 1 of a path ``(T, N, *D)`` holds x_k."""

import pytest
import torch

from pyrodiff import NoiseSchedule
from pyrodiff.chain.forward import QPosteriorOrder
from pyrodiff.chain.path import is_last_row, path_timesteps


def test_path_timesteps_number_the_rows_from_one():
    t = path_timesteps(torch.Size((4, 3)), torch.device("cpu"))
    assert t.shape == (4, 3)
    assert t.tolist() == [[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4]]


@pytest.mark.parametrize("event_dim", [0, 1, 3])
def test_last_row_marks_x_T_only(event_dim):
    mask = is_last_row(torch.Size((5, 2)), event_dim, torch.device("cpu"))
    assert mask.shape == (5,) + (1,) * (event_dim + 1) and mask.dtype == torch.bool
    assert mask.reshape(-1).tolist() == [False, False, False, False, True]


def test_path_laws_expand_only_to_their_own_shape():
    law = QPosteriorOrder(torch.zeros(3, 2), NoiseSchedule.linear(4, 0.05, 0.3))
    assert law.batch_shape == (4, 3) and law.event_shape == (2,)
    assert law.expand(torch.Size((4, 3))) is law
    with pytest.raises(ValueError, match="vectorised particles"):
        law.expand(torch.Size((2, 4, 3)))
