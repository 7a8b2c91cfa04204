"""How a rollout batch is cut into mini-batches and micro-batches (pure functions)."""

from __future__ import annotations

import doctest

import torch

import alp_agents.learner.batching as batching_module
from alp_agents.learner.batching import first_scored_columns, mini_batch_rows


def test_mini_batches_keep_groups_whole_and_cover_every_row_once():
    group_ids = [f"p{i % 5}" for i in range(20)]  # 5 prompts x 4 rows, interleaved
    g = torch.Generator().manual_seed(0)
    parts = mini_batch_rows(group_ids, 2, g)
    assert sorted(r for part in parts for r in part) == list(range(20))
    assert [len(p) for p in parts] == [12, 8]  # 3 groups, then 2
    for part in parts:
        ids = [group_ids[r] for r in part]
        # a group's rows are contiguous and all in this mini-batch
        for gid in set(ids):
            at = [i for i, x in enumerate(ids) if x == gid]
            assert len(at) == 4 and at == list(range(at[0], at[0] + 4))
    # seeded: same generator seed, same split; another seed reorders the groups
    again = mini_batch_rows(group_ids, 2, torch.Generator().manual_seed(0))
    assert again == parts
    orders = {
        tuple(mini_batch_rows(group_ids, 2, torch.Generator().manual_seed(s))[0]) for s in range(8)
    }
    assert len(orders) > 1
    assert mini_batch_rows(group_ids, 2) == [
        [0, 5, 10, 15, 1, 6, 11, 16, 2, 7, 12, 17],
        [3, 8, 13, 18, 4, 9, 14, 19],
    ]


def test_fewer_groups_than_mini_batches_splits_rows():
    parts = mini_batch_rows(["a"] * 4 + ["b"] * 4, 4)
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mini_batch_rows(["a", "b"], 5) == [[0], [1]]  # never an empty mini-batch


def test_first_scored_columns():
    mask = torch.tensor([[0, 0, 1, 0, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert first_scored_columns(mask).tolist() == [2, 0, 5]
    assert first_scored_columns(mask.float()).tolist() == [2, 0, 5]


def test_docstring_examples():
    failures, tried = doctest.testmod(batching_module)
    assert failures == 0 and tried > 0
