"""The pure parts of the owner-rank map: who owns which matrix, which rows each rank holds."""

import pytest
import torch

from specscope.errors import ConfigError
from specscope.optim._distributed import owner_map, owners, row_spans
from specscope.train.distributed import shard


def test_owners_balance_cost_not_count():
    # one big matrix and six small ones on 2 ranks: the big one alone on a rank, the small ones on the other
    assert owners([100, 10, 10, 10, 10, 10, 10], 2) == [0, 1, 1, 1, 1, 1, 1]
    assert sorted(owners([1.0] * 8, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_row_spans_follow_torch_chunk():
    for rows, size in [(3, 4), (10, 4), (12, 2), (1, 2)]:
        chunks = torch.arange(rows).chunk(size)
        spans = row_spans(rows, size)
        for r, (a, b) in enumerate(spans):
            got = list(range(a, b))
            assert got == (chunks[r].tolist() if r < len(chunks) else []), (rows, size, r)


def test_without_a_process_group_the_map_is_local_and_batched():
    calls = []
    mats = [torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 5)]
    out = owner_map(mats, lambda X: calls.append(X.shape) or 2 * X)
    assert sorted(calls) == [torch.Size([1, 2, 5]), torch.Size([2, 4, 3])]  # one call per shape
    for m, (o,) in zip(mats, out):
        torch.testing.assert_close(o, 2 * m)


def test_shard_without_process_group_names_the_fix():
    with pytest.raises(ConfigError, match="torchrun"):
        shard(torch.nn.Linear(2, 2))
