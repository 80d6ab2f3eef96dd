"""VocabularyIndex: ranks of known IDs, one index for unseen ones, and the cheapest exact encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embbench import VocabularyIndex, state_size_bytes
from embbench.vocabulary import encoding_sizes

PROBES = [-(2**63), -1, 0, 1, 2, 255, 256, 1000, 2**31, 2**62, 2**63 - 1]


def reference_ranks(vocabulary: np.ndarray, ids: list[int]) -> list[int]:
    rank = {int(v): r for r, v in enumerate(vocabulary)}
    return [rank.get(x, len(vocabulary)) for x in ids]


@pytest.mark.parametrize("vocabulary, encoding", [
    (np.arange(5, 105), "run"),
    (np.array([1, 3, 4, 7, 9, 200, 1000]), "sorted"),  # 7 x 2 bytes beat a 1000-bit bitmap
    (np.setdiff1d(np.arange(1, 1683), [17, 400, 1001]), "bitmap"),  # MovieLens-like: dense small IDs
    (np.array([-(2**63), -5, 0, 2**40, 2**63 - 1]), "sorted"),  # the whole int64 range
    (np.sort(np.random.default_rng(0).choice(2**62, 300, replace=False)), "sorted"),
])
def test_ranks_known_ids_and_gives_unseen_ids_index_n(vocabulary, encoding):
    index = VocabularyIndex(vocabulary)
    assert index.encoding == encoding
    ids = [int(v) for v in vocabulary] + PROBES + [int(v) + 1 for v in vocabulary[:20] if v < 2**63 - 1]
    assert index(torch.tensor(ids)).tolist() == reference_ranks(vocabulary, ids)


@pytest.mark.parametrize("vocabulary", [
    np.arange(10), np.array([2, 4, 6, 1000]), np.setdiff1d(np.arange(3000), [5]), np.array([0, 2**62]),
])
def test_stored_state_is_the_cheapest_encoding_and_survives_a_state_dict_round_trip(vocabulary):
    index = VocabularyIndex(vocabulary)
    assert state_size_bytes(index) == VocabularyIndex.size_bytes(vocabulary) == min(encoding_sizes(vocabulary).values())
    copy = VocabularyIndex(vocabulary)
    copy.load_state_dict(index.state_dict())
    ids = torch.tensor([int(v) for v in vocabulary] + PROBES)
    assert torch.equal(copy(ids), index(ids))


def test_bitmap_costs_an_eighth_of_a_byte_per_possible_id():
    vocabulary = np.setdiff1d(np.arange(1, 1683), [17])
    assert VocabularyIndex.size_bytes(vocabulary) == 8 + -(-1682 // 8)
