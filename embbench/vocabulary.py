"""The dense index of a feature's training vocabulary: raw IDs -> 0..n-1 by rank, n for any unseen ID.

Shared by the schemes that give every known ID its own index (compositional, binary-code, ...).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from embbench.schemes import ID_BYTES


def is_contiguous(ids: np.ndarray) -> bool:
    """Whether sorted distinct ``ids`` are a run first, first+1, ..., first+n-1."""
    return len(ids) > 0 and int(ids[-1]) - int(ids[0]) == len(ids) - 1


class VocabularyIndex(nn.Module):
    """Raw IDs -> dense index: the rank 0..n-1 in the sorted training vocabulary, n for any unseen ID.

    The sorted vocabulary is stored (8 bytes per ID), except when it is a contiguous run of IDs: then the
    rank is ``id - first`` and only ``first`` is stored (8 bytes); the mapping is the same.
    """

    def __init__(self, vocabulary: np.ndarray) -> None:
        super().__init__()
        self.num_ids = int(len(vocabulary))
        self.contiguous = is_contiguous(vocabulary)
        ids = torch.as_tensor(np.asarray(vocabulary, dtype=np.int64))
        if self.contiguous:
            self.first_id, self.last_id = int(ids[0]), int(ids[-1])
            self.register_buffer("vocabulary_start", ids[:1].clone())
        else:
            self.register_buffer("vocabulary", ids.clone())

    @staticmethod
    def size_bytes(vocabulary: np.ndarray) -> int:
        return ID_BYTES if is_contiguous(vocabulary) else len(vocabulary) * ID_BYTES

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.contiguous:
            # Clamp before subtracting, so that IDs near ±2^63 cannot overflow.
            clamped = ids.clamp(self.first_id, self.last_id)
            known = clamped == ids
            rank = clamped - self.vocabulary_start
        elif self.num_ids == 0:
            return torch.zeros_like(ids)
        else:
            position = torch.searchsorted(self.vocabulary, ids)
            rank = position.clamp(max=self.num_ids - 1)
            known = self.vocabulary[rank] == ids
        return torch.where(known, rank, torch.full_like(rank, self.num_ids))
